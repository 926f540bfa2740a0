"""The Realtime protocol layer without a server: client event parsing and validation, server
event names per dialect, pcm16/image codecs, server VAD against silero's own offline segmenter,
and a hypothesis fuzz of the parser (any input: a typed event or a clean ProtocolError)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnistream.apps.realtime import (
    AudioAppend,
    ItemCreate,
    ItemTruncate,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    decode_image,
    decode_pcm16,
    parse_client_event,
)
from omnistream.apps.realtime_events import ServerEvents, encode_pcm16


def parse(ev) -> object:
    return parse_client_event(json.dumps(ev))


def code_of(ev) -> str:
    with pytest.raises(ProtocolError) as e:
        parse_client_event(ev if isinstance(ev, str | bytes) else json.dumps(ev))
    return e.value.code


# ---------------------------------------------------------------------------------- client events
def test_session_update_ga_shape():
    ev = parse({"type": "session.update", "event_id": "e9", "session": {
        "type": "realtime", "model": "gpt-realtime", "instructions": "be brief", "output_modalities": ["audio"],
        "max_output_tokens": 12,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "noise_reduction": None,
                            "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 300,
                                               "prefix_padding_ms": 100, "create_response": False,
                                               "interrupt_response": True}},
                  "output": {"format": {"type": "audio/pcm"}, "voice": "marin"}}}})
    assert isinstance(ev, SessionUpdate) and ev.event_id == "e9" and ev.patch.dialect == "ga"
    cfg = ev.patch.apply(SessionConfig())
    assert cfg.instructions == "be brief" and cfg.audio_out and cfg.voice == "marin" and cfg.max_output_tokens == 12
    td = cfg.turn_detection
    assert (td.threshold, td.silence_duration_ms, td.prefix_padding_ms, td.create_response) == (0.6, 300, 100, False)
    # partial updates keep the rest; null turn detection means manual commits
    cfg2 = parse({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "turn_detection": None}}}}).patch.apply(cfg)
    assert cfg2.turn_detection is None and cfg2.instructions == "be brief"


def test_session_update_beta_shape():
    ev = parse({"type": "session.update", "session": {
        "modalities": ["text"], "voice": "Ethan", "input_audio_format": "pcm16", "output_audio_format": "pcm16",
        "turn_detection": {"type": "server_vad"}, "temperature": 0.7, "max_response_output_tokens": "inf",
        "input_audio_transcription": None, "tools": []}})
    assert ev.patch.dialect == "beta"
    cfg = ev.patch.apply(SessionConfig(max_output_tokens=5))
    assert not cfg.audio_out and cfg.voice == "Ethan" and cfg.temperature == 0.7 and cfg.max_output_tokens is None


@pytest.mark.parametrize("session,code", [
    ({"input_audio_format": "g711_ulaw"}, "unsupported_audio_format"),
    ({"output_audio_format": "pcm24"}, "unsupported_audio_format"),
    ({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "unsupported_audio_format"),
    ({"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
     "unsupported_audio_format"),
    ({"type": "transcription"}, "invalid_value"),
    ({"nope": 1}, "unknown_parameter"),
    ({"type": "realtime", "audio": {"input": {"nope": 1}}}, "unknown_parameter"),
    ({"turn_detection": {"type": "semantic_vad"}}, "unsupported_feature"),
    ({"turn_detection": {"type": "server_vad", "silence_duration_ms": -1}}, "invalid_value"),
    ({"turn_detection": {"type": "server_vad", "create_response": "yes"}}, "invalid_type"),
    ({"turn_detection": "on"}, "invalid_type"),
    ({"output_modalities": []}, "invalid_value"),
    ({"modalities": ["video"]}, "invalid_value"),
    ({"max_output_tokens": 0}, "invalid_value"),
    ({"max_output_tokens": True}, "invalid_value"),
    ({"temperature": 9}, "invalid_value"),
    ({"instructions": 5}, "invalid_type"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "invalid_value"),
    ([], "invalid_type"),
])
def test_session_update_errors(session, code):
    assert code_of({"type": "session.update", "event_id": "x", "session": session}) == code


def test_audio_append_and_codec_round_trip():
    pcm = (np.sin(np.arange(960) / 7) * 20000).astype(np.int16)
    ev = parse({"type": "input_audio_buffer.append", "audio": encode_pcm16(pcm)})
    assert isinstance(ev, AudioAppend) and ev.pcm.dtype == np.int16 and np.array_equal(ev.pcm, pcm)
    # little-endian on the wire whatever the host: bytes 0x01 0x02 are the sample 0x0201
    assert decode_pcm16(base64.b64encode(b"\x01\x02").decode()).tolist() == [0x0201]
    f = np.array([0.0, 0.5, -1.0, 2.0], np.float32)  # float PCM is clipped and scaled
    assert decode_pcm16(encode_pcm16(f)).tolist() == [0, 16384, -32767, 32767]
    assert code_of({"type": "input_audio_buffer.append", "audio": "a b"}) == "invalid_base64"
    assert code_of({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"123").decode()}) == \
        "invalid_audio_format"
    assert code_of({"type": "input_audio_buffer.append", "audio": 5}) == "invalid_type"


def _data_url(img: np.ndarray, fmt: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_item_create_with_images_text_and_audio():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(np.linspace(0, 255, 12, dtype=np.uint8)[None, :, None], 8, 0), 3, 2)
    ev = parse({"type": "conversation.item.create", "previous_item_id": None, "item": {
        "id": "item_1", "type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": _data_url(img, "PNG")},
            {"type": "input_image", "image_url": _data_url(smooth, "JPEG")},
            {"type": "input_text", "text": "what"}, {"type": "input_text", "text": "is this"},
            {"type": "input_audio", "audio": encode_pcm16(np.arange(4, dtype=np.int16))}]}})
    assert isinstance(ev, ItemCreate) and ev.item_id == "item_1" and ev.text == "what\nis this"
    assert np.array_equal(ev.images[0], img)  # PNG is lossless
    assert ev.images[1].shape == (8, 12, 3) and np.abs(ev.images[1].astype(int) - smooth).max() <= 8  # JPEG
    assert ev.audio.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("url,code", [
    ("http://example.com/cat.png", "invalid_image"),
    ("data:image/gif;base64,R0lGODlh", "invalid_image"),
    ("data:image/png;base64,!!", "invalid_base64"),
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode(), "invalid_image"),
    ("data:image/jpeg;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(), "invalid_image"),
    (7, "invalid_type"),
])
def test_bad_images(url, code):
    with pytest.raises(ProtocolError) as e:
        decode_image(url)
    assert e.value.code == code


def test_size_limits_before_decoding():
    """Images over the pixel or byte limit, items over the text or image-count limit and long
    instructions are ``input_too_large``; the pixel check reads the header only."""
    from omnistream.apps.limits import SessionLimits

    url = _data_url(np.zeros((64, 64, 3), np.uint8), "PNG")
    assert decode_image(url, limits=SessionLimits(max_image_pixels=64 * 64)).shape == (64, 64, 3)
    for lim in (SessionLimits(max_image_pixels=64 * 63), SessionLimits(max_image_bytes=16)):
        with pytest.raises(ProtocolError) as e:
            decode_image(url, limits=lim)
        assert e.value.code == "input_too_large"
    lim = SessionLimits(max_text_chars=10, max_item_images=1, max_instructions_chars=5)
    text = {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "x" * 6}, {"type": "input_text", "text": "y" * 5}]}}
    images = {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": url}] * 2}}
    for ev in (text, images, {"type": "session.update", "session": {"instructions": "abcdef"}}):
        with pytest.raises(ProtocolError) as e:
            parse_client_event(json.dumps(ev), lim)
        assert e.value.code == "input_too_large", ev
    assert parse_client_event(json.dumps(text)).text == "xxxxxx\nyyyyy"  # the default limits take it


@pytest.mark.parametrize("item,code", [
    (None, "missing_required_parameter"),
    ({"type": "function_call"}, "unsupported_item"),
    ({"type": "message", "role": "tool", "content": [{"type": "input_text", "text": "x"}]}, "unsupported_item"),
    ({"type": "message", "role": "user", "content": []}, "missing_required_parameter"),
    ({"type": "message", "role": "user", "content": ["hi"]}, "invalid_type"),
    ({"type": "message", "role": "user", "content": [{"type": "input_file"}]}, "invalid_value"),
    ({"type": "message", "role": "user", "content": [{"type": "input_text"}]}, "invalid_type"),
    ({"type": "message", "role": "user", "id": "", "content": [{"type": "input_text", "text": "x"}]},
     "invalid_value"),
])
def test_bad_items(item, code):
    assert code_of({"type": "conversation.item.create", "item": item}) == code


def test_other_client_events():
    assert isinstance(parse({"type": "input_audio_buffer.commit"}), object)
    t = parse({"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0, "audio_end_ms": 1500})
    assert isinstance(t, ItemTruncate) and (t.item_id, t.audio_end_ms) == ("item_a", 1500)
    assert code_of({"type": "conversation.item.truncate", "item_id": "a", "audio_end_ms": -5}) == "invalid_value"
    assert code_of({"type": "conversation.item.truncate", "audio_end_ms": 5}) == "missing_required_parameter"
    r = parse({"type": "response.create", "response": {"output_modalities": ["audio"], "max_output_tokens": 9}})
    assert isinstance(r, ResponseCreate) and r.max_output_tokens == 9
    assert parse({"type": "response.create", "response": {"conversation": "none"}}).out_of_band
    assert code_of({"type": "response.create", "response": {"input": []}}) == "unsupported_feature"
    assert code_of({"type": "response.create", "response": "now"}) == "invalid_type"
    c = parse({"type": "response.cancel", "response_id": "resp_1"})
    assert isinstance(c, ResponseCancel) and c.response_id == "resp_1"
    assert code_of({"type": "conversation.item.delete"}) == "missing_required_parameter"
    assert code_of({"type": "output_audio_buffer.clear"}) == "unsupported_event"
    assert code_of({"type": "what.ever"}) == "unknown_event_type"
    assert code_of({"type": 3}) == "missing_required_parameter"
    assert code_of({"type": "response.cancel", "event_id": 5}) == "invalid_value"
    assert code_of("[" * 100_000) == "invalid_json"  # nesting bombs are a clean error
    assert code_of(b"\x00") == "invalid_event"
    assert code_of("null") == "invalid_event"


# ---------------------------------------------------------------------------------- server events
def test_server_event_names_per_dialect():
    ga, beta = ServerEvents("ga"), ServerEvents("beta")
    pairs = {"response.output_audio.delta": "response.audio.delta",
             "response.output_text.delta": "response.text.delta",
             "response.output_audio_transcript.delta": "response.audio_transcript.delta",
             "response.output_audio.done": "response.audio.done",
             "response.output_audio_transcript.done": "response.audio_transcript.done",
             "response.output_text.done": "response.text.done",
             "response.done": "response.done", "input_audio_buffer.speech_started": "input_audio_buffer.speech_started"}
    for g, b in pairs.items():
        assert ga.event(g)["type"] == g and beta.event(g)["type"] == b
    ids = [ga.event("x")["event_id"] for _ in range(3)]
    assert len(set(ids)) == 3
    err = ga.error(ProtocolError("invalid_json", "bad", None, "ev_1"))
    assert err["type"] == "error" and err["error"] == {"type": "invalid_request_error", "code": "invalid_json",
                                                       "message": "bad", "param": None, "event_id": "ev_1"}
    s_ga = ga.session("sess_1", SessionConfig(), "Chelsie", 8)
    s_beta = beta.session("sess_1", SessionConfig(), "Chelsie", 8)
    assert s_ga["audio"]["output"]["voice"] == "Chelsie" and s_ga["output_modalities"] == ["audio"]
    assert s_beta["voice"] == "Chelsie" and s_beta["modalities"] == ["text", "audio"]
    assert ga.part(True)["type"] == beta.part(True)["type"] == "audio"
    assert ga.assistant_item("i", "completed", True, "x")["content"][0]["type"] == "output_audio"
    assert beta.assistant_item("i", "completed", True, "x")["content"][0]["type"] == "audio"


def test_server_events_validate_against_the_openai_sdk_models():
    """Every GA server event the builder makes parses as the official SDK's pydantic model."""
    rt = pytest.importorskip("openai.types.realtime")
    import typing

    models = {}  # event type -> the SDK's model for it (the union is not discriminated: precise errors)
    for m in typing.get_args(typing.get_args(rt.RealtimeServerEvent)[0]):
        for t in typing.get_args(m.model_fields["type"].annotation):
            models[t] = m
    ev = ServerEvents("ga")
    ids = {"response_id": "resp_1", "item_id": "item_1", "output_index": 0, "content_index": 0}
    item = ev.assistant_item("item_1", "completed", True, "hi")
    events = [
        ev.event("session.created", session=ev.session("s", SessionConfig(), "Chelsie", None)),
        ev.event("session.updated", session=ev.session("s", SessionConfig(turn_detection=None), None, 5)),
        ev.event("input_audio_buffer.speech_started", audio_start_ms=10, item_id="item_0"),
        ev.event("input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="item_0"),
        ev.event("input_audio_buffer.committed", item_id="item_0", previous_item_id=None),
        ev.event("input_audio_buffer.cleared"),
        ev.event("conversation.item.created", previous_item_id=None,
                 item=ev.user_item("item_0", [{"type": "input_audio", "transcript": None}])),
        ev.event("response.created", response=ev.response("resp_1", "in_progress", True, "Chelsie")),
        ev.event("response.output_item.added", response_id="resp_1", output_index=0, item=item),
        ev.event("response.content_part.added", **ids, part=ev.part(True)),
        ev.event("response.output_audio.delta", **ids, delta=encode_pcm16(np.zeros(4, np.int16))),
        ev.event("response.output_audio_transcript.delta", **ids, delta="h"),
        ev.event("response.output_text.delta", **ids, delta="h"),
        ev.event("response.output_audio.done", **ids),
        ev.event("response.output_audio_transcript.done", **ids, transcript="hi"),
        ev.event("response.output_text.done", **ids, text="hi"),
        ev.event("response.content_part.done", **ids, part=ev.part(True, "hi")),
        ev.event("response.output_item.done", response_id="resp_1", output_index=0, item=item),
        ev.event("conversation.item.truncated", item_id="item_1", content_index=0, audio_end_ms=40),
        ev.event("response.done", response=ev.response("resp_1", "cancelled", True, "Chelsie", [item],
                                                       {"type": "cancelled", "reason": "turn_detected"},
                                                       {"total_tokens": 3, "input_tokens": 0, "output_tokens": 3})),
        ev.error(ProtocolError("invalid_json", "bad")),
    ]
    for e in events:
        assert models[e["type"]].model_validate(e).type == e["type"]


# ---------------------------------------------------------------------------------- server VAD
@pytest.fixture(scope="module")
def speech():
    """0.5 s silence + the espeak-ng "hello" clip + 1 s silence, int16 at 24 kHz."""
    from omnistream.encoders.audio import PolyphaseResampler
    from omnistream.encoders.media import read_audio

    pcm, rate = read_audio("omnistream/assets/hello.flac")
    r = PolyphaseResampler(rate, 24000)
    x = np.concatenate([r.push(pcm.mean(axis=1)), r.flush()])
    x = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    return np.concatenate([np.zeros(12000, np.int16), x, np.zeros(24000, np.int16)])


def test_vad_matches_silero_offline_segmentation(speech):
    """Streaming decisions equal silero's own get_speech_timestamps on the same 16 kHz samples."""
    silero = pytest.importorskip("silero_vad")
    import torch

    from omnistream.apps.vad import ServerVad, load_model
    from omnistream.encoders.audio import PolyphaseResampler

    vad = ServerVad(threshold=0.5, silence_duration_ms=500, prefix_padding_ms=300)
    events = []
    rng = np.random.default_rng(0)
    i = 0
    while i < len(speech):  # pieces of random sizes, as a network delivers them
        n = int(rng.integers(1, 3000))
        events += vad.push(speech[i:i + n])
        i += n
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
    y = PolyphaseResampler(24000, 16000).push(speech.astype(np.float32) / 32768)
    (seg,) = silero.get_speech_timestamps(torch.from_numpy(y), load_model(), threshold=0.5,
                                          min_silence_duration_ms=500, speech_pad_ms=0, min_speech_duration_ms=0)
    assert events[0].ms == seg["start"] * 1000 // 16000 - 300  # prefix padding before the detected start
    # stop: the silence was confirmed silence_duration_ms after the segment's end (one 32 ms window of slack)
    assert 0 <= events[1].ms - 500 - seg["end"] * 1000 // 16000 <= 32


def test_vad_silence_and_reset(speech):
    from omnistream.apps.vad import ServerVad

    vad = ServerVad()
    assert vad.push(np.zeros(48000, np.int16)) == []
    ev = vad.push(speech[: len(speech) // 2])  # speech begins, not yet over
    assert [e.kind for e in ev] == ["speech_started"] and vad.in_speech
    vad.reset()  # input_audio_buffer.clear
    assert not vad.in_speech
    ev = vad.push(np.zeros(48000, np.int16))
    assert ev == []  # no stop for a cleared turn
    ev = vad.push(speech)
    assert [e.kind for e in ev] == ["speech_started", "speech_stopped"]
    assert ev[0].ms >= 2000 + (48000 + len(speech) // 2) * 1000 // 24000 - 300  # the clock kept counting


def test_input_buffer_hands_out_exactly_the_detected_speech(speech):
    """InputBuffer (appends of random sizes, server VAD): the turn audio it hands out is exactly
    the appended samples from audio_start_ms to audio_end_ms (sliced here from the whole clip)."""
    from omnistream.apps.input_buffer import InputBuffer
    from omnistream.apps.realtime import TurnDetection
    from omnistream.apps.vad import ServerVad

    buf, td = InputBuffer(), TurnDetection()
    buf.set_vad(ServerVad(td.threshold, td.silence_duration_ms, td.prefix_padding_ms))
    pcm = np.concatenate([np.zeros(24000, np.int16), speech])  # 1 s of silence more before it
    steps, rng, i = [], np.random.default_rng(1), 0
    while i < len(pcm):
        n = int(rng.integers(1, 5000))
        steps += buf.append(pcm[i:i + n], td)
        i += n
    kinds = [x.kind for x in steps if x.kind != "audio"]
    assert kinds == ["speech_started", "speech_stopped"]
    start, stop = (x.ms * 24 for x in steps if x.kind != "audio")
    got = np.concatenate([x.pcm for x in steps if x.kind == "audio"])
    assert np.array_equal(got, pcm[start:stop])
    assert len(buf.hist) <= (td.prefix_padding_ms + 300) * 24 + 5000  # idle: only the padding is kept


# ---------------------------------------------------------------------------------- fuzz
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=20)
_types = st.sampled_from(["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                          "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
                          "response.create", "response.cancel", "conversation.item.delete", "x"])
_b64ish = st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=30))
_part = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["input_text", "input_image", "input_audio", "text", "output_text", 3]),
    "text": _json, "audio": _b64ish,
    "image_url": st.one_of(_b64ish.map(lambda s: "data:image/png;base64," + s),
                           st.binary(max_size=80).map(lambda b: "data:image/png;base64," + base64.b64encode(
                               b"\x89PNG\r\n\x1a\n" + b).decode()),
                           _json)})
