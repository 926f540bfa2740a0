"""Wire format between omnistream stage processes (encoders, thinker, talker, token2wav).

Stages run as separate processes linked by ZeroMQ, vLLM-v1 style. Every message is one ZMQ
*multipart* message:

* frame 0: the control struct, msgpack-encoded by msgspec (a tagged union, so the receiver
  learns the type from the ``type`` field without a second header);
* frames 1..n: raw little-endian, C-contiguous tensor bytes, each described by a
  :class:`TensorRef` inside the struct (dtype, shape, frame index).

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
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np
import zmq

__all__ = [
    "DTYPES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "AudioChunk",
    "BeginTurn",
    "Clear",
    "CloseSession",
    "Codes",
    "Commit",
    "Done",
    "Embeds",
    "EndReply",
    "Epoch",
    "Error",
    "Frame",
    "Hello",
    "Message",
    "OpenSession",
    "Ping",
    "Pong",
    "PromptRows",
    "Ready",
    "ReplyError",
    "Respond",
    "Result",
    "Shutdown",
    "Step",
    "TensorRef",
    "TextDelta",
    "Transcript",
    "Truncate",
    "TruncatePrompt",
    "WireError",
    "decode",
    "encode",
    "hwm_for",
    "recv",
    "send",
    "to_torch",
]

#: Bumped on any incompatible change to the structs below; checked in Hello/Ready so a stale
#: worker fails loudly at handshake time instead of mis-parsing frames mid-session.
PROTOCOL_VERSION = 3  # 2: per-reply settings in Respond, usage and tool calls in Done; 3: Transcript

#: Upper bound on one multipart message (all frames). 15 MiB is ~4 min of 16 kHz float32 mono
#: audio -- far above any sane chunk -- yet small enough that a corrupt length can't make a
#: stage allocate or hold gigabytes. Override per call via ``max_bytes``.
MAX_MESSAGE_BYTES = 15 * 1024 * 1024

#: Wire dtype name -> numpy dtype (explicitly little-endian so the format is host independent).
#: "bfloat16" has no numpy dtype: it travels as raw 2-byte words and decodes to a ``uint16``
#: array holding the bit patterns; :func:`to_torch` reinterprets it as ``torch.bfloat16``.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
    "int16": np.dtype("<i2"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
_NP_TO_NAME = {v: k for k, v in DTYPES.items() if k != "bfloat16"}

DType = Literal["float32", "float16", "bfloat16", "int16", "int32", "int64", "uint8", "bool"]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Dim = Annotated[int, msgspec.Meta(ge=0, le=2**40)]  # bounded so dtype*shape math stays sane


class WireError(ValueError):
    """Malformed, oversize or incompatible message. The only exception :func:`decode` raises."""


class TensorRef(msgspec.Struct, kw_only=True, frozen=True):
    """Points at frame ``frame`` (>= 1) holding a C-contiguous ``dtype`` array of ``shape``."""

    dtype: DType
    shape: Annotated[list[Dim], msgspec.Meta(max_length=16)]
    frame: Annotated[int, msgspec.Meta(ge=1)]

    @classmethod
    def of(cls, x: Any, frame: int = 1) -> TensorRef:
        """Describe ndarray / CPU torch tensor ``x`` as it will travel in ``frame``."""
        name, arr = _as_wire_array(x)
        return cls(dtype=name, shape=list(arr.shape), frame=frame)


class _Msg(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Base of the tagged union: the class name is the tag (msgpack field ``type``).

    ``reply_work``: a message that only carries work of one reply (a decoded token for the talker,
    codes for token2wav). After a barge-in such a message of an older epoch is dropped where it is
    delivered (:meth:`omnistream.runtime.workers.Worker.deliver`), once for every type; state
    updates (prompt rows, the end of a reply) are never dropped: they keep the caches consistent."""

    reply_work: ClassVar[bool] = False


class Hello(_Msg):
    """Worker -> coordinator on connect; ``protocol`` must equal :data:`PROTOCOL_VERSION`."""
    stage: str
    pid: int
    protocol: int = PROTOCOL_VERSION


