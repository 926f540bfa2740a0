"""WindowCache (attention sinks + sliding window, StreamingLLM positions for 3-D M-RoPE).

What is verified (tiny Thinker, fp32, tolerance 1e-5):

1. With ``W >=`` the session length the whole tiny Thinker over a WindowCache (``window_thinker``)
   equals ``StreamingThinker`` over the growing ``DynamicCache``: logits after each of 29 forwards
   (text and an audio-in-video segment with TMRoPE positions appended in random-size pieces, then
   20 greedy decode steps), same tokens; ``truncate`` (-> ``crop``) then decoding again also agrees.
2. Once the window has evicted, every forward (decode steps and chunks, including chunks larger
   than the scratch and than ``W``; rebasing every 1, 3 or 5 tokens; uniform and per-axis shifts;
   and crops inside the window after evictions) equals a brute-force StreamingLLM oracle over
   exactly [sinks, the last W other tokens before the forward, the forward's tokens], sinks at their
   own positions, the rest shifted by ``delta = max(0, min(positions) - sink_end)``:
   (a) layer 0, fully independent: a from-scratch forward (no cache) of the kept tokens' input
       embeddings at the oracle positions gives the same layer-0 output rows (layer 0's keys and
       values depend only on the embeddings, so this oracle is exact and shares nothing with the run);
   (b) whole model: a fresh DynamicCache filled, per layer, with the kept tokens' pre-RoPE keys
       (``k_proj`` outputs recorded during the run) rotated at the oracle positions and their values,
       then a forward of the new tokens at their oracle positions gives the same last hidden states
       and logits. (Deeper layers' K/V of a kept token come from the hidden states computed when it
       was appended, as in StreamingLLM, so they are taken from the run; what (b) checks is all the
       cache does: eviction, ring order, sink re-rotation, rebasing, chunk semantics, masks, crop.)
   The cache's held positions (``kept_positions``) equal the oracle's after every forward.
3. Memory is bounded: over 5000 decode steps no buffer is reallocated or grows (data pointers,
   shapes and ``memory_bytes`` constant; the exact preallocated size is checked).
4. Rotated positions stay small: ``< S + W + n`` with ``rebase_every=1`` (exact StreamingLLM) and
   ``< S + W + n + rebase_every`` by default (20k-token mixed-chunk stream, and the 5000 steps of 3).
5. Kernel mode (``WindowConfig(kernel=True)``: pre-RoPE keys, decode through
   ``omnistream.kernels.window_decode_attention`` via the ``"omnistream_window"`` attention function):
   equals the growing DynamicCache with ``W >=`` the session, equals the rotated-key path after
   eviction (every forward, both with the torch reference and with the Triton kernel under
   ``TRITON_INTERPRET=1``), passes the same StreamingLLM oracle (incl. crops after eviction), and
   never rewrites a stored key (sinks and window keys bit-identical while positions move).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb

from omnistream.encoders.tmrope import TMRoPE
from omnistream.memory.window_cache import WindowCache, WindowConfig
from omnistream.model.thinker import StreamingThinker, window_thinker

TOL = 1e-5


@pytest.fixture(scope="module")
def thinker(tiny):
    return tiny.thinker


@pytest.fixture(scope="module")
def lm(thinker):
    return thinker.model.language_model


@pytest.fixture
def window_attn(lm):
    """Route the tiny Thinker's attention through the window attention function for one test."""
    from omnistream.kernels.window_attention import disable_window_attention, enable_window_attention

    prev = enable_window_attention(lm)
    yield
    disable_window_attention(lm, prev)


def _kernel_calls():
    from omnistream.kernels.window_attention import STATS

    return STATS["kernel_calls"]


