"""Batched decode across sessions == each session decoded alone (issue 11).

The oracle is the solo path (``StreamingThinker.append_text`` / ``StreamingTalker.push``), itself
checked against transformers' offline generate in test_talker.py / test_window_cache.py. Sessions
have different prompt lengths, join and leave mid-reply, and (window caches) evict and rebase at
different steps; the batch must never let one row see another's cache or padding.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton kernels are defined (as test_kernels.py)

import pytest

from omnistream import kernels as K
from omnistream.kernels.window_attention import STATS
from omnistream.memory.batch import BatchCache, cache_kind
from omnistream.memory.window_cache import WindowCache, WindowConfig
from omnistream.model.talker import StreamingTalker, TalkerConfig, step_talkers
from omnistream.model.thinker import StreamingThinker, step_tokens, window_thinker

TOL = 1e-4
PROMPTS = [[5, 17, 3, 99, 41], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [300, 301, 302, 303]]
# (tick the session joins, decode steps): rows join and leave mid-reply
SCHEDULE = [(0, 12), (0, 5), (2, 10), (4, 6)]
WINDOW = {"sink_tokens": 2, "window_tokens": 6, "rebase_every": 3, "chunk_tokens": 8}


@pytest.fixture(autouse=True)
def _sdpa_after(tiny):
    """Kernel-mode thinkers switch the shared tiny Thinker to the window attention: switch it back."""
    yield
    from omnistream.kernels.window_attention import disable_window_attention

    disable_window_attention(tiny.thinker)


def make_thinker(tiny, kind):
    if kind == "growing":
        return StreamingThinker(tiny.thinker, record=True)
    return window_thinker(tiny.thinker, WindowConfig(**WINDOW, kernel=kind == "kernel"), record=True)


def run_schedule(tiny, kinds, batched):
    """Greedy decode of every session by SCHEDULE; returns (thinkers, tokens per session, logits per
    session, the tick each window cache first evicted)."""
    return decode_schedule([make_thinker(tiny, k) for k in kinds], PROMPTS, SCHEDULE, batched)


def decode_schedule(ths, prompts, schedule, batched, barge=None):
    """Prefill ``prompts[i]`` into ``ths[i]``, then decode greedily: session i joins at tick
    ``schedule[i][0]`` for ``schedule[i][1]`` steps, all live sessions in one ``step_tokens`` per tick
    (``batched``) or one by one; ``barge`` = (session, tick, tokens dropped) truncates that session
    before that tick. Returns (thinkers, tokens per session, logits per session, the tick each window
    cache first evicted)."""
    for th, p in zip(ths, prompts):
        th.append_text(p)
    toks, logits, evicted_at = [[] for _ in ths], [[] for _ in ths], {}
    for tick in range(max(j + n for j, n in schedule)):
        if barge is not None and tick == barge[1]:
            th = ths[barge[0]]
            th.truncate(th.n_tokens - barge[2])
            del toks[barge[0]][-barge[2]:]
        live = [i for i, (j, n) in enumerate(schedule) if j <= tick < j + n]
        new = [int(torch.argmax(ths[i].next_token_logits())) for i in live]
        if batched:
            step_tokens([ths[i] for i in live], new)
        else:
            for i, t in zip(live, new):
                ths[i].append_text([t])
        for i, t in zip(live, new):
            toks[i].append(t)
            logits[i].append(ths[i].next_token_logits().clone())
            if getattr(ths[i].cache, "evicted", False):
                evicted_at.setdefault(i, tick)
    return ths, toks, logits, evicted_at


@pytest.mark.parametrize(
    "kinds",
    [["growing"] * 4, ["window"] * 4, ["kernel"] * 4, ["growing", "kernel", "window", "kernel"]],
    ids=["growing", "window", "kernel", "mixed"],
)
def test_thinker_batched_equals_solo(tiny, kinds):
    solo, want_toks, want_logits, solo_evicted = run_schedule(tiny, kinds, batched=False)
    calls = STATS["kernel_calls"]
    bat, toks, logits, evicted = run_schedule(tiny, kinds, batched=True)
    assert toks == want_toks
    for a, b in zip(want_logits, logits):
        assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= TOL
    for s, b in zip(solo, bat):
        assert b.n_tokens == s.n_tokens and torch.equal(b.rope.positions, s.rope.positions)
        (es, hs), (eb, hb) = s.records(0), b.records(0)
        assert (es - eb).abs().max() <= TOL and (hs - hb).abs().max() <= TOL
        assert (s.last_hidden - b.last_hidden).abs().max() <= TOL and torch.equal(s.last_embed, b.last_embed)
    if "window" in kinds or "kernel" in kinds:
        assert evicted == solo_evicted and len(set(evicted.values())) > 1  # rows evict at different ticks
        assert any(any(t.cache.base) for t in bat if isinstance(t.cache, WindowCache))  # and rebase
        for s, b in zip(solo, bat):
            if isinstance(s.cache, WindowCache):
                assert (b.cache.base, b.cache.delta, b.cache.count) == (s.cache.base, s.cache.delta, s.cache.count)
    if kinds.count("kernel") > 1:  # the batch went through the window kernel with per-row slots
        assert STATS["kernel_calls"] > calls
    assert [cache_kind(t.cache) for t in bat] == ["kernel" if k == "kernel" else "rotated" for k in kinds]


def test_batched_step_after_solo_and_truncate(tiny):
    """A row can alternate between batched and solo steps and be truncated between them."""
    a, b = make_thinker(tiny, "growing"), make_thinker(tiny, "growing")
    ref = make_thinker(tiny, "growing")
    for th in (a, b, ref):
        th.append_text(PROMPTS[0])
    step_tokens([a, b], [4, 6])
    a.append_text([9])
    a.truncate(a.n_tokens - 1)
    step_tokens([a, b], [8, 8])
    for t in (4, 8):
        ref.append_text([t])
    assert (a.next_token_logits() - ref.next_token_logits()).abs().max() <= TOL


def test_step_tokens_rejects_bad_input(tiny):
    a, b = make_thinker(tiny, "growing"), make_thinker(tiny, "growing")
    a.append_text([1, 2])
    b.append_text([3])
    with pytest.raises(ValueError, match="2 thinkers but 1 tokens"):
        step_tokens([a, b], [1])
    with pytest.raises(ValueError, match="twice"):
        step_tokens([a, a], [1, 2])
    b.begin_audio()
    with pytest.raises(RuntimeError, match="audio segment is open"):
        step_tokens([a, b], [1, 2])
    assert a.n_tokens == 2  # nothing advanced
    with pytest.raises(ValueError, match="cannot share a forward"):
        BatchCache([a.cache, make_thinker(tiny, "kernel").cache])
    cfg = WindowConfig(**{**WINDOW, "chunk_tokens": 0}, kernel=True)  # no scratch slot for the kernel's step
    k1, k2 = (window_thinker(tiny.thinker, cfg) for _ in range(2))
    for th in (k1, k2):
        th.append_text([1, 2, 3])
    with pytest.raises(ValueError, match="chunk_tokens"):
        step_tokens([a, k1, k2], [1, 2, 3])
    assert (a.n_tokens, k1.n_tokens, k2.n_tokens, k1.rope.next_position) == (2, 3, 3, 3)  # nothing advanced


# --------------------------------------------------------------------------- Talker
_REPLIES: dict = {}


def talker_session(tiny, i, cfg):
    """A Talker holding session i's prompt rows, and the Thinker steps of its reply (computed once)."""
    key = (id(tiny), i)
    if key not in _REPLIES:
        st = StreamingThinker(tiny.thinker, record=True)
        st.append_text(PROMPTS[i])
        prompt = (*st.records(0), st.rope.positions.clone(), st.rope.next_position)
        _REPLIES[key] = prompt, list(st.decode(SCHEDULE[i][1], [], do_sample=False))
    prompt, steps = _REPLIES[key]
    tk = StreamingTalker.from_checkpoint(tiny, config=cfg)
    tk.feed_prompt(*prompt)  # what tk.sync(st) feeds
    return tk, steps


