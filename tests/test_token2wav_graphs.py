"""Token2Wav's DiT windows through static buffers (CUDA: one graph replay per window).

Oracles: the eager batched path (``run_jobs`` without graphs, itself bit-equal to transformers'
``sample``, tests/test_token2wav*.py) and a whole reply's solo ``push``/``finish`` run; on CUDA, the
static function run eagerly on the same inputs. On CPU the static path must give the same bits:
padding a batch to its bucket must not change a row (the DiT's rows are batch-invariant there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.model.token2wav import StreamingConfig, StreamingToken2Wav
from omnistream.model.token2wav_graphs import DiTGraphs, disable_dit_graphs, enable_dit_graphs
from omnistream.model.token2wav_jobs import GRAPHS_ATTR, DiTJob, run_jobs

CFG = StreamingConfig(chunk_codes=12, left_codes=12, right_codes=6, vocoder_context_frames=8, first_chunk_codes=6,
                      block_align=True, merge_tail=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _windows(tiny, n, *, steps=4, **kw) -> list[DiTJob]:
    """n first windows (12 codes) of n streams: the two voices, different seeds and codes."""
    voices = list(tiny.voices.values())
    jobs = []
    for k in range(n):
        v = voices[k % len(voices)]
        st = StreamingToken2Wav.from_config(tiny.token2wav, v["cond"] * (1 + 0.1 * k), v["ref_mel"], CFG,
                                            seed=20 + k, num_steps=steps, **kw)
        st.feed(torch.randint(0, 8192, (12,), generator=torch.Generator().manual_seed(k)).tolist())
        jobs += st.pending()
    return jobs


@pytest.fixture
def dit_graphs(tiny):
    g = enable_dit_graphs(tiny.token2wav, graphs=False, max_rows=4)  # CPU: the static function, eagerly
    yield g
    disable_dit_graphs(tiny.token2wav)


@pytest.mark.parametrize("block_sparse", [False, True])
def test_static_windows_equal_the_eager_batch(tiny, dit_graphs, block_sparse):
    """3 windows (bucket 4: one padding row), then 1 and 6 (over max_rows 4: 4 + 2): the same bits as
    the eager batched path, and the same evaluation counts."""
    for n in (3, 1, 6):
        eager_jobs, static_jobs = _windows(tiny, n, block_sparse=block_sparse), _windows(tiny, n, block_sparse=block_sparse)
        disable_dit_graphs(tiny.token2wav)
        want = run_jobs(eager_jobs)
        setattr(tiny.token2wav.code2wav_dit_model, GRAPHS_ATTR, dit_graphs)
        got = run_jobs(static_jobs)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), n
        assert [j.stream.dit_evals for j in static_jobs] == [j.stream.dit_evals for j in eager_jobs] == [12] * n
    assert {k[1] for k in dit_graphs.entries} == {4, 1, 2}  # buckets made: 3 -> 4, 1, 6 -> 4 + 2


@pytest.mark.slow
def test_a_whole_reply_through_static_windows_equals_its_solo_run(tiny, dit_graphs):
    """A 70-code reply (first, steady and tail windows of three lengths) with 10 ODE steps, pushed in
    pieces: the PCM equals the same reply without graphs."""
    v = tiny.voices[next(iter(tiny.voices))]
    codes = torch.randint(0, 8192, (70,), generator=torch.Generator().manual_seed(5)).tolist()

    def speak():
        st = StreamingToken2Wav.from_config(tiny.token2wav, v["cond"], v["ref_mel"], CFG, seed=3)
        pcm = [c for i in range(0, 70, 16) for c in st.push(codes[i : i + 16])] + st.finish()
        return np.concatenate(pcm)

    got = speak()
    assert len({k[0] for k in dit_graphs.entries}) >= 2  # windows of several lengths went through it
    disable_dit_graphs(tiny.token2wav)
    want = speak()
    assert got.shape == want.shape and np.array_equal(got, want)


def test_a_sway_that_is_not_monotone_falls_back_to_transformers_integrate(tiny, dit_graphs):
    """sway 5 makes the ODE's time points go back near t = 1: the sync-free loop would skip
    transformers' interpolation, so the graphs decline and the eager path runs ``integrate``."""
    jobs = _windows(tiny, 2, sway_coefficient=5.0)
    st = jobs[0].stream
    assert dit_graphs.run(jobs[0].code, jobs[0].noise, st.cond, torch.cat([st._speaker_features()[:1],
                          st._speaker_features()[1:]]), num_steps=4, sway=5.0, guidance=0.5, block_sparse=False) is None
    got = run_jobs(jobs)
    disable_dit_graphs(tiny.token2wav)
    want = run_jobs(_windows(tiny, 2, sway_coefficient=5.0))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh runs this)")