class Ready(_Msg):
    """Coordinator -> worker (or worker after model load): handshake complete."""
    stage: str
    pid: int
    protocol: int = PROTOCOL_VERSION


class Ping(_Msg):
    """Liveness probe; ``t`` is the sender's ``time.monotonic()`` for RTT measurement."""
    seq: NonNeg
    t: float


class Pong(_Msg):
    """Answer to :class:`Ping`, echoing ``seq``/``t`` and naming the responding stage; ``stats``: its
    load (:class:`omnistream.engine.load.LoadMeter`) and its workers' batch figures, for admission
    control and ``/status``."""
    seq: NonNeg
    t: float
    stage: str
    stats: dict[str, Any] = {}


class AudioChunk(_Msg):
    """A piece of PCM for ``session``; ``epoch`` lets receivers drop audio from before a barge-in."""
    session: str
    epoch: NonNeg
    seq: NonNeg
    sample_rate: Annotated[int, msgspec.Meta(gt=0)]
    pcm: TensorRef


class TextDelta(_Msg):
    """Incremental text (thinker output or transcript) for ``session`` at ``epoch``; with ``call``,
    the text is the arguments of the function call ``call`` being written."""
    session: str
    epoch: NonNeg
    seq: NonNeg
    text: str
    call: str | None = None


class Error(_Msg):
    """A stage failed a request; ``session`` is None for stage-wide failures."""
    session: str | None
    code: str
    message: str


class Epoch(_Msg):
    """Barge-in broadcast: everything for ``session`` with a smaller epoch is stale, drop it."""
    session: str
    epoch: NonNeg


class Shutdown(_Msg):
    """Ask the receiving stage to drain and exit."""


# ---- session work along the stage chain (encoders -> thinker -> talker -> token2wav) ----------
# Every op travels the chain in order, so a stage sees a session's ops in the order the client
# sent them; ``req`` > 0 asks for a :class:`Result` (from the stage that owns the op's outcome).
Options = dict[str, Any]  # SessionOptions fields (omnistream.runtime.client.SessionOptions)


class OpenSession(_Msg):
    """Create the session's state (idempotent: a stage that has it keeps it); ``fresh`` rebuilds it."""
    session: str
    epoch: NonNeg
    options: Options
    req: NonNeg = 0
    fresh: bool = False


class CloseSession(_Msg):
    session: str


class BeginTurn(_Msg):
    """Encoders -> thinker: a media user turn opens (audio, or audio-in-video when ``video``)."""
    session: str
    epoch: NonNeg
    video: bool


class Frame(_Msg):
    """Client -> encoders: a camera frame (H, W, 3) uint8 RGB taken at session time ``t_s``."""
    session: str
    epoch: NonNeg
    t_s: float
    image: TensorRef


class Commit(_Msg):
    """End the user turn, with optional typed ``text``; ``transcribe``: the item id under which the
    turn's audio is transcribed (``Transcript`` messages), None: no transcription."""
    session: str
    epoch: NonNeg
    text: str | None = None
    req: NonNeg = 0
    transcribe: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class Clear(_Msg):
    """Drop the open user turn."""
    session: str
    epoch: NonNeg
    req: NonNeg = 0


class Respond(_Msg):
    """Generate the reply of ``epoch`` to the committed turn, with this reply's own settings:
    ``max_new_tokens`` (0: the session's), ``instructions`` and ``tools`` (for this reply only: see
    :meth:`omnistream.engine.conversation.Conversation.begin_reply`), ``tool_choice`` (``auto``,
    ``none``, ``required`` or ``function:NAME``) and ``audio`` (False: text only, no Talker work)."""
    session: str
    epoch: NonNeg
    max_new_tokens: NonNeg = 0
    instructions: str | None = None
    tools: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=128)] = []
    tool_choice: str = "auto"
    audio: bool = True


class Truncate(_Msg):
    """Keep only the first ``played_samples`` (24 kHz) of the last reply (thinker answers with tokens kept)."""
    session: str
    epoch: NonNeg
    played_samples: NonNeg
    req: NonNeg = 0


