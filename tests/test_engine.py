"""The engine core, batched: every session of a batch gets exactly what it gets alone.

Oracle: each session's script run alone (a fresh in-process client per session); the batched run
puts them all on one client at once, with different prompt lengths, one session joining while the
others are mid-reply, one barged in mid-batch, and sink + window caches that evict at different
steps in different rows. Greedy text, reply tokens and (seeded) codec-driven PCM must be equal
(PCM within 1e-5). The scheduler's own figures prove that batches of more than one row ran.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omnistream.engine.conversation import Conversation
from omnistream.engine.load import LoadMeter
from omnistream.engine.scheduler import Need, Scheduler, run_alone
from omnistream.runtime.client import AudioDelta, InProcClient, ResponseDone, SessionOptions, TextDelta

SCRIPTS = {  # session -> (options, user turn, join delay s)
    "short": (SessionOptions(voice="Chelsie", max_new_tokens=10, max_speech_s=0.6, seed=1), "hi", 0.0),
    "long": (SessionOptions(voice="Chelsie", max_new_tokens=12, max_speech_s=0.6, seed=2, window="48"),
             "tell me about the weather in the mountains at dawn, please, in detail", 0.0),
    "window": (SessionOptions(max_new_tokens=14, seed=3, window="40"), "count slowly to twenty", 0.0),
    "late": (SessionOptions(voice="Chelsie", max_new_tokens=8, max_speech_s=0.6, seed=4), "and you?", 0.4),
}


async def _one(c, options, text, delay, barge_at=None):
    """One session's turn; ``barge_at``: cancel after that many text deltas (mid-reply: its speech, which
    trails the text, has not all been made -- a short reply's audio can come in one piece)."""
    await asyncio.sleep(delay)
    sid = await c.open_session(options)
    await c.commit(sid, text)
    texts, pcm, done = [], [], None
    async for ev in c.respond(sid):
        if isinstance(ev, TextDelta):
            texts.append(ev.text)
            if barge_at is not None and len(texts) == barge_at:
                await c.cancel(sid)
        elif isinstance(ev, AudioDelta):
            pcm.append(ev.pcm)
        elif isinstance(ev, ResponseDone):
            done = ev
    await c.close_session(sid)
    return "".join(texts), np.concatenate(pcm) if pcm else np.zeros(0, np.float32), done


def _run(tiny, scripts, barge=None):
    async def main():
        c = InProcClient(tiny)
        await c.start()
        try:
            out = await asyncio.gather(*[_one(c, o, t, d, barge.get(k) if barge else None)
                                         for k, (o, t, d) in scripts.items()])
            return dict(zip(scripts, out)), c.status()["scheduler"]
        finally:
            await c.close()

    return asyncio.run(main())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sessions_in_a_batch_get_what_they_get_alone(tiny):
    batched, sched = _run(tiny, SCRIPTS)
    assert sched["thinker"]["thinker.decode"]["max_batch"] >= 3  # rows of several sessions in one forward
    assert sched["talker"]["talker.step"]["max_batch"] >= 2
    for name, script in SCRIPTS.items():
        alone, _ = _run(tiny, {name: script})
        (bt, bp, bd), (st, sp, sd) = batched[name], alone[name]
        assert bt == st and bd.reply_tokens == sd.reply_tokens, name
        assert bp.shape == sp.shape, name
        if sp.size:
            assert np.abs(bp - sp).max() <= 1e-5, name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_barge_in_drops_one_row_and_never_disturbs_the_others(tiny):
    scripts = {k: SCRIPTS[k] for k in ("short", "long", "late")}
    batched, _ = _run(tiny, scripts, barge={"short": 2})
    assert batched["short"][2].cancelled
    for name in ("long", "late"):
        alone, _ = _run(tiny, {name: scripts[name]})
        assert batched[name][0] == alone[name][0]
        assert not batched[name][2].cancelled
        assert np.abs(batched[name][1] - alone[name][1]).max() <= 1e-5


def test_scheduler_batches_needs_and_isolates_a_failing_batch():
    calls = []

    def double(args):
        calls.append(len(args))
        if any(a < 0 for a in args):
            raise ValueError("negative row")
        return [2 * a for a in args]

    def task(x, out):
        for _ in range(3):
            x = yield Need("double", x)
            yield  # one model call per tick
        out.append(x)

    from omnistream.engine.scheduler import Running

    outs, ended = [[], [], []], []
    runs = {i: Running(task(x, outs[i])) for i, x in enumerate((1, 2, 3))}
    s = Scheduler({"double": double})
    while s.tick(list(runs.items()), lambda k, e: ended.append((k, e))):
        pass
    assert [o[0] for o in outs] == [8, 16, 24] and calls == [3, 3, 3]  # one call per tick for all rows
    assert sorted(k for k, e in ended if e is None) == [0, 1, 2]
    bad = {0: Running(task(-1, [])), 1: Running(task(5, []))}
    errors = []
    s.tick(list(bad.items()), lambda k, e: errors.append((k, type(e).__name__)))
    assert sorted(errors) == [(0, "ValueError"), (1, "ValueError")]  # a failed forward is never re-run
    assert run_alone(task(1, out := []), {"double": double}) is None and out == [8]