def _feed_session(st, thinker, rnd, g):
    """Text, an audio-in-video segment (random block sizes / patches), text; random-size appends."""
    d = thinker.config.text_config.hidden_size
    vocab = 200
    st.append_text([rnd.randrange(1, vocab) for _ in range(rnd.randint(3, 7))])
    st.append_text([rnd.randrange(1, vocab) for _ in range(rnd.randint(1, 4))])
    st.begin_video(1.0, with_audio=True)
    for _ in range(3):
        st.append_video_patch(torch.randn(4, d, generator=g), (1, 4, 4))
        st.append_audio_block(torch.randn(rnd.randint(5, 30), d, generator=g))
    st.end_segment()
    st.append_text([rnd.randrange(1, vocab) for _ in range(rnd.randint(2, 9))])


def _run_session(st, thinker):
    rnd, g = random.Random(0), torch.Generator().manual_seed(0)
    logits = []
    orig = st._forward

    def spy(*a, **k):
        orig(*a, **k)
        logits.append(st.next_token_logits().clone())

    st._forward = spy
    _feed_session(st, thinker, rnd, g)
    toks = list(st.generate(20))
    return logits, toks


def test_window_at_least_session_equals_dynamic_cache(thinker):
    ref = StreamingThinker(thinker)
    win = window_thinker(thinker, WindowConfig(sink_tokens=4, window_tokens=512, chunk_tokens=16))
    logits_ref, toks_ref = _run_session(ref, thinker)
    logits_win, toks_win = _run_session(win, thinker)
    assert toks_ref == toks_win
    assert win.cache.get_seq_length() == ref.cache.get_seq_length() == ref.n_tokens == win.n_tokens
    assert not win.cache.evicted and win.cache.n_cached == ref.n_tokens
    assert win.cache.max_rotated_position == int(ref.rope.positions.max())  # nothing re-positioned
    assert len(logits_ref) == len(logits_win) > 25
    diff = max((a - b).abs().max().item() for a, b in zip(logits_ref, logits_win))
    print(f"max |logit diff| vs DynamicCache over {len(logits_ref)} forwards ({ref.n_tokens} tokens): {diff:.2e}")
    assert diff <= TOL
    # truncate (StreamingThinker.truncate -> cache.crop, outside inference mode) then decode again
    n = ref.n_tokens
    for st in (ref, win):
        st.truncate(n - 5)
    assert win.n_tokens == n - 5 and win.cache.n_cached == n - 5
    assert list(win.generate(5)) == list(ref.generate(5)) == toks_ref[-5:]
    assert (win.next_token_logits() - ref.next_token_logits()).abs().max() <= TOL


# ---------------------------------------------------------------------- kernel mode (test 5)
def test_kernel_path_equals_dynamic_cache(thinker, lm, window_attn):
    """W >= session: the kernel path (torch reference on CPU) equals the growing DynamicCache."""
    ref = StreamingThinker(thinker)
    win = window_thinker(thinker, WindowConfig(sink_tokens=4, window_tokens=512, chunk_tokens=16, kernel=True))
    assert lm.config._attn_implementation == "omnistream_window"
    logits_ref, toks_ref = _run_session(ref, thinker)  # the same model: other caches fall back to SDPA
    calls = _kernel_calls()
    logits_win, toks_win = _run_session(win, thinker)
    assert _kernel_calls() - calls == 20 * len(lm.layers)  # every decode step through the kernel
    assert toks_ref == toks_win and not win.cache.evicted
    diff = max((a - b).abs().max().item() for a, b in zip(logits_ref, logits_win))
    print(f"kernel path vs DynamicCache over {len(logits_ref)} forwards: {diff:.2e}")
    assert diff <= TOL
    n = ref.n_tokens
    for st in (ref, win):
        st.truncate(n - 5)
    assert list(win.generate(5)) == list(ref.generate(5)) == toks_ref[-5:]
    assert (win.next_token_logits() - ref.next_token_logits()).abs().max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_path_equals_rotated_path_after_eviction(thinker, lm, window_attn, monkeypatch, backend):
    """Same session, W=24 (evicts): kernel mode == the rotated-key path at every forward; the Triton
    kernel runs under TRITON_INTERPRET=1 on CPU."""
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():  # the interpreter is off on GPU machines: test_kernel_path_on_cuda covers it
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set only without CUDA)")
    monkeypatch.setenv("OMNISTREAM_KERNELS", backend)
    cfg = WindowConfig(sink_tokens=4, window_tokens=24, chunk_tokens=8)
    rot = window_thinker(thinker, replace(cfg, kernel=False))
    logits_rot, toks_rot = _run_session(rot, thinker)
    ker = window_thinker(thinker, replace(cfg, kernel=True))
    calls = _kernel_calls()
    logits_ker, toks_ker = _run_session(ker, thinker)
    assert _kernel_calls() - calls == 20 * len(lm.layers)
    assert ker.cache.evicted and toks_rot == toks_ker
    assert ker.cache.kept_positions().tolist() == rot.cache.kept_positions().tolist()
    diff = max((a - b).abs().max().item() for a, b in zip(logits_rot, logits_ker))
    print(f"{backend}: kernel path vs rotated path over {len(logits_rot)} forwards (evicting): {diff:.2e}")
    assert diff <= TOL