def talk_batched(tiny, cfgs):
    """Every session fed one Thinker step per tick (joining at its SCHEDULE tick), all ready talkers
    stepped in one step_talkers call per tick. Returns (codes per session, talkers, batch sizes)."""
    sess = [talker_session(tiny, i, c) for i, c in enumerate(cfgs)]
    codes, fed, sizes = [[] for _ in sess], [0] * len(sess), []
    for tick in range(10_000):
        for i, (tk, steps) in enumerate(sess):
            if tick >= SCHEDULE[i][0] and fed[i] < len(steps):
                codes[i] += tk.feed(steps[fed[i]])
                fed[i] += 1
                if fed[i] == len(steps):
                    tk.close_text()
        ready = [i for i, (tk, _) in enumerate(sess) if tk.ready()]
        if not ready and all(f == len(s) for f, (_, s) in zip(fed, sess)):
            break
        if ready:
            sizes.append(len(ready))
            for i, tok in zip(ready, step_talkers([sess[i][0] for i in ready])):
                if tok is not None:
                    codes[i].append(tok)
    return codes, [tk for tk, _ in sess], sizes


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_talker_batched_equals_solo(tiny, sampled):
    def cfgs(eos_for_1=None):
        out = []
        for i in range(len(PROMPTS)):
            eos = None if (i != 1 or eos_for_1 is None) else (int(tiny.talker.codec_pad_token), eos_for_1)
            out.append(TalkerConfig(do_sample=sampled, max_new_tokens=14 + 3 * i, seed=50 + i, eos_token_ids=eos,
                                    hf_dropped_mask=i == 3))  # rows with either position rule share a batch
        return out

    free = [list(tk.stream(steps)) for tk, steps in (talker_session(tiny, i, c) for i, c in enumerate(cfgs()))]
    stop = next(t for k, t in enumerate(free[1]) if k >= 4 and t not in free[1][:k])  # session 1 ends at code k
    want, solo = [], []
    for i, c in enumerate(cfgs(stop)):
        tk, steps = talker_session(tiny, i, c)
        want.append(list(tk.stream(steps)))
        solo.append(tk)
    codes, talkers, sizes = talk_batched(tiny, cfgs(stop))
    assert codes == want
    assert [t.stop_reason for t in talkers] == [t.stop_reason for t in solo] == ["length", "eos", "length", "length"]
    assert len(codes[1]) < len(free[1]) and max(sizes) >= 3 and sizes[-1] < max(sizes)  # eos while others go on


