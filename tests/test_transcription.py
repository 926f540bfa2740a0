"""Input transcription by the Thinker (issue 14): the user's committed audio, transcribed by the
same model on its ASR prompt, reaches the client as ``conversation.item.input_audio_transcription.*``.

Oracle, independent of the code under test: transformers' own Thinker ``generate`` (greedy) on the
ASR prompt written out here by hand as Qwen2.5-Omni's chat template renders it (system prompt,
a user turn with ``<|audio_bos|><|AUDIO|>...<|audio_eos|>`` and the instruction) with the same
log-mel features; the random-weight tiny checkpoint makes the text gibberish, so only an exact
match of the tokens says the framing and the decode are right. Through the server (raw
WebSocket, GA and beta shapes) the events must arrive for each committed turn, in order, before
the ``response.done`` of that turn's reply, and none when transcription is off; the split layout
(stage processes) must give the in-process events.
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import torch

from omnistream.encoders.audio import StreamingLogMel, to_mono_16k
from omnistream.encoders.tmrope import audio_block_tokens
from omnistream.engine.scheduler import run_alone
from omnistream.engine.transcribe import transcribe_task
from omnistream.runtime.client import InProcClient, SessionOptions
from omnistream.runtime.workers import ThinkerWorker, decode_rows

pytestmark = pytest.mark.timeout(300)
N_TOKENS = 12  # transcript tokens compared (a random checkpoint rarely stops by itself)
RATE = 24000


def _hf_transcript(ck, mel: torch.Tensor, n: int) -> tuple[str, dict]:
    """transformers' Thinker, greedy, on the ASR prompt (Qwen2.5-Omni's cookbook framing) and ``mel``
    (128, L): the text and the token counts (prompt, audio placeholders, generated without the stop)."""
    tok = ck.tokenizer
    n_audio = sum(audio_block_tokens(mel.shape[1]))
    prompt = ("<|im_start|>system\nYou are a speech recognition model.<|im_end|>\n<|im_start|>user\n"
              "<|audio_bos|>" + "<|AUDIO|>" * n_audio + "<|audio_eos|>Transcribe the audio into text.<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    with torch.inference_mode():
        out = ck.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=mel[None],
                                  feature_attention_mask=torch.ones(1, mel.shape[1], dtype=torch.long),
                                  max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=0)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stop]
    return tok.decode(new, skip_special_tokens=True), {"input_tokens": ids.shape[1], "audio_tokens": n_audio,
                                                       "output_tokens": len(new)}


def _blocks(ck, mel: torch.Tensor) -> list[torch.Tensor]:
    """The audio tower on 200-frame blocks of ``mel``, as the streaming encoder runs it."""
    with torch.inference_mode():
        return [ck.thinker.model.get_audio_features(mel[None, :, s:s + 200],
                                                    torch.ones(1, mel[:, s:s + 200].shape[1], dtype=torch.long))
                .last_hidden_state for s in range(0, mel.shape[1], 200)]


def _speech(seconds: float, seed: int) -> np.ndarray:
    """Int16 PCM at 24 kHz: tones and noise (the random model does not care what it hears)."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * g.standard_normal(t.shape)
    return (x * 32767).astype(np.int16)


def _mel_of(ck, pcm: np.ndarray) -> torch.Tensor:
    """The log-mel the pipeline's front end computes for ``pcm`` (what the Thinker's audio blocks come from)."""
    m = StreamingLogMel(ck.feature_extractor)
    return torch.cat([m.push(to_mono_16k(pcm, RATE)), m.finish()], dim=1)


# ---------------------------------------------------------------------------------- the engine
def test_transcription_equals_transformers_generate(tiny):
    mel = torch.randn(128, 530, generator=torch.Generator().manual_seed(0))  # blocks of 200, 200, 130 frames
    deltas, usage = [], {}
    text = run_alone(transcribe_task(tiny, _blocks(tiny, mel), deltas.append, max_new_tokens=N_TOKENS, usage=usage),
                     {"thinker.decode": decode_rows})
    assert (text, usage) == _hf_transcript(tiny, mel, N_TOKENS) and text.strip()
    assert "".join(deltas) == text and len(deltas) > 1  # streamed as decoded


