"""The wire codec between omnistream stage processes (encoders, thinker, talker, token2wav).

The messages themselves (the structs: what travels) are declared in :mod:`omnistream.runtime.messages`
and re-exported here, so ``from omnistream.runtime import wire`` then ``wire.Respond(...)``,
``wire.encode(msg)`` is the one door every stage, client and test uses. This module is how they
travel: typed tensor fields, encode/decode with validation, send/recv, high-water marks, ``to_cpu``.

Stages run as separate processes linked by ZeroMQ, vLLM-v1 style. Every message is one ZMQ
*multipart* message:

* frame 0: the control struct, msgpack-encoded by msgspec (a tagged union, so the receiver
  learns the type from the ``type`` field without a second header);
* frames 1..n: raw little-endian, C-contiguous tensor bytes, one per tensor field.

Tensors are typed fields of the structs (as vLLM's ``serial_utils`` carries them): a field
declared :data:`Tensor` (model tensors: decoded as torch) or :data:`Array` (media: decoded as
numpy) holds the array itself. :func:`encode` turns each into a small :class:`TensorRef` header
(dtype, shape, frame index) through msgspec's ``enc_hook`` and appends the array's buffer as its
own frame; :func:`decode` puts the arrays back into those fields. Nobody numbers frames by hand.
In one process a message is handed over as is (tensors stay on their device: :func:`to_cpu` is
for what leaves the process).

Why separate frames: msgpack would copy every PCM/feature buffer into one blob on send and
again on receive. Keeping tensors in their own frames lets ``send(copy=False)`` hand the
array's memory straight to libzmq and lets ``decode(copy=False)`` wrap the received frame
with ``np.frombuffer`` -- zero copies in Python on either side.

Decoding is a trust boundary (a crashed or mismatched peer can send anything), so
:func:`decode` validates everything and raises only :class:`WireError` on bad input.
"""

from __future__ import annotations

import math
import sys
import threading
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import zmq

from omnistream.runtime import messages
from omnistream.runtime.messages import *  # noqa: F403 -- the messages are this module's names too (wire.Respond)
from omnistream.runtime.messages import PROTOCOL_VERSION, Hello, Message, Ready, _Msg, _TensorField

__all__ = [*messages.__all__, "DTYPES", "MAX_MESSAGE_BYTES", "TensorRef", "WireError", "decode", "encode", "hwm_for", "recv",
           "send", "to_cpu"]

#: Upper bound on one multipart message (all frames). 15 MiB is ~4 min of 16 kHz float32 mono
#: audio -- far above any sane chunk -- yet small enough that a corrupt length can't make a
#: stage allocate or hold gigabytes. Override per call via ``max_bytes``.
MAX_MESSAGE_BYTES = 15 * 1024 * 1024