def test_thinker_batch_through_triton_kernel(tiny, monkeypatch):
    """Kernel-mode rows decoded by the Triton kernel (interpreter on CPU) with per-row slots == solo."""
    if not K.triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():  # the interpreter is off on GPU machines (tests/conftest.py)
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set only without CUDA)")
    solo = [make_thinker(tiny, "kernel") for _ in range(2)]
    bat = [make_thinker(tiny, "kernel") for _ in range(2)]
    for th, p in zip(solo + bat, PROMPTS[2:4] * 2):
        th.append_text(p)
    assert K.resolve_backend(torch.device("cpu"), "triton") == "triton"
    mod, seen = K._triton_mod, []
    real = mod.window_decode_attention_triton

    def counted(q, *a, **k):
        seen.append(q.shape[0])
        return real(q, *a, **k)

    monkeypatch.setattr(mod, "window_decode_attention_triton", counted)
    for _ in range(3):
        toks = [int(torch.argmax(th.next_token_logits())) for th in solo]
        for th, t in zip(solo, toks):
            th.append_text([t])
        monkeypatch.setenv("OMNISTREAM_KERNELS", "triton")
        step_tokens(bat, toks)
        monkeypatch.delenv("OMNISTREAM_KERNELS")
        for s, b in zip(solo, bat):
            assert (s.next_token_logits() - b.next_token_logits()).abs().max() <= TOL
    assert seen == [2] * (3 * tiny.thinker.config.get_text_config().num_hidden_layers)  # B = 2 rows, every layer


def test_talker_ready_and_errors(tiny):
    tk, steps = talker_session(tiny, 0, TalkerConfig(do_sample=False, max_new_tokens=5))
    assert not tk.ready()
    tk.feed(steps[0])  # the reply prefill: per session, emits the first code
    assert not tk.ready() and tk.started
    tk.feed(steps[1])  # held back: not yet known not to be the last
    assert not tk.ready()
    tk.feed(steps[2])
    assert tk.ready()
    with pytest.raises(ValueError, match="twice"):
        step_talkers([tk, tk])
    other, _ = talker_session(tiny, 1, TalkerConfig(do_sample=False))
    with pytest.raises(RuntimeError, match="talker 1 has no decode row"):
        step_talkers([tk, other])
    assert tk.ready()  # nothing was consumed
    tk.cancel()
    assert not tk.ready()


# --------------------------------------------------------------------------- attention over ragged rows
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_window_attention_ragged_rows_equal_per_row(backend):
    """One call over B padded rows with per-row ``valid`` == each row alone over its own slots."""
    if backend == "triton" and not K.triton_available():
        pytest.skip("triton is not installed")
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, section = 4, 2, 2, 16, [2, 3, 3]
    lengths = [1, 7, 19, 12]
    N = max(lengths)
    q = torch.randn(B, Hkv * G, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    slot_pos = torch.randint(0, 5000, (B, 3, N), generator=g, dtype=torch.int32)
    q_pos = torch.randint(0, 5000, (B, 3), generator=g, dtype=torch.int32)
    valid = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    k[~valid[:, None].expand(B, Hkv, N)] = float("nan")  # padding garbage must never leak
    v[~valid[:, None].expand(B, Hkv, N)] = float("nan")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    # Triton runs compiled on a GPU machine (no interpreter there): the kernel's rows go to the GPU
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    args = [t.to(dev) for t in (q, q_pos, k, v, slot_pos, valid, inv_freq)]
    out = K.window_decode_attention(*args, section, backend=backend).cpu()
    for b, n in enumerate(lengths):
        alone = K.window_decode_attention_ref(q[b : b + 1], q_pos[b : b + 1], k[b : b + 1, :, :n],
                                              v[b : b + 1, :, :n], slot_pos[b : b + 1, :, :n], None, inv_freq,
                                              section)
        assert (out[b] - alone[0]).abs().max() <= 1e-5
