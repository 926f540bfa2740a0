"""The same client-level cases against the in-process client and the multi-process one
(``all-in-one``: one stage process; ``split``: encoders, thinker, talker, token2wav in four).

Oracles: replies are greedy, so the multi-process replies must equal the in-process ones
token for token; a cleared turn must leave the conversation exactly as if it never happened;
concurrent sessions must give the replies each gives alone; truncation keeps
``ceil(played / 480)`` reply tokens. Each client is started once per module (a stage process
costs an interpreter and a checkpoint load).
"""

from __future__ import annotations

import asyncio
import math
import os

import numpy as np
import pytest

from omnistream.runtime.client import (
    AudioDelta,
    ClientError,
    InProcClient,
    ResponseDone,
    SessionOptions,
    TextDelta,
)
from omnistream.runtime.procclient import MultiProcClient

# seeded: an unseeded random Talker can end a reply before its first code
VOICE = SessionOptions(voice="Chelsie", max_new_tokens=8, max_speech_s=1.0, seed=0)
TEXT = SessionOptions(max_new_tokens=8)
# stage processes cost seconds each to start, and the tiny Token2Wav is slow on a loaded CPU
# inproc-speech-thread is what serve runs on a CPU (Token2Wav on its own engine thread); the one-thread
# engine is what most other in-process tests run, so make test-fast leaves its copy here out
KINDS = [pytest.param("inproc", marks=pytest.mark.slow), "inproc-speech-thread",
         pytest.param("all-in-one", marks=pytest.mark.slow), pytest.param("split", marks=pytest.mark.slow)]


