"""The Thinker's static decode step (omnistream.model.thinker_graphs) == today's eager ``step_tokens``.

The oracle is the eager batched step over the sessions' pool rows (``PoolBatch``, itself checked
against the solo step in test_batched_decode.py and transformers' generate in test_window_cache.py).
Window-cache sessions have prompts of different lengths, join and leave mid-way (the pool compacts
its rows), one waits a tick (an idle row inside the bucket), one takes a new sink in a static step,
and the windows evict at different ticks (so sink re-rotation, scratch-to-ring moves and rebases run
before replays). ``torch.compile`` of the static step equals the eager static step; on CUDA, the
captured graphs' replay equals the eager static step.
"""

from __future__ import annotations

import gc

import pytest
import torch

from omnistream.memory.window_cache import WindowConfig
from omnistream.model.thinker import step_tokens, window_thinker
from omnistream.model.thinker_graphs import disable_thinker_graphs, enable_thinker_graphs

TOL = 1e-5
WINDOW = WindowConfig(sink_tokens=2, window_tokens=8, rebase_every=3, chunk_tokens=4, kernel=False)
PROMPTS = [[5, 17, 3], [7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44], [300]]
SCHEDULE = [(0, 13), (0, 7), (2, 9), (4, 9)]  # (tick the session joins with its prompt, decode steps)
IDLE = (5, 1)  # (tick, session) that session waits one tick: an idle row between stepping rows


def snapshot(th) -> dict:
    """What a session's step leaves behind: its pool row's K/V, sinks as rotated at birth, the
    window's position bookkeeping, the rope, the Talker records."""
    c = th.cache
    return {
        "kv": [torch.stack((layer.keys[0], layer.values[0])).clone() for layer in c.layers],
        "sinks": [layer.sink_keys.clone() for layer in c.layers],
        "book": (c.seen, c.nsink, c.count, c.head, c.base, c.delta, c.evicted, [list(s) for s in c.slot_pos]),
        "rope": th.rope.positions.clone(),
        "records": [t.clone() for t in th.records(0)],
        "pending": [list(layer._pending) for layer in c.layers],
    }


def run(tiny, ticks: int | None = None):
    """Greedy decode by SCHEDULE, all stepping sessions in one ``step_tokens`` per tick. Returns the
    tokens and logits per session, the tick each first evicted, and each session's snapshot at its end."""
    ths = [window_thinker(tiny.thinker, WINDOW, record=True) for _ in PROMPTS]
    toks, logits, evicted, final = [[] for _ in ths], [[] for _ in ths], {}, {}
    for tick in range(ticks or max(j + n + 1 for j, n in SCHEDULE)):
        for i, (j, n) in enumerate(SCHEDULE):
            if tick == j:
                ths[i].append_text(PROMPTS[i])  # joins: its prefill takes a pool row
            if tick == j + n + (IDLE[1] == i) and i not in final:  # leaves: its row is freed, the pool compacts
                final[i] = snapshot(ths[i])
                ths[i].cache.release_row()
        live = [i for i, (j, n) in enumerate(SCHEDULE) if i not in final and tick >= j and (tick, i) != IDLE]
        if not live:
            continue
        new = [int(torch.argmax(ths[i].next_token_logits())) for i in live]
        step_tokens([ths[i] for i in live], new)
        for i, t in zip(live, new):
            toks[i].append(t)
            logits[i].append(ths[i].next_token_logits().clone())
            if ths[i].cache.evicted:
                evicted.setdefault(i, tick)
    for i, th in enumerate(ths):
        if i not in final:
            final[i] = snapshot(th)
        th.cache.release_row()
    del ths
    gc.collect()
    return toks, logits, evicted, final


def assert_same(a, b, tol=TOL):
    toks, logits, evicted, final = a
    toks2, logits2, evicted2, final2 = b
    assert toks2 == toks and evicted2 == evicted
    for x, y in zip(logits, logits2):
        assert len(x) == len(y) and max((p - q).abs().max().item() for p, q in zip(x, y)) <= tol
    for i in final:
        s, t = final[i], final2[i]
        assert s["book"] == t["book"] and s["pending"] == t["pending"] and torch.equal(s["rope"], t["rope"])
        for key in ("kv", "sinks", "records"):
            assert max((p - q).abs().max().item() for p, q in zip(s[key], t[key])) <= tol, (i, key)