def test_replayed_windows_equal_the_static_function_on_cuda(tiny_dir):
    """On CUDA: a captured window's replays equal the static function run eagerly on the same inputs
    (the same kernels), for buckets 1 and 4, with new inputs at each replay."""
    from omnistream.checkpoints import load_omni

    ck = load_omni(tiny_dir, device="cuda")
    graphs = DiTGraphs(ck.token2wav.code2wav_dit_model, graphs=True, max_rows=4)
    eager = DiTGraphs(ck.token2wav.code2wav_dit_model, graphs=False, max_rows=4)
    for n in (1, 3, 3):
        jobs = _windows(ck, n)
        code = torch.cat([j.code for j in jobs])
        x0 = torch.cat([j.noise for j in jobs])
        cond = torch.cat([j.stream.cond for j in jobs])
        feats = [j.stream._speaker_features() for j in jobs]
        spk = torch.cat([f[:1] for f in feats] + [f[1:] for f in feats])
        kw = dict(num_steps=4, sway=-1.0, guidance=0.5, block_sparse=False)
        got, want = graphs.run(code, x0, cond, spk, **kw), eager.run(code, x0, cond, spk, **kw)
        assert torch.equal(got, want), n
    assert graphs.captures == 2 and graphs.replays == 3


def test_shapes_beyond_max_windows_run_eagerly(tiny):
    """With room for one captured shape, a batch of another bucket goes the eager way: same bits."""
    g = enable_dit_graphs(tiny.token2wav, graphs=False, max_windows=1)
    try:
        got = run_jobs(_windows(tiny, 1)) + run_jobs(_windows(tiny, 2))
    finally:
        disable_dit_graphs(tiny.token2wav)
    want = run_jobs(_windows(tiny, 1)) + run_jobs(_windows(tiny, 2))
    assert list(g.entries) == [(24, 1, 4, -1.0, 0.5, False, torch.float32)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.slow
def test_the_static_window_has_no_host_sync(tiny):
    """What a CUDA graph captures must not sync the host (``.item()``, ``bool(tensor)``): the static
    function traces as one graph (``torch.compile(fullgraph=True)``, which refuses graph breaks), and
    gives the same bits; transformers' ``integrate`` (the path for other time points) does not trace."""
    from omnistream.model.token2wav_jobs import _DiTWindow, integrate, ode_times

    job = _windows(tiny, 1, steps=3)[0]
    st, dit = job.stream, tiny.token2wav.code2wav_dit_model
    spk, t = st._speaker_features(), ode_times(3, -1.0, torch.float32, "cpu")

    def static(code, cond, spk, x0, t, rising=True):
        return integrate(_DiTWindow(dit, code, cond, spk, x0.shape[1]), x0, t, 0.5, rising=rising)

    try:
        with torch.no_grad():
            traced = torch.compile(static, backend="eager", fullgraph=True)(job.code, st.cond, spk, job.noise, t)
            assert torch.equal(traced, static(job.code, st.cond, spk, job.noise, t))
            with pytest.raises(Exception, match="(?i)graph break|data-dependent|unsupported"):
                torch.compile(static, backend="eager", fullgraph=True)(job.code, st.cond, spk, job.noise, t, None)
    finally:
        torch._dynamo.reset()