def test_kernel_mode_never_rewrites_keys(lm, window_attn):
    """Re-positioning is free in kernel mode: over 150 decode steps (rebases included) the stored
    sink keys stay bit-identical and a window key changes only when its slot is overwritten by a
    new token; buffers are never reallocated."""
    S, W, T = 4, 32, 8
    cache = WindowCache(lm.config, WindowConfig(sink_tokens=S, window_tokens=W, chunk_tokens=T, kernel=True))
    x = torch.randn(1, 1, lm.config.hidden_size)
    with torch.inference_mode():
        lm(inputs_embeds=torch.randn(1, 20, x.shape[-1]), position_ids=cache.cache_positions(
            torch.arange(20).expand(3, -1)), cache=cache, use_cache=True)
        bufs, mem = _buffers(cache), cache.memory_bytes()
        sinks0 = [layer.keys[:, :, :S].clone() for layer in cache.layers]
        rebases = 0
        for p in range(20, 170):
            before = [layer.keys[:, :, : S + W].clone() for layer in cache.layers]
            base = cache.base
            lm(inputs_embeds=x, position_ids=cache.cache_positions(torch.full((3, 1), p)), cache=cache, use_cache=True)
            rebases += cache.base != base
            for layer, b in zip(cache.layers, before):  # at most the one slot flushed from the scratch changed
                changed = (layer.keys[:, :, : S + W] != b).any(dim=-1).any(dim=0).any(dim=0).nonzero().flatten()
                assert changed.numel() <= 1 and (changed.numel() == 0 or changed.item() >= S)
    assert rebases >= 5 and cache.evicted
    for layer, s0 in zip(cache.layers, sinks0):
        assert torch.equal(layer.keys[:, :, :S], s0)
    assert _buffers(cache) == bufs and cache.memory_bytes() == mem


def test_kernel_mode_without_window_attention_raises(lm):
    assert lm.config._attn_implementation == "sdpa"
    cache = WindowCache(lm.config, WindowConfig(sink_tokens=2, window_tokens=8, chunk_tokens=4, kernel=True))
    d = lm.config.hidden_size
    with torch.inference_mode():
        lm(inputs_embeds=torch.randn(1, 5, d), position_ids=cache.cache_positions(torch.arange(5).expand(3, -1)),
           cache=cache, use_cache=True)
        lm(inputs_embeds=torch.randn(1, 1, d), position_ids=cache.cache_positions(torch.full((3, 1), 5)),
           cache=cache, use_cache=True)  # pre-RoPE keys went to SDPA: detected at the next step
        with pytest.raises(RuntimeError, match="enable_window_attention"):
            lm(inputs_embeds=torch.randn(1, 1, d), position_ids=cache.cache_positions(torch.full((3, 1), 6)),
               cache=cache, use_cache=True)