_session = st.fixed_dictionaries({}, optional={
    k: _json for k in ("type", "model", "instructions", "output_modalities", "modalities", "voice",
                       "input_audio_format", "turn_detection", "temperature", "max_output_tokens", "tools", "zz")
} | {"audio": st.fixed_dictionaries({}, optional={
    "input": st.fixed_dictionaries({}, optional={"format": _json, "turn_detection": st.one_of(
        _json, st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["server_vad", "semantic_vad"]), "threshold": _json,
            "silence_duration_ms": _json, "create_response": _json}))}),
    "output": st.fixed_dictionaries({}, optional={"voice": _json, "format": _json})})})
_event = st.fixed_dictionaries({"type": _types}, optional={
    "event_id": _json, "session": st.one_of(_session, _json), "audio": _b64ish,
    "item": st.one_of(_json, st.fixed_dictionaries({"type": st.just("message"), "role": st.just("user"),
                                                     "content": st.lists(_part, max_size=3)})),
    "item_id": _json, "audio_end_ms": _json, "content_index": _json, "response": _json, "response_id": _json})


def _check(raw) -> None:
    try:
        ev = parse_client_event(raw)
    except ProtocolError as e:
        assert isinstance(e.code, str) and e.code and isinstance(e.message, str)
        json.dumps(ServerEvents().error(e))  # the error event always serialises
        return
    if isinstance(ev, SessionUpdate):
        cfg = ev.patch.apply(SessionConfig())
        json.dumps(ServerEvents().session("s", cfg, cfg.voice, cfg.max_output_tokens))


@pytest.mark.slow  # 400 examples, ~2.7 s (make test runs it)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_event)
def test_fuzz_event_shaped(ev):
    _check(json.dumps(ev))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), _json.map(json.dumps)))
def test_fuzz_arbitrary_messages(raw):
    _check(raw)