@pytest.fixture
def graphs(tiny):
    yield lambda **kw: enable_thinker_graphs(tiny.thinker, **kw)
    disable_thinker_graphs(tiny.thinker)


def test_static_step_equals_step_tokens(tiny, graphs):
    want = run(tiny)
    toks, _, evicted, final = want
    assert len(set(evicted.values())) > 1 and 3 not in evicted  # rows evict at different ticks; one never
    assert any(any(f["book"][4]) for f in final.values())  # a rebase happened
    pool = window_thinker(tiny.thinker, WINDOW).cache.pool  # the sessions' RowPool (this one takes no row)
    moves = pool.moves
    g = graphs(graphs=False)
    got = run(tiny)
    assert_same(want, got)
    assert pool.moves > moves  # a leave compacted the rows: a session's row moved between static steps
    assert g.steps == max(j + n + (i == IDLE[1]) for i, (j, n) in enumerate(SCHEDULE))  # every tick's step went static


@pytest.mark.slow  # torch.compile's first call: ~3.5 s (make test runs it; make test-fast skips it)
def test_compiled_static_step_equals_eager_static(tiny, graphs):
    """``torch.compile`` of the static step function (the graph-capture unit) == the eager static step."""
    g = graphs(graphs=False)
    want = run(tiny, ticks=6)
    assert g.steps == 6
    torch._dynamo.reset()
    g.forward = torch.compile(g._forward, backend="aot_eager", dynamic=False)
    got = run(tiny, ticks=6)
    assert_same(want, got)
    assert g.steps == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh runs this)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_static(tiny_dir, dtype):
    from omnistream.checkpoints import load_omni

    ck = load_omni(tiny_dir, device="cuda", dtype=dtype)
    enable_thinker_graphs(ck.thinker, graphs=False)
    want = run(ck)
    g = enable_thinker_graphs(ck.thinker, graphs=True)
    got = run(ck)
    assert_same(want, got, tol=TOL if dtype == torch.float32 else 2e-2)
    assert g.steps and any(st.graphs for st in g._inputs.values())


def test_uncapturable_groups_run_eager(tiny, graphs):
    """Kernel-mode window caches, and post-RoPE groups holding a growing cache (BatchCache gathers), keep
    their eager path in the same ``step_tokens`` call; only all-pooled rotated groups go static, and
    every row ends as without graphs."""
    from omnistream.kernels.window_attention import disable_window_attention
    from omnistream.model.thinker import StreamingThinker

    def decode(kinds, n_ticks=3):
        ths = [StreamingThinker(tiny.thinker) if k is None else
               window_thinker(tiny.thinker, WindowConfig(**{**WINDOW.__dict__, "kernel": k})) for k in kinds]
        for th, p in zip(ths, [*PROMPTS, [9, 9]]):
            th.append_text(p)
        out = []
        for _ in range(n_ticks):
            step_tokens(ths, [int(torch.argmax(th.next_token_logits())) for th in ths])
            out.append([th.next_token_logits().clone() for th in ths])
        for th, k in zip(ths, kinds):
            if k is not None:
                th.cache.release_row()
        return out

    mixed = [None, True, False, True, False]  # growing + rotated share a (BatchCache) group; kernel rows another
    pooled = [True, False, True, False]  # the rotated rows form their own group
    try:
        want = [decode(mixed), decode(pooled)]
        g = graphs(graphs=False)
        got = [decode(mixed)]
        assert g.steps == 0
        got.append(decode(pooled))
        assert g.steps == 3  # one static step per tick: the two rotated rows
    finally:
        disable_window_attention(tiny.thinker)
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            assert max((p - q).abs().max().item() for p, q in zip(x, y)) <= TOL


def test_enable_errors(tiny):
    with pytest.raises(ValueError, match="CUDA graphs need the Thinker on a CUDA device"):
        enable_thinker_graphs(tiny.thinker, graphs=True)