class Embeds(_Msg):
    """Encoders -> thinker: one encoded audio block (n, D) or video patch (with its (1, h, w) grid)."""
    session: str
    epoch: NonNeg
    kind: Literal["audio", "video"]
    embeds: TensorRef
    grid: Annotated[list[NonNeg], msgspec.Meta(max_length=3)] = []


class PromptRows(_Msg):
    """Thinker -> talker: per-token (embeds, hidden) (n, D) and TMRoPE ``positions`` (3, n) (``feed_prompt``)."""
    session: str
    embeds: TensorRef
    hidden: TensorRef
    positions: TensorRef
    next_position: int


class TruncatePrompt(_Msg):
    """Thinker -> talker: the Thinker's context was cut back to ``n_tokens``."""
    session: str
    n_tokens: NonNeg


class Step(_Msg):
    """Thinker -> talker: one decoded reply token with its input embedding and hidden state (D,)."""
    reply_work: ClassVar[bool] = True
    session: str
    epoch: NonNeg
    token: NonNeg
    embed: TensorRef
    hidden: TensorRef


class EndReply(_Msg):
    """Thinker -> talker -> token2wav: the reply text ended (``cancelled``: stop, do not finish)."""
    session: str
    epoch: NonNeg
    cancelled: bool


class Codes(_Msg):
    """Talker -> token2wav: codec tokens of the reply of ``epoch``."""
    reply_work: ClassVar[bool] = True
    session: str
    epoch: NonNeg
    codes: list[NonNeg]


class Done(_Msg):
    """A stage finished its part of a reply: ``text`` (thinker; ``speech`` says audio follows) or ``audio``."""
    session: str
    epoch: NonNeg
    part: Literal["text", "audio"]
    cancelled: bool
    text: str = ""
    reply_tokens: NonNeg = 0
    speech: bool = False
    stats: dict[str, float] = {}
    usage: dict[str, int] = {}  # input_tokens (prefilled for the reply), output_tokens (generated), ...
    tool_calls: list[dict[str, str]] = []  # {"name", "arguments" (JSON text)} per function call made


class ReplyError(_Msg):
    """A stage failed the reply of ``epoch`` (the reply ends with an error; the session goes on)."""
    session: str
    epoch: NonNeg
    code: str
    message: str


class Transcript(_Msg):
    """Input transcription of the user turn committed as ``item``: a piece of ``text``, or (``final``)
    the whole transcript; ``error`` set: it failed (``final`` too)."""
    session: str
    item: str
    seq: NonNeg
    text: str
    final: bool = False
    error: str | None = None
    usage: dict[str, int] = {}  # (final) input_tokens prefilled (audio_tokens of them), output_tokens decoded


class Result(_Msg):
    """Answer to an op with ``req`` > 0: ``value`` (e.g. tokens kept) or ``error``."""
    session: str
    req: NonNeg
    value: int = 0
    error: str | None = None
    code: str | None = None  # the error's stable code (client._error_code), e.g. turn_too_long


Message = (Hello | Ready | Ping | Pong | AudioChunk | TextDelta | Error | Epoch | Shutdown | OpenSession | CloseSession
           | BeginTurn | Frame | Commit | Clear | Respond | Truncate | Embeds | PromptRows | TruncatePrompt | Step
           | EndReply | Codes | Done | ReplyError | Transcript | Result)

_ENCODER = msgspec.msgpack.Encoder()
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


def _refs(msg: Any) -> list[TensorRef]:
    """All TensorRefs in ``msg`` (top-level fields and lists of them)."""
    out = []
    for f in msg.__struct_fields__:
        v = getattr(msg, f)
        if isinstance(v, TensorRef):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(r for r in v if isinstance(r, TensorRef))
    return out