#: Wire dtype name -> numpy dtype (explicitly little-endian so the format is host independent).
#: "bfloat16" has no numpy dtype: it travels as raw 2-byte words and decodes to a ``uint16``
#: array holding the bit patterns; :func:`_to_torch` reinterprets it as ``torch.bfloat16``.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
    "int16": np.dtype("<i2"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
_NP_TO_NAME = {v: k for k, v in DTYPES.items() if k != "bfloat16"}

DType = Literal["float32", "float16", "bfloat16", "int16", "int32", "int64", "uint8", "bool"]
Dim = Annotated[int, msgspec.Meta(ge=0, le=2**40)]  # bounded so dtype*shape math stays sane


class WireError(ValueError):
    """Malformed, oversize or incompatible message. The only exception :func:`decode` raises."""


class TensorRef(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """The header a tensor field travels as: frame ``frame`` (>= 1) holds a C-contiguous ``dtype``
    array of ``shape``. Written by :func:`encode`, read by :func:`decode`; never built by hand."""

    dtype: DType
    shape: Annotated[list[Dim], msgspec.Meta(max_length=16)]
    frame: Annotated[int, msgspec.Meta(ge=1)]



def _tensor_fields(cls: type[_Msg]) -> tuple[tuple[str, bool], ...]:
    """(name, decoded as torch?) of each :data:`Tensor` / :data:`Array` field of ``cls``, in field
    order (the order the encoder meets them in, so the order of their frames)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    marks = ((f, next((m for m in getattr(hints[f], "__metadata__", ()) if isinstance(m, _TensorField)), None))
             for f in cls.__struct_fields__)
    return tuple((f, m.torch) for f, m in marks if m is not None)


#: Message type -> its tensor fields (also: the set of types that can travel).
_TENSOR_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {c: _tensor_fields(c) for c in typing.get_args(Message)}


class _SideBuffers(threading.local):
    """The arrays of the message being encoded on this thread, in frame order (see :func:`_enc_hook`)."""

    arrays: list | None = None


_SIDE = _SideBuffers()


def _enc_hook(x: Any) -> TensorRef:
    """msgspec's hook for what msgpack cannot hold: an array goes to the side buffers (its own frame)
    and its header takes its place in the struct. Anything else is not sendable."""
    arrays = _SIDE.arrays
    if arrays is None:  # (only encode() sets the side buffers)
        raise WireError(f"cannot encode {type(x).__name__} outside wire.encode")
    try:
        name, arr = _as_wire_array(x)
    except TypeError as e:  # e.g. a torch dtype numpy lacks
        raise WireError(f"cannot send {type(x).__name__}: {e}") from e
    arrays.append(arr)
    return TensorRef(dtype=name, shape=list(arr.shape), frame=len(arrays))


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_DECODER = msgspec.msgpack.Decoder(Message)


def _as_wire_array(x: Any) -> tuple[str, np.ndarray]:
    """(wire dtype name, C-contiguous little-endian ndarray sharing x's memory when possible).

    Non-contiguous or big-endian inputs are copied exactly once here; everything else is a view.
    """
    torch = sys.modules.get("torch")  # imported lazily: numpy-only stages needn't load torch
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise WireError(f"tensor on {x.device}: move it to CPU before sending (no hidden syncs)")
        t = x.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return "bfloat16", t.view(torch.int16).numpy().view(np.uint16)
        x = t.numpy()  # shares memory; the ndarray keeps the tensor alive
    if not isinstance(x, np.ndarray):
        raise WireError(f"cannot send {type(x).__name__}: expected numpy.ndarray or torch.Tensor")
    le = x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype
    name = _NP_TO_NAME.get(le)
    if name is None:
        raise WireError(f"unsupported dtype {x.dtype}; supported: {sorted(DTYPES)}")
    if x.flags.c_contiguous and x.dtype == le:
        return name, x
    return name, np.array(x, dtype=le, order="C")  # (ascontiguousarray would turn 0-d into 1-d)


def _check_refs(refs: list[TensorRef], n_tensors: int) -> None:
    """Each tensor frame 1..n must be referenced exactly once: extra or shared frames are bugs."""
    seen: set[int] = set()
    for r in refs:
        if r.frame > n_tensors:
            raise WireError(f"a tensor field points at frame {r.frame} but only {n_tensors} tensor frame(s)")
        if r.frame in seen:
            raise WireError(f"frame {r.frame} referenced by more than one tensor field")
        seen.add(r.frame)
    if len(seen) != n_tensors:
        missing = sorted(set(range(1, n_tensors + 1)) - seen)
        raise WireError(f"tensor frame(s) {missing} not referenced by any tensor field")


def encode(msg: Message, *, max_bytes: int = MAX_MESSAGE_BYTES) -> list:
    """Multipart frames for ``msg``: [msgpack header, one buffer per tensor field, in field order].

    Tensor frames are flat uint8 memoryviews over the arrays' own memory (no ``tobytes``), so
    with ``send_multipart(copy=False)`` libzmq reads them in place. Do not mutate a tensor
    until the send has completed. The size limit is enforced here too so that an oversize
    message fails at the sender with a traceback instead of at the receiver.
    """
    fields = _TENSOR_FIELDS.get(type(msg))
    if fields is None:
        raise WireError(f"not a wire message: {type(msg).__name__}")
    _SIDE.arrays = arrays = []
    try:
        frames: list = [_ENCODER.encode(msg)]
    finally:
        _SIDE.arrays = None
    if len(arrays) != len(fields):  # a tensor field holds no array, or an array sits in another field
        bad = [f for f, _ in fields if not _is_array(getattr(msg, f))]
        raise WireError(f"{type(msg).__name__}: " + (f"field(s) {bad} must hold a numpy array or torch tensor" if bad
                                                     else "an array outside its tensor fields cannot travel"))
    frames.extend(memoryview(a.reshape(-1).view(np.uint8)) for a in arrays)
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise WireError(f"message is {total} bytes > max {max_bytes}")
    return frames


def _buffer(frame: Any) -> memoryview:
    """Flat byte view of a received frame (zmq.Frame, bytes, bytearray, memoryview), no copy."""
    buf = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return buf if (buf.format == "B" and buf.ndim == 1) else buf.cast("B")


def decode(frames: Sequence[Any], copy: bool = False, *, max_bytes: int = MAX_MESSAGE_BYTES,
           check_protocol: bool = True) -> Message:
    """Inverse of :func:`encode`: the message, its tensor fields holding the arrays of their frames
    (numpy for :data:`Array` fields, CPU torch tensors for :data:`Tensor` fields).

    With ``copy=False`` each array is ``np.frombuffer`` over the frame's memory (read-only,
    shares memory with the frame, which it keeps alive). ``copy=True`` gives owned,
    writable arrays. Any malformed input raises :class:`WireError` -- never anything else --
    so a receive loop needs exactly one ``except`` to drop a bad peer's message.
    """
    try:
        return _decode(frames, copy, max_bytes, check_protocol)
    except WireError:
        raise
    except Exception as e:  # contract: a bad peer must never crash a stage with a surprise type
        raise WireError(f"malformed message: {type(e).__name__}: {e}") from e


def _decode(frames, copy, max_bytes, check_protocol):
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise WireError(f"expected a list of frames, got {type(frames).__name__}")
    if not frames:
        raise WireError("empty multipart message")
    try:
        bufs = [_buffer(f) for f in frames]
    except TypeError as e:
        raise WireError(f"frame is not a bytes-like object: {e}") from e
    total = sum(b.nbytes for b in bufs)
    if total > max_bytes:
        raise WireError(f"message is {total} bytes > max {max_bytes}")
    try:
        msg = _DECODER.decode(bufs[0])
    except msgspec.ValidationError as e:  # bad/unknown tag, wrong field types, out of range
        what = "unknown message tag" if "`$.type`" in str(e) else "invalid message"
        raise WireError(f"frame 0: {what}: {e}") from e
    except msgspec.DecodeError as e:  # not msgpack at all
        raise WireError(f"frame 0: undecodable header: {e}") from e
    if check_protocol and isinstance(msg, (Hello, Ready)) and msg.protocol != PROTOCOL_VERSION:
        raise WireError(f"{type(msg).__name__} from stage {msg.stage!r} (pid {msg.pid}) speaks "
                        f"protocol {msg.protocol}, this process speaks {PROTOCOL_VERSION}")
    fields = _TENSOR_FIELDS[type(msg)]
    refs = []
    for name, _ in fields:  # each tensor field holds its header yet (the struct types it Any)
        try:
            refs.append(msgspec.convert(getattr(msg, name), TensorRef))
        except msgspec.ValidationError as e:
            raise WireError(f"frame 0: invalid message: {type(msg).__name__}.{name}: bad tensor header: {e}") from e
    _check_refs(refs, len(bufs) - 1)
    for (name, as_torch), ref in zip(fields, refs):
        buf, dt = bufs[ref.frame], DTYPES[ref.dtype]
        expect = math.prod(ref.shape) * dt.itemsize
        if buf.nbytes != expect:
            raise WireError(f"frame {ref.frame}: {buf.nbytes} bytes but {ref.dtype}{ref.shape} needs {expect}")
        arr = np.frombuffer(buf, dtype=dt).reshape(tuple(ref.shape))
        if copy:
            arr = arr.copy()
        else:
            arr.flags.writeable = False  # aliases the frame, which may be forwarded zero-copy
        msgspec.structs.force_setattr(msg, name, _to_torch(arr, ref.dtype) if as_torch else arr)
    return msg


def _to_torch(arr: np.ndarray, dtype: str):
    """Decoded array -> torch tensor sharing memory; reinterprets bfloat16 bit patterns.

    Zero-copy arrays are read-only (they alias the ZMQ frame); torch warns on those, so the
    warning is suppressed here -- do not write to the tensor, or decode with ``copy=True``.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _is_array(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(x, np.ndarray) or (torch is not None and isinstance(x, torch.Tensor))


def to_cpu(msg: Message) -> Message:
    """``msg`` as it can leave the process: its torch tensors on another device moved to CPU (a new
    struct only when one moves). In-process hand-overs skip this: tensors stay on their device."""
    torch = sys.modules.get("torch")
    if torch is None:
        return msg  # (nothing can be on a device)
    moved = {f: v.detach().cpu() for f, _ in _TENSOR_FIELDS.get(type(msg), ())
             if isinstance(v := getattr(msg, f), torch.Tensor) and v.device.type != "cpu"}
    return msgspec.structs.replace(msg, **moved) if moved else msg


def send(sock: zmq.Socket, msg: Message, *, copy: bool = False, flags: int = 0) -> None:
    """Encode and ``send_multipart``. ``copy=False`` hands tensor memory to libzmq (large frames)."""
    sock.send_multipart(encode(msg), flags=flags, copy=copy)


def recv(sock: zmq.Socket, copy: bool = False, flags: int = 0, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """``recv_multipart`` and :func:`decode`; raises :class:`WireError` on a bad message."""
    return decode(sock.recv_multipart(flags=flags, copy=copy), copy=False, max_bytes=max_bytes)


def hwm_for(seconds: float, chunk_seconds: float) -> int:
    """ZMQ high-water mark (in messages) that buffers ``seconds`` of media in ``chunk_seconds`` pieces.

    HWMs are sized in *time*, never unlimited (ZMQ's HWM=0): a stalled consumer must make the
    producer block or drop after a bounded, known latency rather than grow memory without bound
    and replay stale audio after a barge-in. Always at least 1.
    """
    if not (math.isfinite(seconds) and math.isfinite(chunk_seconds)) or seconds <= 0 or chunk_seconds <= 0:
        raise ValueError(f"hwm_for needs positive finite durations, got {seconds}, {chunk_seconds}")
    return max(1, math.ceil(seconds / chunk_seconds - 1e-9))

