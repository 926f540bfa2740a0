"""Window caches kept as rows of one preallocated pool (issue 11, "Batched caches").

The oracle is each session decoded alone over a window cache with its own private buffers (no pool),
itself checked against the StreamingLLM oracle in test_window_cache.py. A pooled batched step attends
over the pool's rows in place (no per-step gather): every row must still come out as it would alone,
with sessions of different lengths joining and leaving, a barge-in (truncate) in one row, window
eviction at different ticks in different rows, and the pool compacting and growing under them.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from functools import partial

import pytest
import torch

import omnistream.memory.batch as batch_mod
from omnistream.kernels.window_attention import STATS
from omnistream.memory.batch import BatchCache, PoolBatch
from omnistream.memory.pool import RowPool, row_pool
from omnistream.memory.window_cache import WindowCache, WindowConfig
from omnistream.model.thinker import StreamingThinker, step_tokens, window_thinker

TOL = 1e-5
CFG = WindowConfig(sink_tokens=2, window_tokens=6, rebase_every=3, chunk_tokens=8, kernel=False)
SLOTS = 2 + 6 + 8
PROMPTS = [[5, 17, 3, 99, 41], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [300, 301, 302, 303], [42]]
# (tick the session joins, decode steps); session 3 is barged in (truncated) at tick 5
SCHEDULE = [(0, 12), (0, 5), (2, 10), (1, 9), (3, 4)]
BARGE = (3, 5, 2)  # (session, tick, tokens dropped)


def private(tiny, cfg=CFG):
    """The oracle: a window thinker whose cache keeps its own buffers."""
    th = window_thinker(tiny.thinker, cfg)
    th._cache_cls = partial(WindowCache, window=cfg)
    th.reset()
    return th


@pytest.fixture
def spy(monkeypatch):
    """Records the batch objects step_tokens builds (calls through to the real batch_cache)."""
    made = []

    def recording(caches):
        made.append(real(caches))
        return made[-1]

    real = batch_mod.batch_cache
    monkeypatch.setattr(batch_mod, "batch_cache", recording)
    return made


@pytest.fixture
def pool(tiny):
    """A fresh pool on the tiny Thinker for each test (the model keeps its pools between tests)."""
    lm = StreamingThinker(tiny.thinker).lm
    lm.__dict__.pop("_omnistream_row_pools", None)
    yield row_pool(lm, SLOTS)
    lm.__dict__.pop("_omnistream_row_pools", None)
    from omnistream.kernels.window_attention import disable_window_attention

    disable_window_attention(tiny.thinker)  # kernel-mode thinkers switch the shared tiny Thinker


def run(tiny, make, batched):
    """SCHEDULE decoded over thinkers made by ``make``, with the BARGE (test_batched_decode's loop)."""
    from test_batched_decode import decode_schedule

    return decode_schedule([make(tiny) for _ in PROMPTS], PROMPTS, SCHEDULE, batched, BARGE)


@pytest.mark.parametrize("kernel", [False, True], ids=["rotated", "kernel"])
@pytest.mark.parametrize("span_limit", [2.0, 1.0], ids=["span", "select"])
def test_pooled_batched_steps_equal_private_solo(tiny, pool, spy, monkeypatch, span_limit, kernel):
    monkeypatch.setattr(PoolBatch, "SPAN_LIMIT", span_limit)  # how non-consecutive rows are attended
    cfg = replace(CFG, kernel=kernel)
    calls = STATS["kernel_calls"]
    want = run(tiny, lambda ck: private(ck, cfg), batched=False)
    got = run(tiny, lambda ck: window_thinker(ck.thinker, cfg), batched=True)
    assert (STATS["kernel_calls"] > calls) == kernel  # kernel mode: the batch went through the window kernel
    assert got[1] == want[1]  # greedy tokens
    for a, b in zip(want[2], got[2]):
        assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= TOL
    assert got[3] == want[3] and len(set(want[3].values())) > 1  # rows evict at different ticks
    for s, b in zip(want[0], got[0]):
        assert (b.cache.base, b.cache.delta, b.cache.count, b.n_tokens) == (s.cache.base, s.cache.delta,
                                                                               s.cache.count, s.n_tokens)
    assert all(isinstance(b, PoolBatch) for b in spy) and len(spy) >= 10
    views = [b for b in spy if not b.copies]
    assert views and all(b.copy_bytes == 0 for b in views)  # attended in place: nothing copied
    gaps = [b for b in spy if b.copies or b.width > len(b.rows)]  # e.g. rows 0 and 2 without 1
    assert gaps and all(b.copies == (span_limit == 1.0) for b in gaps)  # span (idle row 1) or index_select
    assert all(b.copy_bytes > 0 for b in gaps if b.copies)
    pool = got[0][0].cache.pool  # (the kernel-mode caches have their own pool)
    assert sorted(th.cache.pool_row for th in got[0]) == list(range(len(PROMPTS))) and pool.rows == 8  # grew 1 -> 8


def test_rows_released_compacted_and_grown(tiny, pool, spy):
    ths = [window_thinker(tiny.thinker, CFG) for _ in range(5)]
    refs = [private(tiny) for _ in range(5)]
    for th, ref, p in zip(ths, refs, PROMPTS):
        th.append_text(p)
        ref.append_text(p)
    assert [th.cache.pool_row for th in ths] == [0, 1, 2, 3, 4] and pool.rows == 8  # doubled 1 -> 2 -> 4 -> 8
    del ths[1], refs[1]  # a session closes: its cache is freed at once (no reference cycle)
    assert pool.used == 4 and pool.moves == 0  # marked free; nothing moves until a safe point
    step_tokens(ths, [1, 2, 3, 4])  # compacts first: the highest row moves into the hole
    for ref, t in zip(refs, [1, 2, 3, 4]):
        ref.append_text([t])
    assert pool.moves == 1 and sorted(th.cache.pool_row for th in ths) == [0, 1, 2, 3]
    assert not spy[-1].copies and spy[-1].copy_bytes == 0
    for th, ref in zip(ths, refs):
        assert (th.next_token_logits() - ref.next_token_logits()).abs().max() <= TOL
    ths[0].cache.release_row()  # explicit release forgets the session; the next forward takes a row again
    assert ths[0].cache.pool_row is None and pool.used == 3
    ths[0].truncate(0)
    refs[0].truncate(0)
    for th in (ths[0], refs[0]):
        th.append_text([9, 8, 7])
    assert pool.moves == 2 and ths[0].cache.pool_row == 3  # compacted (row 3 -> 0), then the lowest free row
    # the first compaction moved session 4 (row 4) into row 1, the second session 3 (row 3) into row 0
    assert [th.cache.pool_row for th in ths] == [3, 2, 0, 1]
    step_tokens(ths, [5, 6, 7, 8])  # not in pool order: the step runs in pool order, as one view
    for ref, t in zip(refs, [5, 6, 7, 8]):
        ref.append_text([t])
    assert not spy[-1].copies and spy[-1].order == [2, 3, 1, 0]
    for th, ref in zip(ths, refs):
        assert (th.next_token_logits() - ref.next_token_logits()).abs().max() <= TOL
    del ths, refs, th, ref, spy[:]  # (loop variables and the recorded batches hold caches too)
    gc.collect()
    assert pool.used == 0 and pool.rows == 8
    pool.compact()  # at most a quarter held: the buffers halve (here down to one row)
    assert pool.rows == 1 and pool.K[0].shape[0] == 1


def test_solo_forward_in_a_pool_row_is_unchanged(tiny, pool):
    """A pooled cache prefilled in chunks (over the scratch size: the transient-copy path) and decoded
    past eviction equals the private-buffer cache bit for bit."""
    a, b = window_thinker(tiny.thinker, CFG), private(tiny)
    for th in (a, b):
        th.append_text(list(range(20, 31)))  # 11 tokens > chunk_tokens
        th.append_text([3, 4])
    for t in [5, 6, 7, 8, 9]:
        a.append_text([t])
        b.append_text([t])
        assert torch.equal(a.next_token_logits(), b.next_token_logits())
    assert a.cache.pool_row == 0 and a.cache.evicted
    assert a.cache.memory_bytes() == b.cache.memory_bytes()  # a session's share: its row


def test_pool_errors(tiny, pool):
    with pytest.raises(ValueError, match="slots"):
        WindowCache(StreamingThinker(tiny.thinker).lm.config, CFG, pool=RowPool(SLOTS + 1))
    with pytest.raises(ValueError, match="slots >= 1"):
        RowPool(0)
    a, b = window_thinker(tiny.thinker, CFG), private(tiny)
    for th in (a, b):
        th.append_text([1, 2])
    with pytest.raises(ValueError, match="rows of one RowPool"):
        PoolBatch([a.cache, b.cache])
    assert type(batch_mod.batch_cache([a.cache, b.cache])) is BatchCache  # mixed rows: the gather


def test_span_with_an_idle_row_through_triton_kernel(tiny, pool, spy, monkeypatch):
    """Kernel-mode rows 0 and 2 stepped without row 1: the Triton kernel (interpreter on CPU) runs over
    the strided span [0, 3) with row 1 idle, and rows 0 and 2 equal their private-buffer solo runs."""
    from omnistream import kernels as K

    if not K.triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():  # the interpreter is off on GPU machines (tests/conftest.py)
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set only without CUDA)")
    cfg = replace(CFG, kernel=True)
    bat = [window_thinker(tiny.thinker, cfg) for _ in range(3)]
    solo = [private(tiny, cfg) for _ in range(3)]
    for th, p in zip(bat + solo, PROMPTS[:3] * 2):
        th.append_text(p)
    held = bat[1].next_token_logits().clone()
    monkeypatch.setenv("OMNISTREAM_KERNELS", "triton")
    for _ in range(4):  # past the 6-token window: rows 0 and 2 evict, row 1 stays as it was
        toks = [int(torch.argmax(solo[i].next_token_logits())) for i in (0, 2)]
        step_tokens([bat[2], bat[0]], toks[::-1])
        for i, t in zip((0, 2), toks):
            solo[i].append_text([t])
            assert (bat[i].next_token_logits() - solo[i].next_token_logits()).abs().max() <= TOL
    assert all(b.width == 3 and not b.copies for b in spy)
    assert torch.equal(bat[1].next_token_logits(), held) and bat[1].n_tokens == len(PROMPTS[1])
    bat[1].append_text([7])  # the idle row's cache was not touched: it continues as its solo twin
    solo[1].append_text([7])
    assert (bat[1].next_token_logits() - solo[1].next_token_logits()).abs().max() <= TOL
