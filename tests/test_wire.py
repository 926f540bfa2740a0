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
    Embeds,
    Epoch,
    Error,
    Frame,
    Hello,
    Ping,
    Pong,
    PromptRows,
    Ready,
    Shutdown,
    Step,
    TensorRef,
    TextDelta,
    WireError,
    decode,
    encode,
    hwm_for,
    recv,
    send,
)

PCM = np.linspace(-1, 1, 320, dtype=np.float32)


def _chunk(x, seq=0):
    return AudioChunk(session="s1", epoch=2, seq=seq, sample_rate=16000, pcm=x)


def _same(got, msg) -> bool:
    """Equal type and fields, tensor fields compared bit for bit (struct == would compare arrays elementwise)."""
    torch = pytest.importorskip("torch")
    if type(got) is not type(msg):
        return False
    for f in msg.__struct_fields__:
        a, b = getattr(got, f), getattr(msg, f)
        if isinstance(b, torch.Tensor) or isinstance(a, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b.detach().cpu())):
                return False
        elif isinstance(b, np.ndarray):
            if not (isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                    and a.tobytes() == b.tobytes()):
                return False
        elif a != b:
            return False
    return True


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
    got = decode(frames)
    assert got == msg and type(got) is type(msg)


def _tensor_messages():
    """One of every message type with tensor fields, filled with random data of the dtypes they carry."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    d = 8
    return [
        _chunk(PCM),
        AudioChunk(session="s", epoch=0, seq=1, sample_rate=24000, pcm=rng.integers(-9, 9, (5, 2)).astype(np.int16)),
        Frame(session="s", epoch=1, t_s=0.5, image=rng.integers(0, 255, (6, 4, 3)).astype(np.uint8)),
        Embeds(session="s", epoch=0, kind="audio", embeds=torch.randn(5, d, generator=g)),
        Embeds(session="s", epoch=0, kind="video", embeds=torch.randn(4, d, generator=g).to(torch.bfloat16), grid=[1, 4, 4]),
        PromptRows(session="s", embeds=torch.randn(3, d, generator=g).half(), hidden=torch.randn(3, d, generator=g),
                   positions=torch.arange(9).reshape(3, 3), next_position=9),
        PromptRows(session="s", embeds=torch.zeros(0, d), hidden=torch.zeros(0, d),  # empty rows
                   positions=torch.zeros(3, 0, dtype=torch.int64), next_position=0),
        Step(session="s", epoch=3, token=17, embed=torch.randn(d, generator=g).to(torch.bfloat16),
             hidden=torch.randn(d, generator=g).to(torch.bfloat16)),
    ]


def test_every_tensor_message_round_trips():
    """Each tensor field becomes one frame, in field order, and comes back as the type the field declares
    (wire.Tensor -> torch, wire.Array -> numpy), bit exact; the types with tensor fields are all covered."""
    torch = pytest.importorskip("torch")
    msgs = _tensor_messages()
    covered = {type(m) for m in msgs}
    assert covered == {c for c, fields in wire._TENSOR_FIELDS.items() if fields}
    for msg in msgs:
        fields = [f for f in msg.__struct_fields__ if isinstance(getattr(msg, f), (np.ndarray, torch.Tensor))]
        frames = encode(msg)
        assert len(frames) == 1 + len(fields)
        header = msgspec.msgpack.decode(frames[0])  # the header names each tensor's frame: [dtype, shape, frame]
        assert [header[f][2] for f in fields] == list(range(1, len(fields) + 1))
        for copy in (False, True):
            got = decode([zmq.Frame(bytes(f)) for f in frames], copy=copy)
            assert _same(got, msg), type(msg).__name__
            for f in fields:
                want = torch.Tensor if isinstance(getattr(msg, f), torch.Tensor) else np.ndarray
                assert isinstance(getattr(got, f), want)


def test_round_trip_audio_chunk():
    msg = _chunk(PCM)
    got = decode([bytes(f) for f in encode(msg)])
    assert got.session == "s1" and got.seq == 0 and isinstance(got.pcm, np.ndarray)
    np.testing.assert_array_equal(got.pcm, PCM)


DTYPE_CASES = [
    (np.float32, (2, 3)), (np.float16, (5,)), (np.int16, (4, 1, 2)), (np.int32, (7,)),
    (np.int64, (3, 3)), (np.uint8, (0,)), (np.bool_, (2, 2)), (np.float32, ()), (np.int16, (0, 4)),
]


@pytest.mark.parametrize("dtype,shape", DTYPE_CASES)
def test_dtypes_bit_exact_and_zero_copy(dtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 100).astype(dtype) if shape else np.array(1.5, dtype)
    frames = encode(_chunk(x))
    # encode is zero-copy: the tensor frame aliases the caller's array
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), x) or x.size == 0
    recv_frames = [zmq.Frame(bytes(f)) for f in frames]  # what recv_multipart(copy=False) yields
    arr = decode(recv_frames, copy=False).pcm
    assert arr.dtype == np.dtype(dtype) and arr.shape == shape
    assert arr.tobytes() == x.tobytes()  # bit exact (NaN-safe)
    if x.size:
        assert np.shares_memory(arr, np.frombuffer(recv_frames[1].buffer, np.uint8))
        assert not arr.flags.writeable
    owned = decode(recv_frames, copy=True).pcm
    assert owned.flags.writeable and owned.tobytes() == x.tobytes()
    if x.size:
        assert not np.shares_memory(owned, np.frombuffer(recv_frames[1].buffer, np.uint8))


def test_torch_tensors_and_bfloat16():
    """Torch tensors of every dtype in a Tensor field come back as torch (bfloat16 restored from its raw
    words), sharing the received frame's memory; a tensor in an Array field arrives as numpy."""
    torch = pytest.importorskip("torch")
    for t in [torch.randn(4, 6), torch.randn(3, 5).to(torch.bfloat16), torch.arange(10, dtype=torch.int64),
              torch.randn(2, 3, requires_grad=True), torch.randn(7).half(), torch.tensor(True),
              torch.zeros(0, 3, dtype=torch.bfloat16)]:
        frames = [zmq.Frame(bytes(f)) for f in encode(Step(session="s", epoch=0, token=1, embed=t, hidden=t.reshape(-1)))]
        back = decode(frames).embed
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t.detach())
        if t.numel():  # zero-copy: the tensor is a view of the received frame
            assert np.shares_memory(back.reshape(-1).view(torch.uint8).numpy(), np.frombuffer(frames[1].buffer, np.uint8))
    t = torch.randn(2, 2)
    assert np.shares_memory(np.frombuffer(encode(_chunk(t))[1], np.uint8), t.numpy())
    assert isinstance(decode(encode(_chunk(t))).pcm, np.ndarray)
    words = decode(encode(_chunk(t.to(torch.bfloat16)))).pcm  # an Array field keeps bfloat16 as its raw words
    assert words.dtype == np.uint16 and torch.equal(torch.from_numpy(words.astype(np.int16)).view(torch.bfloat16),
                                                    t.to(torch.bfloat16))