def test_no_audio_fails_with_a_reason(tiny):
    with pytest.raises(ValueError, match="no audio"):
        run_alone(transcribe_task(tiny, [], print), {"thinker.decode": decode_rows})


def test_conversation_keeps_the_turn_audio_only_when_asked(tiny):
    from omnistream.engine.conversation import Conversation

    mel = torch.randn(128, 260, generator=torch.Generator().manual_seed(1))
    blocks = _blocks(tiny, mel)
    for keep in (False, True):
        c = Conversation(tiny)
        c.keep_audio = keep
        c.begin_turn(audio=True, video=False)
        for b in blocks:
            c.append_audio(b)
        c.end_turn()
        kept = c.take_turn_audio()
        assert len(kept) == (len(blocks) if keep else 0) and c.take_turn_audio() == []
        if keep:
            assert all(torch.equal(a, b) for a, b in zip(kept, blocks))


# ---------------------------------------------------------------------------------- the server
async def _talk(port: int, session: dict, turns: list[np.ndarray], headers=None) -> list[dict]:
    """Commit each turn and ask for a reply; every event the server sends, until the last response.done."""
    import websockets

    events: list[dict] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", additional_headers=headers or {}) as ws:
        async def until(kind):
            while True:
                events.append(json.loads(await ws.recv()))
                assert events[-1]["type"] != "error", events[-1]
                if events[-1]["type"] == kind:
                    return events[-1]

        await ws.send(json.dumps({"type": "session.update", "session": session}))
        await until("session.updated")
        for pcm in turns:
            for i in range(0, len(pcm), 4800):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm[i:i + 4800].tobytes()).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            await until("response.done")
        await asyncio.sleep(0.3)  # nothing else may follow (a late transcript would land here)
        try:
            while True:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 0.2)))
        except TimeoutError:
            pass
    return events


def _serve(client, session, turns, headers=None):
    from omnistream.apps.server import ServerConfig, serving

    async def body():
        cfg = ServerConfig(port=0, defaults=SessionOptions(max_new_tokens=3, max_speech_s=0.2, seed=1))
        async with serving(client, cfg) as server:
            return await _talk(server.port, session, turns, headers)

    return asyncio.run(asyncio.wait_for(body(), 240))


GA = {"type": "realtime", "output_modalities": ["text"],
      "audio": {"input": {"turn_detection": None, "transcription": {"model": "whisper-1"}}}}
TURNS = [_speech(1.5, 0), _speech(2.5, 1)]


def _check_order(events: list[dict], ck) -> list[str]:
    """Per committed turn: deltas adding up to the completed transcript, all before the reply's
    response.done; the transcript equals transformers' on the turn's features. Returns the transcripts."""
    types = [e["type"] for e in events]
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    dones = [i for i, t in enumerate(types) if t == "response.done"]
    assert len(committed) == len(TURNS) == len(dones)
    transcripts = []
    for k, item in enumerate(committed):
        mine = [(i, e) for i, e in enumerate(events) if e["type"].startswith("conversation.item.input_audio_transcr")
                and e["item_id"] == item]
        kinds = [e["type"].rsplit(".", 1)[1] for _, e in mine]
        assert kinds[-1] == "completed" and set(kinds[:-1]) == {"delta"}, kinds
        start = types.index("input_audio_buffer.committed") if k == 0 else dones[k - 1]
        assert all(start < i < dones[k] for i, _ in mine), (k, [i for i, _ in mine], dones)
        text = mine[-1][1]["transcript"]
        assert "".join(e["delta"] for _, e in mine[:-1]) == text and mine[-1][1]["content_index"] == 0
        transcripts.append((text, mine[-1][1]["usage"]))
    pytest.importorskip("openai")  # every event is a valid instance of the official SDK's model
    from test_openai_sdk import _models

    models = _models()
    for e in events:
        if "input_audio_transcription" in e["type"]:
            models[e["type"]].model_validate(e)
    return transcripts