def test_conversation_core_decodes_what_the_thinker_generates(tiny):
    """The core's reply loop equals StreamingThinker.generate (transformers-checked) on the same prompt."""
    a = Conversation(tiny)
    a.end_turn("hello there")
    r = a.begin_reply(max_new_tokens=12)
    ids = [step.token for step, _ in a.decode(r)]
    a.end_reply()
    b = Conversation(tiny)
    b.end_turn("hello there")
    ref = list(b.thinker.generate(12, stop_ids=b.stop_ids))
    assert ids == ref and r.ids == [t for t in ref if t not in b.stop_ids]


def test_load_meter_admits_by_measured_cost():
    m = LoadMeter(window_s=100, headroom=0.9, min_sample_s=1.0)
    assert m.admission(50) is None  # nothing measured: only the hard cap applies
    import time

    t = time.monotonic()
    m._last = t - 2.0
    m.record(0.6, replying=2)  # 2 s wall, 2 replying sessions, 0.6 s busy: 0.15 of the engine each
    assert m.cost() == pytest.approx(0.15, rel=1e-3)
    assert m.capacity() == 6
    assert m.admission(5) is None and "at most 6" in m.admission(6)


def test_load_meter_counts_speech_served_not_wall_time():
    """Two speaking replies that got 1 s of speech each in 2 s of wall time (behind real time) with the
    engine 1.8 s busy: each takes 0.9 of the engine per second of speech -- room for one session, not
    the two that wall time (1.8 s / 4 session-seconds = 0.45) would claim. A third, text-only reply
    counts its wall time. The speech figure is a running total: only its growth counts."""
    import time

    m = LoadMeter(window_s=100, headroom=0.9, min_sample_s=1.0)
    m.record(0.0, replying=0, speech_s=5.0)  # the worker's total before the window: not counted
    m._last = time.monotonic() - 2.0
    m.record(1.8, replying=2, speaking=2, speech_s=7.0)
    assert m.cost() == pytest.approx(0.9, rel=1e-3) and m.capacity() == 1
    assert "at most 1" in m.admission(1)
    m._last = time.monotonic() - 2.0
    m.record(0.2, replying=3, speaking=2, speech_s=11.0)  # now ahead (4 s in 2 s) + 2 s of a text reply
    assert m.cost() == pytest.approx(2.0 / (2.0 + 4.0 + 2.0), rel=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_served_hour_of_audio_and_video_stays_bounded(tiny):
    """An hour of 2-s audio+video chunks into the thinker worker (the stage runtime's code, as the
    encoders would send them) with a window: KV bytes never exceed the preallocated bound and the
    largest rotated position stops growing once the window is full, because the served path cuts
    media segments every 60 s (without the cut TMRoPE's h/w positions stay at the segment start
    while time runs on, and no shift bounds the span inside the window)."""
    import torch

    from omnistream.runtime import wire
    from omnistream.runtime.workers import ThinkerWorker

    w = ThinkerWorker(tiny, lambda *a: None)
    w.deliver(wire.OpenSession(session="s", epoch=0, options={"window": "1024"}))
    w.deliver(wire.BeginTurn(session="s", epoch=0, video=True))
    conv = w.slots["s"].state
    D = tiny.thinker.config.text_config.hidden_size
    gen = torch.Generator().manual_seed(0)
    kv_max, rot = 0, {}
    for chunk in range(1, 1801):  # 2-s chunks: 50 audio tokens, two 1-s video patches of 64 tokens
        for kind, n, grid in (("video", 64, [1, 16, 16]), ("video", 64, [1, 16, 16]), ("audio", 50, [])):
            x = torch.randn(n, D, generator=gen) * 0.02
            w.deliver(wire.Embeds(session="s", epoch=0, kind=kind, embeds=x, grid=grid))
        while w.tick():
            pass
        kv_max = max(kv_max, conv.thinker.cache.memory_bytes())
        if chunk % 300 == 0:  # every 10 simulated minutes
            rot[chunk // 30] = conv.thinker.cache.max_rotated_position
    cache = conv.thinker.cache
    assert kv_max == cache.memory_bytes()  # preallocated: never more than the bound
    assert conv._journal is None  # the open turn's replay recipe (its media) went when the window evicted its start
    assert conv.segments_cut >= 58  # cut every 60 s on the served path
    original = int(conv.thinker.rope.positions.max())
    assert original > 50_000 and rot[60] < original / 20  # positions ran on; the rotated ones did not
    assert rot[60] <= rot[20] + 64, rot  # bounded: no growth from minute 20 to minute 60


def test_long_text_is_prefilled_in_chunks_with_the_same_result(tiny, monkeypatch):
    """A long typed turn goes through the Thinker in TEXT_CHUNK-token forwards; the logits equal a
    one-pass prefill of the same tokens (the oracle: a fresh StreamingThinker given all ids at once)."""
    import torch

    from omnistream.model.thinker import StreamingThinker

    monkeypatch.setattr(Conversation, "TEXT_CHUNK", 64)
    a = Conversation(tiny)
    sizes, ids, orig = [], [], a.thinker.append_text
    a.thinker.append_text = lambda x: (sizes.append(len(x)), ids.extend(x), orig(x))[-1]
    a.thinker.reset()
    a.text("<|im_start|>system\nhi<|im_end|>\n")
    a.end_turn(" ".join(f"word{i}" for i in range(400)))
    b = StreamingThinker(tiny.thinker, tokenizer=tiny.tokenizer)
    b.append_text(ids)
    assert max(sizes) == 64 and len(sizes) > 5 and a.thinker.n_tokens == b.n_tokens == len(ids)
    assert torch.allclose(a.thinker.next_token_logits(), b.next_token_logits(), atol=1e-4)