def test_to_cpu_moves_only_device_tensors():
    torch = pytest.importorskip("torch")
    msg = Step(session="s", epoch=0, token=1, embed=torch.randn(4), hidden=torch.randn(4))
    assert wire.to_cpu(msg) is msg  # nothing to move: the same struct, no copies
    assert wire.to_cpu(Ping(seq=1, t=0.0)) == Ping(seq=1, t=0.0)
    meta = Step(session="s", epoch=0, token=1, embed=torch.randn(4), hidden=torch.empty(4, device="meta"))
    with pytest.raises(WireError, match="move it to CPU"):  # encode never syncs a device behind the caller's back
        encode(meta)
    if not torch.cuda.is_available():
        pytest.skip("moving a device tensor needs CUDA")
    gpu = Step(session="s", epoch=0, token=1, embed=torch.randn(4), hidden=torch.randn(4, device="cuda"))
    moved = wire.to_cpu(gpu)
    assert moved.hidden.device.type == "cpu" and moved.embed is gpu.embed and gpu.hidden.device.type == "cuda"
    assert torch.equal(decode(encode(moved)).hidden, gpu.hidden.cpu())


def test_non_contiguous_inputs():
    torch = pytest.importorskip("torch")
    x = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]  # strided view
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(decode(encode(_chunk(x))).pcm, x)
    t = torch.arange(12.0).reshape(3, 4).t()
    np.testing.assert_array_equal(decode(encode(_chunk(t))).pcm, t.numpy())
    big = np.arange(6, dtype=">i4")  # big-endian converts to the little-endian wire format
    arr = decode(encode(_chunk(big))).pcm
    assert arr.dtype == np.dtype("<i4") and arr.tolist() == list(range(6))


