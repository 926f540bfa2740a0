"""Token2Wav batched across sessions: every stream gets exactly what it gets alone.

Oracles: each stream's own solo ``push``/``finish`` run (same voice, seed and push schedule, batch
1), and transformers' ``code2wav_dit_model.sample`` / ``code2wav_bigvgan_model`` for single windows
and spans. Batch sizes are observed with forward hooks (observation only, nothing is replaced).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.model.token2wav import StreamingConfig, StreamingToken2Wav
from omnistream.model.token2wav_jobs import DiTJob, VocoderJob, batch_invariant_convs, run_jobs, step_batch

# One DiT block (24 frames) = 12 codes: steady windows are 36 codes, first ones 12 and 24.
# merge_tail as DEFAULT: a reply ending inside a look-ahead is finished by that window.
CFG = StreamingConfig(chunk_codes=12, left_codes=12, right_codes=6, vocoder_context_frames=8, first_chunk_codes=6,
                      block_align=True, merge_tail=True)
STEPS = 4  # 3 RK4 steps = 12 DiT evaluations per window: the same code path as 10 steps, 3x cheaper


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _voices(tiny):
    """Four different voices: the checkpoint's two, and two more with other speaker vectors and
    reference mels (one of another length, so the speaker encoder sees different shapes)."""
    out = [(v["cond"][None].float(), v["ref_mel"].float()) for v in tiny.voices.values()]
    (c0, r0), (c1, r1) = out
    out.append((-c0, r1[:, :217] * 0.8))
    out.append(((c0 + c1) / 2, torch.flip(r0, dims=[1])))
    return out


def _codes(n, seed):
    return torch.randint(0, 8192, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _stream(tiny, voice, seed, **kw):
    cond, ref = voice
    return StreamingToken2Wav.from_config(tiny.token2wav, cond, ref, CFG, seed=seed, num_steps=STEPS, **kw)


def _assert_same_chunks(got, want, what):
    assert [c.shape for c in got] == [c.shape for c in want], f"{what}: chunk boundaries differ"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.float32
        assert np.abs(g - w).max() <= 1e-5, f"{what}: chunk {i} differs by {np.abs(g - w).max()}"


def _plan(n_ticks, start, n_codes, finish_delay, per_tick=6):
    """{tick: (codes slice, final)} of a reply that starts at ``start`` and gets ``per_tick`` codes a tick."""
    plan, i, t = {}, 0, start
    while i < n_codes:
        plan[t] = (slice(i, min(i + per_tick, n_codes)), False)
        i, t = i + per_tick, t + 1
    last = t - 1 + finish_delay
    plan[last] = (plan.get(last, (slice(0, 0), False))[0], True)
    assert last < n_ticks
    return plan


def test_streams_in_one_batch_equal_their_solo_runs(tiny):
    """4 voices, 4 seeds, 4 lengths, C and D joining at tick 2 while A and B are mid-reply; D is
    cancelled from inside a batched DiT call (as another thread would) and A, B, C must not notice."""
    voices = _voices(tiny)
    specs = [  # (voice, seed, codes, start tick, finish delay: 0 = with the last codes, 1 = a tick later)
        (voices[0], 11, 57, 0, 0),
        (voices[1], 12, 45, 0, 1),
        (voices[2], 13, 50, 2, 0),
        (voices[3], 14, 70, 2, 1),
    ]
    n_ticks = 15
    codes = [_codes(n, seed) for _, seed, n, _, _ in specs]
    plans = [_plan(n_ticks, start, n, delay) for _, _, n, start, delay in specs]

    # Solo references: same pushes at the same ticks, batch 1.
    solo = []
    for (voice, seed, *_), c, plan in zip(specs, codes, plans):
        st, per_tick = _stream(tiny, voice, seed), {}
        for t, (sl, final) in sorted(plan.items()):
            per_tick[t] = st.push(c[sl]) + (st.finish() if final else [])
        solo.append(per_tick)

    streams = [_stream(tiny, voice, seed) for voice, seed, *_ in specs]
    d = streams[3]
    dit, vocoder = tiny.token2wav.code2wav_dit_model, tiny.token2wav.code2wav_bigvgan_model
    dit_batches, voc_batches, cancel_at = [], [], []

    def watch_dit(module, args):
        b = args[0].shape[0] // 2  # (2B, T, hidden): guided rows + null rows
        dit_batches.append(b)
        # D's 3rd window (tick 7, batched with A, B, C), its 5th evaluation
        if b >= 3 and d.dit_evals == 2 * 12 + 5 and not d.cancelled:
            d.cancel()
            cancel_at.append((len(pcm_ticks), b))

    hooks = [dit.proj_out.register_forward_pre_hook(watch_dit),
             vocoder.conv_pre.register_forward_pre_hook(lambda m, a: voc_batches.append(a[0].shape[0]))]
    pcm_ticks = []
    try:
        for t in range(n_ticks):
            live = [s for s, p in zip(streams, plans) if min(p) <= t]
            new = {s: c[p[t][0]] for s, c, p in zip(streams, codes, plans) if t in p}
            finals = {s for s, p in zip(streams, plans) if t in p and p[t][1]}
            pcm_ticks.append(step_batch(live, new, finals))
    finally:
        for h in hooks:
            h.remove()
    assert len(cancel_at) == 1 and cancel_at[0][1] >= 3  # D shared that DiT call with >= 2 others
    assert max(dit_batches) >= 3 and max(voc_batches) >= 2  # work really was batched

    t_cancel = cancel_at[0][0]
    for k, (st, plan) in enumerate(zip(streams, plans)):
        for t in range(n_ticks):
            got = pcm_ticks[t].get(st, [])
            want = solo[k].get(t, [])
            if st is d and t >= t_cancel:
                assert got == [], "a cancelled stream returned PCM"
                continue
            _assert_same_chunks(got, want, f"stream {'ABCD'[k]} tick {t}")
    for st, (_, _, n, _, _) in zip(streams[:3], specs):
        assert st.samples_out == 480 * n  # the whole reply came out
    assert d.dit_evals < 3 * 12  # D stopped inside its 3rd window


def test_batched_dit_windows_equal_transformers_sample_one_by_one(tiny):
    """N equal first windows (12 codes, no context needed) of different voices/seeds in one call ==
    transformers' offline ``sample`` of each, seeded like the stream's noise; and == batch-1 calls."""
    voices = _voices(tiny)
    t2w = tiny.token2wav
    streams, jobs = [], []
    for k, voice in enumerate(voices):
        st = StreamingToken2Wav.from_config(t2w, *voice, CFG, seed=30 + k)  # 10 ODE steps
        st.feed(_codes(12, 40 + k))
        streams.append(st)
        jobs += st.pending()
    assert [type(j) for j in jobs] == [DiTJob] * 4 and len({j.key for j in jobs}) == 1
    batched = run_jobs(jobs)  # each (1, 80, 24)
    single = [run_jobs([j])[0] for j in jobs]
    halves = run_jobs(jobs, threads=2)  # two batches of 2 at once, on two threads: the same bits
    assert all(torch.equal(h, b) for h, b in zip(halves, batched))
    for k, (voice, st) in enumerate(zip(voices, streams)):
        with torch.no_grad():
            torch.manual_seed(30 + k)
            want = t2w.code2wav_dit_model.sample(voice[0], voice[1], torch.tensor([st.codes]))  # (1, 80, 24)
        assert batched[k].shape == want.shape == (1, 80, 24)
        assert (batched[k] - want).abs().max().item() <= 1e-5
        assert (batched[k] - single[k]).abs().max().item() <= 1e-5
    # The mel goes back into its stream; the next job is that window's vocoder span.
    assert streams[0].accept(jobs[0], batched[0]) == [] and isinstance(streams[0].pending()[0], VocoderJob)


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="the split needs a second core")
def test_served_batches_use_the_second_core_with_the_same_bits(tiny, monkeypatch):
    """The Token2Wav worker's batched call, where torch runs one intra-op thread (this module's fixture,
    as serve on 2 cores): 4 DiT windows and 4 vocoder spans run as halves on two threads, a batch of 2
    on the caller alone (a lone-row part would delay the first audio of two sessions); the bits equal
    one batch each. A DiT part never runs beside a vocoder part: the vocoder's switch to ATen convs is
    process-wide and would change the DiT's bits (it did in the split layout's token2wav stage)."""
    import threading
    import time

    from omnistream.model import token2wav_jobs
    from omnistream.runtime.workers import run_t2w_jobs

    assert torch.get_num_threads() == 1
    dits, vocs = [], []
    mels = torch.randn(4, 80, 30, generator=torch.Generator().manual_seed(4)) - 4.0
    for k, voice in enumerate(_voices(tiny)):
        st = _stream(tiny, voice, 60 + k)
        st.feed(_codes(12, 70 + k))
        dits += st.pending()
        vocs.append(VocoderJob(_stream(tiny, voice, 1), 0, 30, 0, 30, mels[k : k + 1]))
    jobs = dits + vocs
    want = run_jobs(dits) + run_jobs(vocs)
    ran = []  # (kind, thread, rows, start, end) of each batched forward: observed, the runners unchanged

    def observe(kind, runner):
        def wrapped(js):
            t0 = time.perf_counter()
            out = runner(js)
            ran.append((kind, threading.get_ident(), len(js), t0, time.perf_counter()))
            return out
        return wrapped

    monkeypatch.setattr(token2wav_jobs, "_run_dit", observe("dit", token2wav_jobs._run_dit))
    monkeypatch.setattr(token2wav_jobs, "_run_vocoder", observe("vocoder", token2wav_jobs._run_vocoder))
    got = run_t2w_jobs(jobs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for kind in ("dit", "vocoder"):
        mine = [r for r in ran if r[0] == kind]
        assert sorted(r[2] for r in mine) == [2, 2] and len({r[1] for r in mine}) == 2, ran
    dit_end = max(r[4] for r in ran if r[0] == "dit")
    assert all(r[3] >= dit_end for r in ran if r[0] == "vocoder"), "a vocoder part ran beside a DiT part"
    ran.clear()
    assert all(torch.equal(a, b) for a, b in zip(run_t2w_jobs(dits[:2]), want[:2]))
    assert [(r[1], r[2]) for r in ran] == [(threading.get_ident(), 2)]


def test_batched_vocoder_spans_equal_bigvgan_one_by_one(tiny):
    t2w = tiny.token2wav
    mels = torch.randn(4, 80, 30, generator=torch.Generator().manual_seed(3)) - 4.0
    streams = [_stream(tiny, v, 1) for v in _voices(tiny)]
    jobs = [VocoderJob(st, 0, 30, 0, 30, mels[i : i + 1]) for i, st in enumerate(streams)]
    got = run_jobs(jobs)
    # on 2 threads at once (two rows each): the same bits, and the convolution switch is restored after
    assert all(torch.equal(a, b) for a, b in zip(run_jobs(jobs, threads=2), got))
    assert torch._C._get_mkldnn_enabled()
    # Oracle on the streams' conv backend: ATen vs oneDNN convs differ by ~1e-5 here (see test_token2wav.py)
    with torch.no_grad(), batch_invariant_convs():
        for i in range(4):
            want = t2w.code2wav_bigvgan_model(mels[i : i + 1])  # (7200,)
            assert got[i].shape == want.shape == (240 * 30,)
            assert (got[i] - want).abs().max().item() <= 1e-5


def test_cancel_between_ticks_and_of_a_whole_batch(tiny):
    voices = _voices(tiny)
    a, b = _stream(tiny, voices[0], 1), _stream(tiny, voices[1], 2)
    c = _codes(30, 5)
    out = step_batch([a, b], {a: c[:12], b: c[:12]})
    assert len(out[a]) == len(out[b]) == 1
    b.cancel()  # between ticks: b's jobs are never planned, a goes on alone
    out = step_batch([a, b], {a: c[12:24], b: c[12:24]}, finals={b})
    assert out[b] == [] and len(out[a]) == 1 and b.codes == c[:12]
    # Every stream of a batch cancelled while it runs: the call stops at the next evaluation.
    x, y = _stream(tiny, voices[2], 3), _stream(tiny, voices[3], 4)
    for s in (x, y):
        s.feed(c[:12])

    def cancel_both(module, args):
        if x.dit_evals == 3:
            x.cancel()
            y.cancel()

    h = tiny.token2wav.code2wav_dit_model.proj_out.register_forward_pre_hook(cancel_both)
    try:
        out = step_batch([x, y])
    finally:
        h.remove()
    assert out == {x: [], y: []} and x.dit_evals == y.dit_evals == 3


def test_bad_input_is_refused_before_anything_runs(tiny):
    voices = _voices(tiny)
    a, b = _stream(tiny, voices[0], 1), _stream(tiny, voices[1], 2)
    with pytest.raises(ValueError, match="stream #1: codec token #1 = 9000 is outside"):
        step_batch([a, b], {a: [1, 2, 3], b: [4, 9000]})
    assert a.codes == [] and b.codes == []  # atomic: a's good codes were not fed either
    with pytest.raises(ValueError, match="not in streams"):
        step_batch([a], {b: [1]})
    with pytest.raises(ValueError, match="twice"):
        step_batch([a, a])
    a.finish()
    with pytest.raises(RuntimeError, match="stream #0: push\\(\\) after finish"):
        step_batch([a, b], {a: [1]})
    b.feed(_codes(12, 1))
    job = b.pending()[0]
    with pytest.raises(ValueError, match="another stream"):
        a.accept(job, torch.zeros(1, 80, job.noise.shape[1]))
    b.accept(job, run_jobs([job])[0])
    with pytest.raises(ValueError, match="stale DiT job"):
        b.accept(job, run_jobs([job])[0])