def speech(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Deterministic voice-like noise: a few harmonics under an envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in (1, 2, 3))
    return (0.2 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


class Runner:
    """A started client and the event loop it lives on (module scope: tests share both)."""

    def __init__(self, client):
        self.client = client
        self.loop = asyncio.new_event_loop()
        self.run(client.start())

    def run(self, coro, timeout: float = 600):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self):
        self.run(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module", params=KINDS)
def cl(request, tiny_dir):
    if request.param.startswith("inproc"):  # Token2Wav on its own engine thread, as serve runs it on a CPU
        from omnistream.checkpoints import load_omni

        client = InProcClient(load_omni(tiny_dir), speech_thread=request.param == "inproc-speech-thread")
    else:  # generous hang timeout: a DiT chunk of the tiny model can take seconds on a loaded CI box
        client = MultiProcClient(tiny_dir, request.param, hang_timeout_s=300)
    r = Runner(client)
    r.kind = request.param
    yield r
    r.close()
    if not request.param.startswith("inproc"):  # its private ipc:// directory goes with it
        assert not os.path.exists(client.run_dir)


async def reply(c, sid):
    """All events of one respond()."""
    return [ev async for ev in c.respond(sid)]


def summary(events):
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    pcm = [e.pcm for e in events if isinstance(e, AudioDelta)]
    return text, pcm, events[-1]


async def push_speech(c, sid, pcm, rate=16000, piece_s=0.04):
    step = int(rate * piece_s)
    for i in range(0, len(pcm), step):
        await c.push_audio(sid, pcm[i : i + step], rate)


async def conversation(c):
    """A fixed two-session script: text turn, audio turn, audio+video turn; returns reply texts."""
    from omnistream.encoders.vision import synthetic_frames

    out = []
    sid = await c.open_session(TEXT)
    await c.commit(sid, "hello there")
    out.append(summary(await reply(c, sid))[0])
    await push_speech(c, sid, speech(2.5))
    await c.commit(sid)
    out.append(summary(await reply(c, sid))[0])
    sid2 = await c.open_session(TEXT)
    pcm = speech(2.2, seed=1)
    frames = list(synthetic_frames(5, 56, 84, fps=2.0))
    for k, (frame, t) in enumerate(frames):  # as a live camera and microphone interleave them
        await c.push_frame(sid2, frame, 10.0 + t)
        await push_speech(c, sid2, pcm[int(k * 0.5 * 16000) : int((k + 1) * 0.5 * 16000)])
    await c.commit(sid2, "what do you see?")
    out.append(summary(await reply(c, sid2))[0])
    for s in (sid, sid2):
        assert c.take_errors(s) == []
        await c.close_session(s)
    return out


@pytest.fixture(scope="module")
def reference(tiny):
    """The script's replies from the in-process client (the oracle for the multi-process ones)."""
    r = Runner(InProcClient(tiny))
    try:
        return r.run(conversation(r.client))
    finally:
        r.close()


# ---------------------------------------------------------------------------------- cases
@pytest.mark.timeout(900)
def test_replies_equal_the_in_process_ones(cl, reference):
    got = cl.run(conversation(cl.client))
    assert got == reference and all(got)


@pytest.mark.timeout(900)
def test_voice_turn_streams_text_then_speech(cl):
    c = cl.client

    async def main():
        sid = await c.open_session(VOICE)
        await push_speech(c, sid, (speech(2.5, 24000) * 32767).astype(np.int16), rate=24000)
        await c.commit(sid)
        events = await reply(c, sid)
        assert c.take_errors(sid) == []
        await c.close_session(sid)
        return events

    events = cl.run(main())
    text, pcm, done = summary(events)
    assert isinstance(done, ResponseDone) and not done.cancelled and done.epoch == 0
    assert done.text == text and 0 < done.reply_tokens <= VOICE.max_new_tokens
    n = sum(len(p) for p in pcm)
    if n > 480 * 48:  # past the first packet's 48 codes: chunk by chunk, not one blob (a random Talker may stop sooner)
        assert len(pcm) >= 2
    assert done.audio_samples == n and n % 480 == 0 and 0 < n <= 24000 * VOICE.max_speech_s
    allpcm = np.concatenate(pcm)
    assert allpcm.dtype == np.float32 and np.isfinite(allpcm).all() and np.abs(allpcm).max() <= 1.0
    assert done.stats["ttft_s"] <= done.stats["decode_s"]


@pytest.mark.timeout(900)
def test_barge_in_drops_the_old_epoch_and_truncate_keeps_what_was_played(cl):
    c = cl.client
    long = SessionOptions(voice="Chelsie", max_new_tokens=48, max_speech_s=1.0)

    async def main():
        sid = await c.open_session(long)
        await c.commit(sid, "tell me a long story")
        seen, epoch = [], None
        async for ev in c.respond(sid):
            seen.append(ev)
            if epoch is None:
                epoch = await c.cancel(sid)  # the user talks over the first word
        assert epoch == 1 and isinstance(seen[0], TextDelta)
        assert all(isinstance(e, ResponseDone) for e in seen[1:])  # nothing of epoch 0 leaked
        done = seen[-1]
        assert isinstance(done, ResponseDone) and done.cancelled and done.epoch == 0
        assert done.reply_tokens < long.max_new_tokens  # it stopped early
        assert await c.truncate(sid, 0) == 0  # nothing was played: the reply is forgotten
        await c.commit(sid, "and then?")  # the session goes on, in the new epoch
        _, pcm, after = summary(await reply(c, sid))
        assert isinstance(after, ResponseDone) and not after.cancelled and after.epoch == 1 and pcm
        played = 960  # the user heard 40 ms of it
        assert await c.truncate(sid, played) == min(after.reply_tokens, math.ceil(played / 480))
        await c.commit(sid, "go on")
        assert isinstance(summary(await reply(c, sid))[2], ResponseDone)
        assert c.take_errors(sid) == []
        await c.close_session(sid)

    cl.run(main())


@pytest.mark.timeout(600)
def test_clear_forgets_the_open_turn(cl):
    c = cl.client

    async def main():
        a, b = await c.open_session(TEXT), await c.open_session(TEXT)
        await push_speech(c, a, speech(2.5))
        await c.clear(a)
        for s in (a, b):
            await c.commit(s, "hi")
        ra, rb = summary(await reply(c, a)), summary(await reply(c, b))
        assert ra[0] == rb[0] and isinstance(ra[2], ResponseDone)  # as if the audio never came
        for s in (a, b):
            await c.close_session(s)

    cl.run(main())


@pytest.mark.timeout(600)
def test_bad_input_is_an_error_event_and_the_session_goes_on(cl):
    c = cl.client

    async def main():
        sid = await c.open_session(TEXT)
        await c.push_audio(sid, np.full(640, np.nan, np.float32), 16000)
        await c.push_audio(sid, np.zeros((2, 3, 4), np.float32), 16000)
        await c.push_audio(sid, "not audio", 16000)
        await c.push_audio(sid, np.zeros(640, np.float32), 0)
        await c.commit(sid, "still there?")
        errors = c.take_errors(sid)
        assert [e.code for e in errors] == ["invalid_audio"] * 4
        assert any("NaN" in e.message for e in errors) and c.take_errors(sid) == []
        _, _, done = summary(await reply(c, sid))
        assert isinstance(done, ResponseDone) and done.reply_tokens > 0
        await c.push_frame(sid, np.zeros((8, 8), np.uint8), 0.0)
        await c.clear(sid)
        assert [e.code for e in c.take_errors(sid)] == ["invalid_image"]
        with pytest.raises(ClientError, match="unknown session"):
            await c.commit("sess_nope", "x")
        with pytest.raises(ClientError, match="unknown voice 'Nobody'"):
            await c.open_session(SessionOptions(voice="Nobody"))
        with pytest.raises(ClientError, match="unknown voice 'Nobody'"):
            await c.update_session(sid, SessionOptions(voice="Nobody", max_new_tokens=8))
        await c.commit(sid, "and now?")  # the old options and conversation are still there
        _, pcm, done = summary(await reply(c, sid))
        assert isinstance(done, ResponseDone) and not pcm and c.take_errors(sid) == []
        fresh = await c.open_session(TEXT)
        with pytest.raises(RuntimeError):
            await c.truncate(fresh, 480)  # no reply yet
        for s in (sid, fresh):
            await c.close_session(s)

    cl.run(main())


@pytest.mark.timeout(600)
def test_several_sessions_at_once_get_their_own_replies(cl):
    c = cl.client
    prompts = ["red", "green apples", "blue sky today"]

    async def turn(prompt):
        sid = await c.open_session(TEXT)
        await c.commit(sid, prompt)
        text, _, done = summary(await reply(c, sid))
        await c.close_session(sid)
        assert isinstance(done, ResponseDone)
        return text

    async def main():
        together = await asyncio.gather(*(turn(p) for p in prompts))
        alone = [await turn(p) for p in prompts]
        return together, alone

    together, alone = cl.run(main())
    assert together == alone and len(set(alone)) > 1


@pytest.mark.timeout(120)
def test_status_names_the_stages(cl):
    st = cl.client.status()
    assert st["stages"] and all(s["alive"] for s in st["stages"])
    names = {"inproc": {"all"}, "inproc-speech-thread": {"engine", "speech"}, "all-in-one": {"pipeline"},
             "split": {"encoders", "thinker", "talker", "token2wav"}}[cl.kind]
    assert {s["name"] for s in st["stages"]} == names
    if not cl.kind.startswith("inproc"):
        assert all(s["pid"] for s in st["stages"])
    assert not [s for s in st["sessions"]]  # every test closed its sessions


@pytest.mark.timeout(600)
def test_drain_lets_running_replies_finish_then_stops_the_stages(cl):
    """The SIGTERM path of a server (runs last for each client: it closes the module's client)."""
    if cl.kind.startswith("inproc"):
        pytest.skip("the in-process client has no stage processes to drain")
    c = cl.client
    pids = [s["pid"] for s in c.status()["stages"]]

    async def main():
        sid = await c.open_session(TEXT)
        await c.commit(sid, "one more thing")
        first = asyncio.Event()

        async def collect():
            events = []
            async for ev in c.respond(sid):
                events.append(ev)
                first.set()
            return events

        task = asyncio.create_task(collect())
        await first.wait()
        await c.drain()
        events = await task
        assert isinstance(events[-1], ResponseDone) and not events[-1].cancelled  # it was allowed to finish
        with pytest.raises(ClientError, match="closed"):
            await c.open_session(TEXT)

    cl.run(main())
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