def test_encode_rejects_what_cannot_travel():
    torch = pytest.importorskip("torch")
    with pytest.raises(WireError, match=r"\['pcm'\] must hold"):
        encode(AudioChunk(session="s", epoch=0, seq=0, sample_rate=8000, pcm=[0.0, 1.0]))
    with pytest.raises(WireError, match="outside its tensor fields"):
        encode(Pong(seq=1, t=0.0, stage="x", stats={"pcm": PCM}))
    with pytest.raises(WireError, match="unsupported dtype"):
        encode(_chunk(PCM.astype(np.float64)))
    with pytest.raises(WireError, match="cannot send"):
        encode(_chunk(object()))
    with pytest.raises(WireError, match="cannot send"):
        encode(_chunk(torch.zeros(2, dtype=torch.float8_e4m3fn)))  # (numpy has no such dtype)
    with pytest.raises(WireError, match="not a wire message"):
        encode(TensorRef(dtype="float32", shape=[1], frame=1))


def test_decode_errors_are_clear():
    header = encode(_chunk(PCM))[0]
    rows = PromptRows(session="s", embeds=PCM.reshape(20, 16), hidden=PCM.reshape(20, 16),
                      positions=np.zeros((3, 20), np.int64), next_position=20)
    rows_frames = encode(rows)
    twice = msgspec.msgpack.encode({"type": "PromptRows", "session": "s", "next_position": 0,
                                    **{f: ["float32", [320], 1] for f in ("embeds", "hidden", "positions")}})
    cases = {
        "undecodable": [b"\xc1\xc1garbage"],
        "unknown message tag": [msgspec.msgpack.encode({"type": "Bogus"})],
        "invalid message": [msgspec.msgpack.encode({"type": "Ping", "seq": "one", "t": 0.0})],
        "only 0 tensor": [header],
        "needs 1280": [header, b"\0" * 1279],  # wrong byte count
        "frame 2: 480 bytes": [rows_frames[0], rows_frames[1], rows_frames[3], rows_frames[2]],  # swapped frames
        "not referenced": [encode(Shutdown())[0], b"abc"],  # unreferenced frame
        "more than one": [twice, PCM.tobytes(), PCM.tobytes(), PCM.tobytes()],
        "bad tensor header": [msgspec.msgpack.encode({"type": "AudioChunk", "session": "s", "epoch": 0, "seq": 0,
                                                      "sample_rate": 8000, "pcm": ["float64", [320], 1]}),
                              PCM.astype(np.float64).tobytes()],  # bad dtype
        "list of frames": b"raw",
        "empty": [],
    }
    for needle, frames in cases.items():
        with pytest.raises(WireError, match=needle):
            decode(frames)


def test_oversize_rejected():
    x = np.zeros(1024, np.uint8)
    frames = encode(_chunk(x))
    with pytest.raises(WireError, match="> max 1000"):
        decode(frames, max_bytes=1000)
    big = np.zeros(MAX_MESSAGE_BYTES, np.uint8)  # 15 MiB payload + header > default limit
    with pytest.raises(WireError, match="max"):
        encode(_chunk(big))
    with pytest.raises(WireError, match="max"):
        decode([encode(_chunk(big), max_bytes=2 * MAX_MESSAGE_BYTES)[0], big.data])