def test_events_per_turn_in_order_before_response_done(tiny):
    events = _serve(InProcClient(tiny), GA, TURNS)
    transcripts = _check_order(events, tiny)
    from omnistream.engine.transcribe import transcript_budget

    for pcm, (text, usage) in zip(TURNS, transcripts):  # the oracle: transformers on the same features
        mel = _mel_of(tiny, pcm)
        ref, n = _hf_transcript(tiny, mel, transcript_budget(sum(audio_block_tokens(mel.shape[1]))))
        assert text == ref and text.strip()
        assert usage == {"type": "tokens", "input_tokens": n["input_tokens"], "output_tokens": n["output_tokens"],
                         "total_tokens": n["input_tokens"] + n["output_tokens"],
                         "input_token_details": {"audio_tokens": n["audio_tokens"],
                                                 "text_tokens": n["input_tokens"] - n["audio_tokens"]}}
    updated = next(e for e in events if e["type"] == "session.updated")
    assert updated["session"]["audio"]["input"]["transcription"]["model"] == "whisper-1"


@pytest.mark.slow
def test_no_events_when_transcription_is_off_and_beta_names(tiny):
    off = {**GA, "audio": {"input": {"turn_detection": None, "transcription": None}}}
    events = _serve(InProcClient(tiny), off, TURNS[:1])
    assert not any("input_audio_transcription" in e["type"] for e in events)
    assert sum(e["type"] == "response.done" for e in events) == 1
    # the transcription runs on its own cache: the reply is the one the session gives without it
    reply = lambda evs: next(e for e in evs if e["type"] == "response.done")["response"]["output"][0]["content"]  # noqa: E731
    on = _serve(InProcClient(tiny), GA, TURNS[:1])
    assert any("input_audio_transcription" in e["type"] for e in on) and reply(on) == reply(events)
    beta = {"modalities": ["text"], "turn_detection": None, "input_audio_transcription": {"model": "gpt-4o-transcribe"}}
    events = _serve(InProcClient(tiny), beta, TURNS[:1], {"OpenAI-Beta": "realtime=v1"})
    kinds = [e["type"] for e in events if "input_audio_transcription" in e["type"]]
    assert kinds[-1] == "conversation.item.input_audio_transcription.completed" and len(kinds) > 1


def test_bad_transcription_settings_are_refused():
    from omnistream.apps.realtime import ProtocolError, parse_session

    for bad, code in (({"audio": {"input": {"transcription": "whisper-1"}}}, "invalid_type"),
                      ({"audio": {"input": {"transcription": {"model": "whisper-1", "speed": 2}}}}, "unknown_parameter"),
                      ({"input_audio_transcription": {"model": 3}}, "invalid_type")):
        with pytest.raises(ProtocolError) as e:
            parse_session(bad)
        assert e.value.code == code, (bad, e.value.code)
    assert parse_session({"input_audio_transcription": {}}).fields["transcription"] == {"model": "omnistream-thinker"}


def test_failed_transcription_event(tiny):
    """A turn without audio (the session asked for transcription too late: no audio was kept) is
    answered with ``...transcription.failed`` and its reason."""
    from omnistream.apps.realtime_events import ServerEvents
    from omnistream.runtime import wire

    sent = []
    w = ThinkerWorker(tiny, lambda dest, msg, *t: sent.append((dest, msg)))
    w.deliver(wire.OpenSession(session="s", epoch=0, options={"transcribe": True}))
    w.deliver(wire.Commit(session="s", epoch=0, text="typed, not spoken", transcribe="item_1"))
    while w.tick():
        pass
    t = [m for d, m in sent if isinstance(m, wire.Transcript)]
    assert len(t) == 1 and t[0].final and "no audio" in t[0].error and t[0].item == "item_1"
    from omnistream.runtime.client import Transcript

    ev = ServerEvents("ga").transcript(Transcript(t[0].item, t[0].text, t[0].final, t[0].error), "item_1")
    assert ev["type"] == "conversation.item.input_audio_transcription.failed" and "no audio" in ev["error"]["message"]


@pytest.mark.slow
@pytest.mark.process
def test_split_layout_gives_the_in_process_events(tiny, tiny_dir):
    from omnistream.runtime.procclient import MultiProcClient

    keep = lambda evs: [(e["type"], e.get("delta"), e.get("transcript")) for e in evs  # noqa: E731
                        if "input_audio_transcription" in e["type"]]
    inproc = _serve(InProcClient(tiny), GA, TURNS)
    split = _serve(MultiProcClient(tiny_dir, "split", hang_timeout_s=300), GA, TURNS)
    _check_order(split, tiny)
    assert keep(split) == keep(inproc)