def _forced_session(st, thinker, n_decode=20):
    """The _feed_session prompt, then ``n_decode`` fixed single-token forwards (decode steps with
    forced tokens, so sessions in different precisions stay comparable); logits after each forward."""
    logits = []
    orig = st._forward

    def spy(*a, **k):
        orig(*a, **k)
        logits.append(st.next_token_logits().float().cpu())

    st._forward = spy
    _feed_session(st, thinker, random.Random(0), torch.Generator().manual_seed(0))
    for t in random.Random(1).choices(range(1, 200), k=n_decode):
        st.append_text([t])
    return logits


def _kernel_paths_on(tiny_dir, device, dtype):
    """(kernel vs DynamicCache at W >= session, kernel vs rotated after eviction, rotated vs
    DynamicCache after eviction in ``dtype`` vs fp32, kernel vs fp32) max logit differences."""
    from omnistream.checkpoints import load_omni
    from omnistream.kernels.window_attention import disable_window_attention

    def model(dt):
        return load_omni(tiny_dir, talker=False, device=device, dtype=dt).thinker

    th = model(dtype)
    big = WindowConfig(sink_tokens=4, window_tokens=512, chunk_tokens=16)
    small = WindowConfig(sink_tokens=4, window_tokens=24, chunk_tokens=8)
    try:
        dyn = _forced_session(StreamingThinker(th), th)
        calls = _kernel_calls()
        ker_big = _forced_session(window_thinker(th, replace(big, kernel=True)), th)
        assert _kernel_calls() - calls == 20 * len(th.model.language_model.layers)
        ker = _forced_session(window_thinker(th, replace(small, kernel=True)), th)
        rot = _forced_session(window_thinker(th, replace(small, kernel=False)), th)
    finally:
        disable_window_attention(th)
    th32 = model(torch.float32)
    rot32 = _forced_session(window_thinker(th32, replace(small, kernel=False)), th32)

    def d(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    return d(ker_big, dyn), d(ker, rot), d(rot, rot32), d(ker, rot32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_on_cuda(tiny_dir, dtype):
    """The tiny Thinker on the GPU, decode through the compiled Triton kernel: fp32 equals the growing
    cache and the rotated-key path; bf16 is no less accurate than the rotated-key path (vs fp32)."""
    vs_dyn, vs_rot, rot_err, ker_err = _kernel_paths_on(tiny_dir, "cuda", dtype)
    print(f"cuda {dtype}: kernel vs DynamicCache {vs_dyn:.2e}, vs rotated {vs_rot:.2e}; "
          f"error vs fp32: rotated {rot_err:.2e}, kernel {ker_err:.2e}")
    if dtype == torch.float32:
        assert vs_dyn <= 1e-4 and vs_rot <= 1e-4
    else:
        assert ker_err <= 2 * rot_err + 1e-3


# ---------------------------------------------------------------------- oracle (test 2)
def _session_pieces(thinker, rnd, n_target):
    """(3, N) TMRoPE positions of a session: text, an audio-in-video segment, text, ... ."""
    rope = TMRoPE.from_config(thinker.config)
    pos = []
    while sum(p.shape[1] for p in pos) < n_target:
        for p in rope.text([1] * rnd.randint(1, 6)):
            pos.append(p.pos)
        for p in rope.begin_audio_video(1.0):
            pos.append(p.pos)
        for _ in range(rnd.randint(1, 3)):
            for p in rope.video_patch((4, 4)) + rope.audio_block(rnd.randint(3, 20)):
                pos.append(p.pos)
        for p in rope.end():
            pos.append(p.pos)
    return torch.cat(pos, dim=1)


def _rope_keys(lm, k_pre, pos):
    """Rotate pre-RoPE keys (1, H, n, D) at 3-D positions (3, n) with the model's own rotary code."""
    cos, sin = lm.rotary_emb(k_pre, pos[:, None, :])
    return apply_rotary_pos_emb(k_pre, k_pre, cos, sin)[1]


class OracleRun:
    """Drive ``lm`` over a WindowCache and check every forward against the StreamingLLM oracle.

    Tokens are identified by their index in ``self.emb``/``self.pos`` (a crop forgets the last ones;
    later tokens are new rows). ``held`` lists the tokens the oracle keeps: the first S (sinks) and
    the last W of the others, minus cropped ones.
    """

    def __init__(self, lm, thinker, cache, pos_all):
        self.lm, self.thinker, self.cache, self.pos_all = lm, thinker, cache, pos_all
        self.S, self.W = cache.S, cache.W
        self.per_axis = cache.per_axis
        self.d = lm.config.hidden_size
        self.emb = torch.empty(0, self.d)
        self.pos = torch.empty(3, 0, dtype=torch.long)
        self.rec = {}  # (layer, "k"/"v") -> (H, n_tokens, D): k_proj (pre-RoPE) / v_proj outputs of the run
        self.held, self.evicted, self.recording = [], False, True
        self.checked, self.worst_a, self.worst_b = 0, 0.0, 0.0
        self.next_pos = 0
        heads = lm.config.num_key_value_heads
        self.hooks = []
        for li, layer in enumerate(lm.layers):
            for name, mod in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj)):
                def hk(m, i, out, key=(li, name)):
                    if self.recording:
                        x = out[0].view(out.shape[1], heads, -1).transpose(0, 1)
                        self.rec[key] = torch.cat([self.rec[key], x], dim=1) if key in self.rec else x
                self.hooks.append(mod.register_forward_hook(hk))

    def close(self):
        for h in self.hooks:
            h.remove()

    def crop(self, k):
        self.cache.crop(-k)
        n = self.emb.shape[0] - k
        assert self.held[-k:] == list(range(n, n + k))
        self.held = self.held[:-k]
        self.emb, self.pos = self.emb[:n], self.pos[:, :n]
        self.rec = {key: v[:, :n] for key, v in self.rec.items()}
        self.next_pos -= k  # the rewound tokens' positions are reused (as StreamingThinker.truncate does)

    def _oracle_positions(self, new):
        S, held = self.S, self.held
        kp, qp = self.pos[:, held].clone(), self.pos[:, new].clone()
        rest_h = [j for j, i in enumerate(held) if i >= S]
        rest_n = [j for j, i in enumerate(new) if i >= S]
        if self.evicted:
            rest = [held[j] for j in rest_h] + [new[j] for j in rest_n]
            sinks = [i for i in held if i < S]
            if self.per_axis:
                end = self.pos[:, sinks].max(dim=1).values + 1
                delta = (self.pos[:, rest].min(dim=1).values - end).clamp_min(0)
            else:
                end = int(self.pos[:, sinks].max()) + 1 if sinks else 0
                delta = torch.full((3,), max(0, int(self.pos[:, rest].min()) - end))
            kp[:, rest_h] -= delta[:, None]
            qp[:, rest_n] -= delta[:, None]
            assert tuple(self.cache.delta) == tuple(delta.tolist())
        return kp, qp

    @torch.inference_mode()
    def forward(self, n):
        lm, S, W = self.lm, self.S, self.W
        start = self.emb.shape[0]
        new = list(range(start, start + n))
        self.emb = torch.cat([self.emb, torch.randn(n, self.d)])
        self.pos = torch.cat([self.pos, self.pos_all[:, self.next_pos : self.next_pos + n]], dim=1)
        self.next_pos += n
        out = lm(inputs_embeds=self.emb[None, new], position_ids=self.cache.cache_positions(self.pos[:, new]),
                 cache=self.cache, use_cache=True, output_hidden_states=True)
        self.recording = False
        held = self.held
        kp, qp = self._oracle_positions(new)
        # (a) layer 0 from scratch, no cache at all
        ref0 = lm(inputs_embeds=self.emb[None, held + new], position_ids=torch.cat([kp, qp], dim=1)[:, None],
                  use_cache=False, output_hidden_states=True).hidden_states[1][0, len(held):]
        da = (ref0 - out.hidden_states[1][0]).abs().max().item()
        # (b) whole model over a fresh DynamicCache holding exactly the kept tokens
        dc = None
        if held:
            dc = DynamicCache(config=lm.config)
            for li in range(len(lm.layers)):
                ks, vs = self.rec[(li, "k")][None, :, held], self.rec[(li, "v")][None, :, held]
                dc.update(_rope_keys(lm, ks, kp), vs, li)
        ref = lm(inputs_embeds=self.emb[None, new], position_ids=qp[:, None], cache=dc, use_cache=dc is not None)
        db = (ref.last_hidden_state - out.last_hidden_state).abs().max().item()
        head = self.thinker.lm_head
        dl = (head(ref.last_hidden_state) - head(out.last_hidden_state)).abs().max().item()
        self.recording = True
        self.worst_a, self.worst_b = max(self.worst_a, da), max(self.worst_b, db, dl)
        assert da <= TOL and db <= TOL and dl <= TOL, (start, n, da, db, dl)
        self.checked += self.evicted
        # the oracle's cache after this forward: sinks + the last W others
        sinks = [i for i in held + new if i < S]
        others = [i for i in held + new if i >= S]
        self.evicted |= len(others) > W
        self.held = sinks + others[-W:]
        assert self.cache.n_cached == len(self.held)
        assert self.cache.kept_positions().tolist() == self.pos[:, self.held].tolist()