def test_protocol_mismatch_rejected():
    for cls in (Hello, Ready):
        frames = encode(cls(stage="enc", pid=1, protocol=PROTOCOL_VERSION + 1))
        with pytest.raises(WireError, match="protocol"):
            decode(frames)
        assert decode(frames, check_protocol=False).protocol == PROTOCOL_VERSION + 1


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
        msg = decode(frames)
    except WireError:
        return
    assert isinstance(msg, wire._Msg)
    for f, as_torch in wire._TENSOR_FIELDS[type(msg)]:  # every tensor field was rebuilt from its frame
        assert type(getattr(msg, f)).__name__ == ("Tensor" if as_torch else "ndarray")


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
@given(tag=st.sampled_from(["AudioChunk", "Frame", "Hello", "Ping", "Epoch", "Nope", 3]),
       dtype=st.one_of(st.sampled_from(sorted(wire.DTYPES)), st.text(max_size=5)),
       shape=st.one_of(st.lists(st.integers(-3, 2**41), max_size=20), _value),
       frame=st.one_of(st.integers(-2, 4), _value),
       extra=st.dictionaries(st.sampled_from(["seq", "epoch", "session", "sample_rate", "protocol", "t"]),
                             _value, max_size=4),
       payloads=st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_structured(tag, dtype, shape, frame, extra, payloads):
    obj = {"type": tag, "session": "s", "epoch": 0, "seq": 0, "sample_rate": 8000, "stage": "a",
           "pid": 1, "protocol": 1, "t": 0.0, "t_s": 0.0, "pcm": [dtype, shape, frame], "image": [dtype, shape, frame]}
    obj.update(extra)
    _only_wire_error([msgspec.msgpack.encode(obj), *payloads])


_header = st.tuples(st.sampled_from(sorted(wire.DTYPES)), st.lists(st.integers(0, 3), max_size=2),
                    st.integers(0, 4)).map(list)  # small: some of them match the payloads


@FUZZ
@given(tag=st.sampled_from(["Step", "PromptRows", "Embeds"]), headers=st.lists(st.one_of(_header, _value), min_size=3,
                                                                                max_size=3),
       payloads=st.lists(st.binary(max_size=24), max_size=4))
def test_fuzz_several_tensor_fields(tag, headers, payloads):
    """Messages with several (torch) tensor fields: shared, missing, out-of-range frames and wrong sizes."""
    obj = {"type": tag, "session": "s", "epoch": 0, "token": 1, "kind": "audio", "next_position": 0,
           "embed": headers[0], **dict(zip(("embeds", "hidden", "positions"), headers))}
    if tag == "Step":
        obj["hidden"] = headers[1]
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
        msg = recv(pull)
        if isinstance(msg, Shutdown):
            break
        send(push, msg)  # zero-copy forward of the received frame memory
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
        ready = recv(back)
        assert isinstance(ready, Ready) and ready.pid == proc.pid and ready.pid != os.getpid()
        rng = np.random.default_rng(1)
        sent = []
        for i, dt in enumerate([np.float32, np.int16, np.float16, np.float32]):
            pcm = (rng.standard_normal(16000 * (i + 1) // 4) * 1000).astype(dt)  # up to 1 s
            if i == 3:
                pcm = np.ascontiguousarray(np.stack([pcm, -pcm], 1))[:, 0]  # non-contiguous channel
            sent.append((i, pcm.copy()))
            send(out, _chunk(pcm, seq=i))
        send(out, TextDelta(session="s1", epoch=2, seq=9, text="done"))
        for i, pcm in sent:
            got = recv(back)
            assert _same(got, _chunk(pcm, seq=i))
        assert recv(back) == TextDelta(session="s1", epoch=2, seq=9, text="done")
        send(out, Shutdown())
        proc.join(15)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        out.close()
        back.close()
        ctx.term()
