"""Growing (unbounded) Thinker caches kept as rows of one growable pool (issue 11, "Batched caches").

The oracle is transformers' own ``DynamicCache``: the same session on a ``StreamingThinker`` whose cache
is a ``DynamicCache`` (the default before the pooled growing cache). A batched step over pooled growing
caches attends over the pool's rows in place (a ``PoolBatch``, no per-step gather): every row must come
out as that session alone on a ``DynamicCache``, with sessions of different lengths joining and leaving,
a barge-in (truncate) in one row, and the pool's slot count doubling under live rows.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

import omnistream.memory.batch as batch_mod
from omnistream.memory.batch import PoolBatch, cache_bytes
from omnistream.memory.growing_cache import GrowingCache, pooled_growing_ok
from omnistream.memory.pool import ATTR, GROWING_MIN_SLOTS, RowPool
from omnistream.model.thinker import StreamingThinker, growing_cache_cls, step_tokens

TOL = 1e-5
# prompts longer than the pool's first 16 slots: the slot count doubles during prefill and decode
PROMPTS = [list(range(5, 30)), [7, 8, 9], list(range(40, 53)), [300, 301, 302, 303, 304, 305], [42]]
SCHEDULE = [(0, 12), (0, 5), (2, 10), (1, 9), (3, 4)]  # (tick the session joins, decode steps)
BARGE = (3, 5, 2)  # (session, tick, tokens dropped): a barge-in crops row 3 mid-batch


def dynamic(tiny, **kw):
    """The oracle: a StreamingThinker on transformers' DynamicCache."""
    th = StreamingThinker(tiny.thinker, **kw)
    th._cache_cls = DynamicCache
    th.reset()
    return th


@pytest.fixture
def fresh(tiny):
    """A fresh growable pool on the tiny Thinker for each test (the model keeps its pools between tests)."""
    lm = tiny.thinker.model.language_model
    pools = lm.__dict__.setdefault(ATTR, {})
    pools.pop((0, "growing"), None)
    yield
    pools.pop((0, "growing"), None)


@pytest.fixture
def spy(monkeypatch):
    """Records the batch objects step_tokens builds (calls through to the real batch_cache)."""
    made = []
    real = batch_mod.batch_cache

    def recording(caches):
        made.append(real(caches))
        return made[-1]

    monkeypatch.setattr(batch_mod, "batch_cache", recording)
    return made


def converse(th, audio: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor], int]:
    """Text + audio chunks, a greedy reply, a barge-in (truncate into the reply), a second turn.
    Returns the greedy tokens, the logits after every append and the most tokens held at once."""
    toks, logits, peak = [], [], [0]

    def reply(n):
        for _ in range(n):
            t = int(torch.argmax(th.next_token_logits()))
            th.append_text([t])
            toks.append(t)
            logits.append(th.next_token_logits().clone())
            peak[0] = max(peak[0], th.n_tokens)

    th.append_text(PROMPTS[0])
    th.begin_audio()
    for blk in audio:
        th.append_audio_block(blk)
        logits.append(th.next_token_logits().clone())
    th.end_segment()
    reply(8)
    th.truncate(th.n_tokens - 5)  # cropped to what was heard
    th.append_text(PROMPTS[2])
    reply(6)
    th.truncate(len(PROMPTS[0]))  # an item edit replays through crop: back to before the audio
    th.append_text([1, 2, 3])
    reply(4)
    return toks, logits, peak[0]


def test_session_on_pooled_growing_cache_equals_dynamic_cache(tiny, fresh):
    g = torch.Generator().manual_seed(0)
    d = tiny.thinker.get_input_embeddings().embedding_dim
    audio = [torch.randn(n, d, generator=g) for n in (7, 19, 3)]
    want = dynamic(tiny)
    got = StreamingThinker(tiny.thinker)
    assert isinstance(got.cache, GrowingCache)  # the default where the model allows
    pool = got.cache.pool
    wt, wl, peak = converse(want, audio)
    gt, gl, _ = converse(got, audio)
    assert gt == wt and len(gl) == len(wl)
    assert max((a - b).abs().max().item() for a, b in zip(wl, gl)) <= TOL
    assert got.n_tokens == want.n_tokens and torch.equal(got.rope.positions, want.rope.positions)
    for lg, ld in zip(got.cache.layers, want.cache.layers):  # the row holds exactly the DynamicCache's K/V
        assert lg.keys.shape == ld.keys.shape and (lg.keys - ld.keys).abs().max() <= TOL
        assert (lg.values - ld.values).abs().max() <= TOL
    assert pool.slots > GROWING_MIN_SLOTS and pool.rows == 1  # it grew; a lone session holds one row
    assert pool.slots < 2 * peak  # doubling: at most about twice what a DynamicCache held at its peak
    assert cache_bytes(got.cache) == pool.nbytes()


def run(tiny, make, batched):
    """SCHEDULE decoded over thinkers made by ``make``, with the BARGE (test_batched_decode's loop)."""
    from test_batched_decode import decode_schedule

    return decode_schedule([make() for _ in PROMPTS], PROMPTS, SCHEDULE, batched, BARGE)


