"""Wire format: round trips, zero-copy, real cross-process ZMQ, and decode fuzzing."""

from __future__ import annotations

import multiprocessing as mp
import os

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnistream.runtime import wire
from omnistream.runtime.wire import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    AudioChunk,
    Epoch,
    Error,
    Hello,
    Ping,
    Pong,
    Ready,
    Shutdown,
    TensorRef,
    TextDelta,
    WireError,
    decode,
    encode,
    hwm_for,
    recv,
    send,
    to_torch,
)

PCM = np.linspace(-1, 1, 320, dtype=np.float32)


def _chunk(x, seq=0, frame=1):
    return AudioChunk(session="s1", epoch=2, seq=seq, sample_rate=16000, pcm=TensorRef.of(x, frame))


ALL = [
    Hello(stage="thinker", pid=11),
    Ready(stage="talker", pid=12, protocol=PROTOCOL_VERSION),
    Ping(seq=3, t=1.25),
    Pong(seq=3, t=1.25, stage="token2wav"),
    TextDelta(session="s1", epoch=0, seq=7, text="héllo ✓"),
    Error(session=None, code="oom", message="out of memory"),
    Error(session="s1", code="bad", message="x"),
    Epoch(session="s1", epoch=5),
    Shutdown(),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_round_trip_plain(msg):
    frames = encode(msg)
    assert len(frames) == 1
    got, arrays = decode(frames)
    assert got == msg and type(got) is type(msg) and arrays == []


def test_round_trip_audio_chunk():
    msg = _chunk(PCM)
    got, (arr,) = decode([bytes(f) for f in encode(msg, PCM)])
    assert got == msg and got.pcm.dtype == "float32" and got.pcm.shape == [320]
    np.testing.assert_array_equal(arr, PCM)


DTYPE_CASES = [
    (np.float32, (2, 3)), (np.float16, (5,)), (np.int16, (4, 1, 2)), (np.int32, (7,)),
    (np.int64, (3, 3)), (np.uint8, (0,)), (np.bool_, (2, 2)), (np.float32, ()), (np.int16, (0, 4)),
]


@pytest.mark.parametrize("dtype,shape", DTYPE_CASES)
def test_dtypes_bit_exact_and_zero_copy(dtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 100).astype(dtype) if shape else np.array(1.5, dtype)
    frames = encode(_chunk(x), x)
    # encode is zero-copy: the tensor frame aliases the caller's array
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), x) or x.size == 0
    recv_frames = [zmq.Frame(bytes(f)) for f in frames]  # what recv_multipart(copy=False) yields
    _, (arr,) = decode(recv_frames, copy=False)
    assert arr.dtype == np.dtype(dtype) and arr.shape == shape
    assert arr.tobytes() == x.tobytes()  # bit exact (NaN-safe)
    if x.size:
        assert np.shares_memory(arr, np.frombuffer(recv_frames[1].buffer, np.uint8))
        assert not arr.flags.writeable
    owned = decode(recv_frames, copy=True)[1][0]
    assert owned.flags.writeable and owned.tobytes() == x.tobytes()
    if x.size:
        assert not np.shares_memory(owned, np.frombuffer(recv_frames[1].buffer, np.uint8))


def test_torch_tensors_and_bfloat16():
    torch = pytest.importorskip("torch")
    for t in [torch.randn(4, 6), torch.randn(3, 5).to(torch.bfloat16), torch.arange(10, dtype=torch.int64),
              torch.randn(2, 3, requires_grad=True)]:
        msg, (arr,) = decode(encode(_chunk(t), t))
        back = to_torch(arr, msg.pcm)
        assert back.dtype == t.dtype and torch.equal(back, t.detach())
    t = torch.randn(2, 2)
    assert np.shares_memory(np.frombuffer(encode(_chunk(t), t)[1], np.uint8), t.numpy())


def test_non_contiguous_inputs():
    torch = pytest.importorskip("torch")
    x = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]  # strided view
    assert not x.flags.c_contiguous
    _, (arr,) = decode(encode(_chunk(x), x))
    np.testing.assert_array_equal(arr, x)
    t = torch.arange(12.0).reshape(3, 4).t()
    _, (arr,) = decode(encode(_chunk(t), t))
    np.testing.assert_array_equal(arr, t.numpy())
    big = np.arange(6, dtype=">i4")  # big-endian converts to the little-endian wire format
    msg, (arr,) = decode(encode(_chunk(big), big))
    assert msg.pcm.dtype == "int32" and arr.tolist() == list(range(6))


def test_encode_rejects_inconsistent_refs():
    with pytest.raises(WireError, match="only 0 tensor"):
        encode(_chunk(PCM))
    with pytest.raises(WireError, match="not referenced"):
        encode(Ping(seq=1, t=0.0), PCM)
    with pytest.raises(WireError, match="TensorRef says"):
        encode(_chunk(PCM), PCM.astype(np.float16))
    with pytest.raises(WireError, match="unsupported dtype"):
        encode(_chunk(PCM), PCM.astype(np.float64))


def test_decode_errors_are_clear():
    header = encode(_chunk(PCM), PCM)[0]
    cases = {
        "undecodable": [b"\xc1\xc1garbage"],
        "unknown message tag": [msgspec.msgpack.encode({"type": "Bogus"})],
        "invalid message": [msgspec.msgpack.encode({"type": "Ping", "seq": "one", "t": 0.0})],
        "only 0 tensor": [header],
        "needs 1280": [header, b"\0" * 1279],
        "not referenced": [encode(Shutdown())[0], b"abc"],
        "list of frames": b"raw",
        "empty": [],
    }
    for needle, frames in cases.items():
        with pytest.raises(WireError, match=needle):
            decode(frames)


