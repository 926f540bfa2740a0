"""The Talker's static-row decode step (omnistream.model.graphs) == the BatchCache / solo step.

The oracle is the eager path (``step_talkers`` over BatchCache, itself checked against the solo
step and transformers' generate in test_batched_decode.py / test_talker.py). Sessions have
different prompts, join at different ticks, stop at different steps (one by codec eos), so rows
are taken, released and compacted mid-batch, and the row capacity starts too small and doubles.
On CUDA, the captured graphs' replay is compared with the eager static step.
"""

from __future__ import annotations

import pytest
import torch

from omnistream.model.graphs import ATTR, disable_talker_graphs, enable_talker_graphs
from omnistream.model.talker import StreamingTalker, TalkerConfig, step_talkers
from omnistream.model.thinker import StreamingThinker

PROMPTS = [[5, 17, 3, 99, 41], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [300, 301, 302, 303]]
SCHEDULE = [(0, 9), (0, 4), (2, 8), (5, 5)]  # (tick the session joins, its Thinker steps)
_REPLIES: dict = {}


def session(ck, i: int, cfg: TalkerConfig):
    key = (id(ck), i)
    if key not in _REPLIES:
        st = StreamingThinker(ck.thinker, record=True)
        st.append_text(PROMPTS[i])
        prompt = (*st.records(0), st.rope.positions.clone(), st.rope.next_position)
        _REPLIES[key] = prompt, list(st.decode(SCHEDULE[i][1], [], do_sample=False))
    prompt, steps = _REPLIES[key]
    tk = StreamingTalker.from_checkpoint(ck, config=cfg)
    tk.feed_prompt(*prompt)
    return tk, steps


def configs(ck, sampled: bool):
    eos1 = None
    if not sampled:  # session 1 ends by codec eos: its greedy code at step 3 becomes an eos id
        tk, steps = session(ck, 1, TalkerConfig(do_sample=False, max_new_tokens=40))
        eos1 = list(tk.stream(steps))[3]
    out = []
    for i in range(4):
        eos = (int(ck.talker.codec_pad_token), eos1) if i == 1 and eos1 is not None else None
        out.append(TalkerConfig(do_sample=sampled, seed=10 + i, max_new_tokens=12 + 3 * i, eos_token_ids=eos))
    return out


def talk(ck, cfgs, solo: bool = False):
    """Every session fed one Thinker step per tick from its join tick; all ready talkers stepped in
    one ``step_talkers`` call per tick (``solo``: each alone). Returns codes and stop reasons."""
    sess = [session(ck, i, c) for i, c in enumerate(cfgs)]
    codes, fed = [[] for _ in sess], [0] * len(sess)
    for tick in range(1000):
        for i, (tk, steps) in enumerate(sess):
            if tick >= SCHEDULE[i][0] and fed[i] < len(steps):
                codes[i] += tk.feed(steps[fed[i]])
                fed[i] += 1
                if fed[i] == len(steps):
                    tk.close_text()
        ready = [i for i, (tk, _) in enumerate(sess) if tk.ready()]
        if not ready and all(f == len(s) for f, (_, s) in zip(fed, sess)):
            break
        groups = [[i] for i in ready] if solo else [ready] if ready else []
        for g in groups:
            for i, tok in zip(g, step_talkers([sess[i][0] for i in g])):
                if tok is not None:
                    codes[i].append(tok)
    stops = [tk.stop_reason for tk, _ in sess]
    for tk, _ in sess:
        tk.end_turn()
    return codes, stops


@pytest.fixture
def static_rows(tiny):
    yield lambda **kw: enable_talker_graphs(tiny.talker, **kw)
    disable_talker_graphs(tiny.talker)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_static_rows_equal_batchcache(tiny, static_rows, sampled):
    cfgs = configs(tiny, sampled)
    want, want_stop = talk(tiny, cfgs)
    g = static_rows(rows=2, capacity=8, graphs=False)  # 2 rows for 4 sessions, 8 slots: both double
    got, stop = talk(tiny, cfgs)
    assert got == want and stop == want_stop
    assert not sampled or all(len(c) > 4 for c in got)
    if not sampled:
        assert stop[1] == "eos" and "length" in stop
    assert g.rows == 4 and g.capacity > 8 and g.owner == [None] * 4  # grew; every row released at the end
    solo, _ = talk(tiny, cfgs, solo=True)  # bucket 1 steps, rows still taken and released
    assert solo == want


def test_rows_grow_and_compact(tiny, static_rows):
    g = static_rows(rows=2, capacity=64, graphs=False)
    cfg = TalkerConfig(do_sample=False, max_new_tokens=50)
    sess = [session(tiny, i, cfg) for i in range(3)]
    for tk, steps in sess:
        for s in steps[:4]:  # the reply prefill, then two decode rows queued
            tk.feed(s)
    step_talkers([sess[0][0], sess[1][0]])
    assert [o is not None for o in g.owner] == [True, True]
    step_talkers([sess[2][0]])  # no free row: the rows double
    assert g.rows == 4 and g.owner[2] is sess[2][0]
    sess[0][0].cancel()  # releases row 0: the highest row (session 2) moves into it
    assert g.owner[:3] == [sess[2][0], sess[1][0], None] and sess[2][0]._graph_row == 0
    assert g.n[0] == g.lens[0].item() == sess[2][0].cache.get_seq_length() + 1
    step_talkers([sess[1][0], sess[2][0]])  # both step on the compacted rows
    assert g.n[:2] == g.lens[:2].tolist() == [sess[2][0].cache.get_seq_length() + 2, sess[1][0].cache.get_seq_length() + 2]
    for tk, _ in sess:
        tk.end_turn()
    assert g.owner == [None] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh runs this)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_static(tiny_dir, dtype):
    from omnistream.checkpoints import load_omni

    ck = load_omni(tiny_dir, device="cuda", dtype=dtype)
    cfgs = configs(ck, sampled=False)
    enable_talker_graphs(ck.talker, rows=4, capacity=8, graphs=False)
    want = talk(ck, cfgs)
    g = enable_talker_graphs(ck.talker, rows=4, capacity=8, graphs=True)
    got = talk(ck, cfgs)
    assert got == want
    assert g.graphs and getattr(ck.talker, ATTR) is g