@pytest.mark.parametrize(
    "S,W,T,R,shift_mode,kernel",
    [(4, 24, 8, 5, "uniform", False), (2, 17, 32, 1, "uniform", False), (4, 24, 8, 3, "per_axis", False),
     (4, 24, 8, 5, "uniform", True), (2, 17, 32, 1, "per_axis", True)],
)
def test_window_matches_streaming_llm_oracle(lm, thinker, window_attn, S, W, T, R, shift_mode, kernel):
    torch.manual_seed(0)
    sizes = [3, 9, 1, 1, 30, 1, 5, 1, 12, 1, 1, 40, 2] + [1] * 12 + [7, 1, 1]
    pos_all = _session_pieces(thinker, random.Random(S * 100 + W), sum(sizes) + 10)
    cfg = WindowConfig(S, W, T, R, shift_mode, kernel=kernel)
    calls = _kernel_calls()
    run = OracleRun(lm, thinker, WindowCache(lm.config, cfg), pos_all)
    try:
        for n in sizes:
            run.forward(n)
    finally:
        run.close()
    print(f"S={S} W={W} T={T} R={R} {shift_mode} kernel={kernel}: {run.checked} evicted forwards, "
          f"max diff layer0 {run.worst_a:.2e}, model {run.worst_b:.2e}")
    assert run.checked >= 15 and run.cache.evicted
    # decode steps (n == 1) went through the kernel in kernel mode, never otherwise
    assert _kernel_calls() - calls == (sizes.count(1) * len(lm.layers) if kernel else 0)