def test_oversize_rejected():
    x = np.zeros(1024, np.uint8)
    frames = encode(_chunk(x), x)
    with pytest.raises(WireError, match="> max 1000"):
        decode(frames, max_bytes=1000)
    big = np.zeros(MAX_MESSAGE_BYTES, np.uint8)  # 15 MiB payload + header > default limit
    with pytest.raises(WireError, match="max"):
        encode(_chunk(big), big)
    with pytest.raises(WireError, match="max"):
        decode([encode(_chunk(big), big, max_bytes=2 * MAX_MESSAGE_BYTES)[0], big.data])


def test_protocol_mismatch_rejected():
    for cls in (Hello, Ready):
        frames = encode(cls(stage="enc", pid=1, protocol=PROTOCOL_VERSION + 1))
        with pytest.raises(WireError, match="protocol"):
            decode(frames)
        assert decode(frames, check_protocol=False)[0].protocol == PROTOCOL_VERSION + 1


def test_hwm_for():
    assert hwm_for(2.0, 0.1) == 20  # no float round-up to 21
    assert hwm_for(1.0, 0.3) == 4
    assert hwm_for(0.01, 1.0) == 1
    for bad in [(0, 1), (1, 0), (-1, 1), (float("inf"), 1), (1, float("nan"))]:
        with pytest.raises(ValueError):
            hwm_for(*bad)


# ---------------------------------------------------------------- fuzzing: only WireError


def _only_wire_error(frames):
    try:
        msg, arrays = decode(frames)
    except WireError:
        return
    assert isinstance(msg, wire._Msg) and all(isinstance(a, np.ndarray) for a in arrays)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_header(b):
    _only_wire_error([b])


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=64), st.none(), st.integers(), st.text(max_size=8)),
                max_size=5))
def test_fuzz_random_frame_lists(frames):
    _only_wire_error(frames)


_value = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=6),
                   st.lists(st.integers(-5, 2**45), max_size=20))


@FUZZ
@given(tag=st.sampled_from(["AudioChunk", "Hello", "Ping", "Epoch", "Nope", 3]),
       dtype=st.one_of(st.sampled_from(sorted(wire.DTYPES)), st.text(max_size=5)),
       shape=st.one_of(st.lists(st.integers(-3, 2**41), max_size=20), _value),
       frame=st.one_of(st.integers(-2, 4), _value),
       extra=st.dictionaries(st.sampled_from(["seq", "epoch", "session", "sample_rate", "protocol", "t"]),
                             _value, max_size=4),
       payloads=st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_structured(tag, dtype, shape, frame, extra, payloads):
    obj = {"type": tag, "session": "s", "epoch": 0, "seq": 0, "sample_rate": 8000, "stage": "a",
           "pid": 1, "protocol": 1, "t": 0.0, "pcm": {"dtype": dtype, "shape": shape, "frame": frame}}
    obj.update(extra)
    _only_wire_error([msgspec.msgpack.encode(obj), *payloads])


# ---------------------------------------------------------------- real sockets, real processes


def _echo_child(pull_addr, push_addr):
    """Spawned stage: announce Ready, echo every AudioChunk back, exit on Shutdown."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 2000)
        s.setsockopt(zmq.RCVTIMEO, 10000)
    pull.setsockopt(zmq.RCVHWM, hwm_for(2.0, 0.02))
    pull.connect(pull_addr)
    push.connect(push_addr)
    send(push, Ready(stage="echo", pid=os.getpid()))
    while True:
        msg, arrays = recv(pull)
        if isinstance(msg, Shutdown):
            break
        send(push, msg, *arrays)  # zero-copy forward of the received frame memory
    pull.close()
    push.close()
    ctx.term()


def test_push_pull_across_processes(tmp_path):
    ctx = zmq.Context()
    out, back = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (out, back):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 15000)
    out.setsockopt(zmq.SNDHWM, hwm_for(2.0, 0.02))
    a, b = f"ipc://{tmp_path}/to_child", f"ipc://{tmp_path}/from_child"
    out.bind(a)
    back.bind(b)
    proc = mp.get_context("spawn").Process(target=_echo_child, args=(a, b), daemon=True)
    proc.start()
    try:
        ready, _ = recv(back)
        assert isinstance(ready, Ready) and ready.pid == proc.pid and ready.pid != os.getpid()
        rng = np.random.default_rng(1)
        sent = []
        for i, dt in enumerate([np.float32, np.int16, np.float16, np.float32]):
            pcm = (rng.standard_normal(16000 * (i + 1) // 4) * 1000).astype(dt)  # up to 1 s
            if i == 3:
                pcm = np.ascontiguousarray(np.stack([pcm, -pcm], 1))[:, 0]  # non-contiguous channel
            sent.append((_chunk(pcm, seq=i), pcm.copy()))
            send(out, _chunk(pcm, seq=i), pcm)
        send(out, TextDelta(session="s1", epoch=2, seq=9, text="done"))
        for msg, pcm in sent:
            got, (arr,) = recv(back)
            assert got == msg
            assert arr.dtype == pcm.dtype and arr.tobytes() == pcm.tobytes()
        assert recv(back)[0] == TextDelta(session="s1", epoch=2, seq=9, text="done")
        send(out, Shutdown())
        proc.join(15)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        out.close()
        back.close()
        ctx.term()