def test_batched_growing_rows_equal_solo_without_gather(tiny, fresh, spy, monkeypatch):
    want = run(tiny, lambda: dynamic(tiny, record=True), batched=False)
    got = run(tiny, lambda: StreamingThinker(tiny.thinker, record=True), batched=True)
    assert got[1] == want[1]  # greedy tokens
    for a, b in zip(want[2], got[2]):
        assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= TOL
    for s, b in zip(want[0], got[0]):
        assert b.n_tokens == s.n_tokens and torch.equal(b.rope.positions, s.rope.positions)
        (es, hs), (eb, hb) = s.records(0), b.records(0)
        assert (es - eb).abs().max() <= TOL and (hs - hb).abs().max() <= TOL
    assert all(isinstance(b, PoolBatch) for b in spy) and len(spy) >= 10  # never the gathering BatchCache
    views = [b for b in spy if not b.copies]
    assert views and all(b.copy_bytes == 0 for b in views)  # attended in place: nothing copied
    assert any(b.width > len(b.rows) for b in spy)  # a session in between idle: the span of rows
    pool = got[0][0].cache.pool
    assert pool.rows == 8 and pool.slots == 64  # rows doubled 1 -> 8 and slots 16 -> 64 under live rows


def test_pool_growth_keeps_live_rows_and_trims(tiny, fresh):
    """Direct K/V appends (the oracle: per-cache concatenation, what a DynamicCache holds)."""
    g = torch.Generator().manual_seed(1)
    pool = RowPool(4, growable=True)
    caches = [GrowingCache(num_layers=2, pool=pool) for _ in range(3)]
    ref = [[[], []] for _ in caches]  # per cache, per layer: the keys appended (values = -keys)

    def append(i, n):
        for layer in range(2):
            k = torch.randn(1, 2, n, 8, generator=g)
            got_k, got_v = caches[i].update(k, -k, layer)
            ref[i][layer].append(k)
            want = torch.cat(ref[i][layer], dim=-2)
            assert torch.equal(got_k, want) and torch.equal(got_v, -want)

    def check():
        for c, r in zip(caches, ref):
            for layer in range(2):
                want = torch.cat(r[layer], dim=-2)
                K, V = pool.row_views(c._ticket, layer)  # (1, H, slots, D)
                assert torch.equal(K[:, :, : want.shape[-2]], want) and torch.equal(V[:, :, : want.shape[-2]], -want)

    for i, n in enumerate((3, 2, 4)):
        append(i, n)
    assert (pool.rows, pool.slots) == (4, 4)
    append(1, 9)  # row 1 overflows: every row re-made with 16 slots, all held
    assert pool.slots == 16
    check()
    append(2, 30)  # 34 held -> 64 slots
    assert pool.slots == 64
    check()
    del caches[0], ref[0]  # a session ends: compaction moves the highest row into its hole
    gc.collect()
    caches[1].crop(-30)  # the long one is cut back to 4 tokens
    del ref[1][0][-1], ref[1][1][-1]
    pool.trim()
    assert pool.moves == 1 and sorted(c.pool_row for c in caches) == [0, 1]
    assert pool.slots == 16 and pool.rows == 4  # halved while every row holds at most half (the most held: 11)
    check()
    append(0, 1)
    check()
    caches.clear()
    gc.collect()
    c = GrowingCache(num_layers=2, pool=pool)  # every session gone: a new one takes a row of a trimmed pool
    c.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8), 0)
    assert (pool.rows, pool.slots, c.pool_row) == (1, 4, 0) and c.memory_bytes() == pool.nbytes()


def test_cache_choice_and_errors(tiny, fresh):
    lm = tiny.thinker.model.language_model
    assert growing_cache_cls(lm).func is GrowingCache
    assert not pooled_growing_ok(SimpleNamespace(layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(ValueError, match="full-attention layers only"):
        GrowingCache(SimpleNamespace(layer_types=["sliding_attention"], num_hidden_layers=1))
    with pytest.raises(ValueError, match="growable RowPool"):
        GrowingCache(num_layers=1, pool=RowPool(4))
    with pytest.raises(ValueError, match="pass config or num_layers"):
        GrowingCache()
    c = GrowingCache(num_layers=1)
    with pytest.raises(ValueError, match="batch size 1"):
        c.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), 0)
    with pytest.raises(ValueError, match="negative count"):
        c.crop(3)
    with pytest.raises(ValueError, match="slots needed"):
        RowPool(4).ensure_slots(5)
    other = GrowingCache(num_layers=1, pool=c.pool)  # the shared pool holds fp32: a fp64 cache gets its own
    c.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 0)
    k, _ = other.update(torch.ones(1, 1, 2, 4, dtype=torch.float64), torch.ones(1, 1, 2, 4, dtype=torch.float64), 0)
    assert other.pool is not c.pool and k.dtype == torch.float64 and other.get_seq_length() == 2
    a, b = StreamingThinker(tiny.thinker), StreamingThinker(tiny.thinker)
    a.append_text([1, 2])
    b.append_text([3])
    step_tokens([a, b], [4, 5])
    assert a.cache.pool is b.cache.pool and {a.cache.pool_row, b.cache.pool_row} == {0, 1}