@pytest.mark.parametrize("kernel", [False, True])
def test_crop_after_eviction_matches_oracle(lm, thinker, window_attn, kernel):
    """Crop inside the window after evictions (ring compaction), then keep going."""
    torch.manual_seed(1)
    pos_all = _session_pieces(thinker, random.Random(7), 200)
    cache = WindowCache(lm.config, WindowConfig(sink_tokens=3, window_tokens=16, chunk_tokens=4, rebase_every=3,
                                                kernel=kernel))
    run = OracleRun(lm, thinker, cache, pos_all)
    try:
        for n in [5, 20, 1, 1, 3]:
            run.forward(n)
        assert cache.evicted and cache.count == 16 and cache.head != 0
        run.crop(2)
        for n in [1, 1, 6, 1]:
            run.forward(n)
        run.crop(5)
        for n in [2, 1, 1, 9, 1]:
            run.forward(n)
    finally:
        run.close()
    print(f"crop after eviction: {run.checked} evicted forwards, max diff {max(run.worst_a, run.worst_b):.2e}")
    assert run.checked >= 10


# ---------------------------------------------------------------------- bounded memory / positions
def _buffers(cache):
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values, layer.sink_keys)]
    return [(t.data_ptr(), tuple(t.shape)) for t in tensors]


@pytest.mark.slow
def test_memory_bounded_and_positions_small_over_5k_steps(lm):
    S, W, T = 4, 32, 8
    cache = WindowCache(lm.config, WindowConfig(sink_tokens=S, window_tokens=W, chunk_tokens=T))
    R = cache.R
    x = torch.randn(1, 1, lm.config.hidden_size)
    p = 0
    with torch.inference_mode():
        lm(inputs_embeds=torch.randn(1, 20, x.shape[-1]), position_ids=cache.cache_positions(
            torch.arange(20).expand(3, -1)), cache=cache, use_cache=True)
        p = 20
        bufs, mem = _buffers(cache), cache.memory_bytes()
        hi = 0
        for step in range(5000):
            q = cache.cache_positions(torch.full((3, 1, 1), p))
            lm(inputs_embeds=x, position_ids=q, cache=cache, use_cache=True)
            p += 1
            hi = max(hi, int(q.max()))
            if step % 250 == 0:
                assert _buffers(cache) == bufs and cache.memory_bytes() == mem
    assert _buffers(cache) == bufs and cache.memory_bytes() == mem
    assert cache.n_cached == S + W and cache.get_seq_length() == 5020
    assert mem == 2 * 2 * (S + W + T) * 2 * 16 * 4 + 2 * S * 2 * 16 * 4  # layers x (K,V) x slots x H x D x fp32 + sinks
    print(f"5000 steps: memory {mem} B constant, max rotated position {hi} (S+W+1+R = {S + W + 1 + R})")
    assert hi < S + W + 1 + R
    assert cache.bookkeeping_bytes() < 10_000