def _check_refs(refs: list[TensorRef], n_tensors: int) -> dict[int, TensorRef]:
    """Each tensor frame 1..n must be referenced exactly once: extra or shared frames are bugs."""
    by_frame: dict[int, TensorRef] = {}
    for r in refs:
        if r.frame > n_tensors:
            raise WireError(f"TensorRef points at frame {r.frame} but only {n_tensors} tensor frame(s)")
        if r.frame in by_frame:
            raise WireError(f"frame {r.frame} referenced by more than one TensorRef")
        by_frame[r.frame] = r
    if len(by_frame) != n_tensors:
        missing = sorted(set(range(1, n_tensors + 1)) - set(by_frame))
        raise WireError(f"tensor frame(s) {missing} not referenced by any TensorRef")
    return by_frame


def encode(msg: Message, *tensors: Any, max_bytes: int = MAX_MESSAGE_BYTES) -> list:
    """Multipart frames for ``msg``: [msgpack header, tensor buffers...] -- tensor ``i`` is frame ``i+1``.

    Tensor frames are flat uint8 memoryviews over the arrays' own memory (no ``tobytes``), so
    with ``send_multipart(copy=False)`` libzmq reads them in place. Do not mutate a tensor
    until the send has completed. The size limit is enforced here too so that an oversize
    message fails at the sender with a traceback instead of at the receiver.
    """
    if not isinstance(msg, _Msg):
        raise WireError(f"not a wire message: {type(msg).__name__}")
    by_frame = _check_refs(_refs(msg), len(tensors))
    frames: list = [_ENCODER.encode(msg)]
    for i, x in enumerate(tensors, start=1):
        name, arr = _as_wire_array(x)
        ref = by_frame[i]
        if ref.dtype != name or tuple(ref.shape) != arr.shape:
            raise WireError(f"frame {i}: tensor is {name}{list(arr.shape)} but TensorRef says "
                            f"{ref.dtype}{ref.shape}")
        frames.append(memoryview(arr.reshape(-1).view(np.uint8)))
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise WireError(f"message is {total} bytes > max {max_bytes}")
    return frames


def _buffer(frame: Any) -> memoryview:
    """Flat byte view of a received frame (zmq.Frame, bytes, bytearray, memoryview), no copy."""
    buf = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return buf if (buf.format == "B" and buf.ndim == 1) else buf.cast("B")


def decode(frames: Sequence[Any], copy: bool = False, *, max_bytes: int = MAX_MESSAGE_BYTES,
           check_protocol: bool = True) -> tuple[Message, list[np.ndarray]]:
    """Inverse of :func:`encode`: ``(msg, arrays)`` with ``arrays[i]`` built from frame ``i+1``.

    With ``copy=False`` each array is ``np.frombuffer`` over the frame's memory (read-only,
    shares memory with the frame, which it keeps alive). ``copy=True`` returns owned,
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
    by_frame = _check_refs(_refs(msg), len(bufs) - 1)
    arrays = []
    for i in range(1, len(bufs)):
        ref, buf = by_frame[i], bufs[i]
        dt = DTYPES[ref.dtype]
        expect = math.prod(ref.shape) * dt.itemsize
        if buf.nbytes != expect:
            raise WireError(f"frame {i}: {buf.nbytes} bytes but {ref.dtype}{ref.shape} needs {expect}")
        arr = np.frombuffer(buf, dtype=dt).reshape(tuple(ref.shape))
        if copy:
            arr = arr.copy()
        else:
            arr.flags.writeable = False  # aliases the frame, which may be forwarded zero-copy
        arrays.append(arr)
    return msg, arrays


def to_torch(arr: np.ndarray, ref: TensorRef):
    """Decoded array -> torch tensor sharing memory; reinterprets bfloat16 bit patterns.

    Zero-copy arrays are read-only (they alias the ZMQ frame); torch warns on those, so the
    warning is suppressed here -- do not write to the tensor, or decode with ``copy=True``.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if ref.dtype == "bfloat16" else t


def send(sock: zmq.Socket, msg: Message, *tensors: Any, copy: bool = False, flags: int = 0) -> None:
    """Encode and ``send_multipart``. ``copy=False`` hands tensor memory to libzmq (large frames)."""
    sock.send_multipart(encode(msg, *tensors), flags=flags, copy=copy)


def recv(sock: zmq.Socket, copy: bool = False, flags: int = 0, *,
         max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Message, list[np.ndarray]]:
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