@pytest.mark.parametrize("R", [1, None])
def test_rotated_positions_bounded_long_stream(R):
    """Bookkeeping only (no forward): 20k tokens in mixed chunks of an audio-in-video stream."""
    S, W = 4, 64
    cfg = WindowConfig(sink_tokens=S, window_tokens=W, rebase_every=R, chunk_tokens=16)
    cache = WindowCache(None, cfg, num_layers=1, inv_freq=torch.ones(8), mrope_section=[2, 3, 3])
    rnd = random.Random(1)
    p, worst_excess = 0, -10**9
    for _ in range(3000):
        n = rnd.choice([1, 1, 1, 3, 7, 25])
        q = cache.cache_positions(torch.arange(p, p + n).expand(3, -1))
        cache._plan = None  # no forward follows (layers never initialized)
        p += n
        if cache.evicted:
            worst_excess = max(worst_excess, int(q.max()) - (S + W + n))
    bound = 0 if R == 1 else cache.R
    print(f"rebase_every={cache.R}: max rotated - (S+W+n) = {worst_excess} (< {bound})")
    assert worst_excess < bound
    assert cache.min_rotated_position >= 0


# ---------------------------------------------------------------------- API details
def test_config_from_seconds_and_defaults(lm):
    c = WindowConfig.from_seconds(60)
    assert c.window_tokens == 1500 and c.sink_tokens == 4
    assert WindowConfig.from_seconds(10, tokens_per_second=25 + 64).window_tokens == 890
    full = WindowCache(lm.config)  # default: window sized to the model's context
    assert full.S + full.W + full.T + full.R == lm.config.max_position_embeddings
    with pytest.raises(ValueError):
        WindowConfig(shift="nope")


def test_crop_and_errors(lm):
    S, W = 2, 8
    cache = WindowCache(lm.config, WindowConfig(sink_tokens=S, window_tokens=W, chunk_tokens=4))
    d = lm.config.hidden_size
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="cache_positions"):
            lm(inputs_embeds=torch.randn(1, 1, d), position_ids=torch.zeros(3, 1, 1, dtype=torch.long),
               cache=cache, use_cache=True)
        cache.reset()
        emb = torch.randn(1, 30, d)

        def fwd(a, b):
            return lm(inputs_embeds=emb[:, a:b], position_ids=cache.cache_positions(torch.arange(a, b).expand(3, -1)),
                      cache=cache, use_cache=True).last_hidden_state

        fwd(0, 6)
        cache.crop(-3)  # exact rollback before any eviction
        assert cache.get_seq_length() == 3 and cache.is_croppable
        again = fwd(3, 6)
        ref = WindowCache(lm.config, WindowConfig(sink_tokens=S, window_tokens=W, chunk_tokens=4))
        ref_out = lm(inputs_embeds=emb[:, :6], position_ids=ref.cache_positions(torch.arange(6).expand(3, -1)),
                     cache=ref, use_cache=True).last_hidden_state
        assert (again - ref_out[:, 3:]).abs().max() <= TOL
        fwd(6, 20)  # evicts
        assert not cache.is_croppable
        cache.crop(-2)  # drop two window tokens; ring compacted
        assert cache.n_cached == S + W - 2 and cache.kept_positions()[0].tolist() == [0, 1] + list(range(12, 18))
        fwd(18, 19)
        assert cache.kept_positions()[0].tolist() == [0, 1] + list(range(12, 19))
        with pytest.raises(ValueError):
            cache.crop(-(W + 1))


# ---------------------------------------------------------------------- segment cutting (OmniChat)
def _media_turn(ck, seconds, *, segment_s, video=True, W=64, T=64, seed=0):
    """A live audio(+video) turn through OmniChat over a window cache: 0.5-s audio pieces and a
    frame every 0.5 s (2 fps). Returns the chat and the largest rotated position after each piece."""
    import numpy as np

    from omnistream.chat import OmniChat

    chat = OmniChat(ck, window=WindowConfig(sink_tokens=4, window_tokens=W, chunk_tokens=T), segment_s=segment_s)
    rng = np.random.default_rng(seed)
    frame = (rng.random((56, 56, 3)) * 255).astype(np.uint8)
    chat.begin_turn(audio=True, video=video)
    hist = []
    for i in range(int(seconds * 2)):
        chat.push_audio((rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
        if video:
            chat.push_frame(frame, i * 0.5 + 0.25)
        hist.append(chat.thinker.cache.max_rotated_position)
    chat.end_turn("what was that?")
    return chat, hist


@pytest.mark.slow
@pytest.mark.parametrize("video", [True, False])
def test_segment_cutting_bounds_rotated_positions(tiny, video):
    """40 s of media with 4-s segments: the rotated positions plateau (the same maximum over the
    last 30 s as after 10 s) under a bound set by the window and two segments; without cutting, an
    audio-in-video turn's positions keep growing past that bound."""
    seg, W, T = 4.0, 64, 64
    chat, hist = _media_turn(tiny, 40, segment_s=seg, video=video, W=W, T=T)
    cache = chat.thinker.cache
    bound = cache.S + W + T + cache.R + 2 * int(seg * 25)
    print(f"video={video}: {chat.segments_cut} cuts, max rotated position {hist[19]} at 10 s, {hist[-1]} at 40 s "
          f"(bound {bound}), {chat.thinker.n_tokens} tokens")
    assert chat.segments_cut == 40 // int(seg) - 1 and chat.thinker.rope.open_segment is None
    assert hist[-1] == hist[19] < bound
    assert chat.stats.audio_blocks == 20 and chat.stats.video_patches == (40 if video else 0)
    if video:
        _, hist_uncut = _media_turn(tiny, 40, segment_s=None, video=True, W=W, T=T)
        print(f"without cutting: {hist_uncut[19]} at 10 s, {hist_uncut[-1]} at 40 s")
        assert hist_uncut[-1] > 2 * bound


def test_short_turns_unchanged_by_segment_cutting(tiny):
    """A turn shorter than segment_s takes exactly the same path: same positions, same logits."""
    a, _ = _media_turn(tiny, 3, segment_s=60.0)
    b, _ = _media_turn(tiny, 3, segment_s=None)
    assert a.segments_cut == 0
    assert torch.equal(a.thinker.rope.positions, b.thinker.rope.positions)
    assert torch.equal(a.thinker.next_token_logits(), b.thinker.next_token_logits())
