"""Sink + sliding-window KV-cache kernels: Triton (interpreter on CPU) vs the torch reference vs a
brute-force attention built from transformers' own Qwen2.5-Omni rotary module."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton kernels are defined (omnistream.kernels imports them lazily).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniRotaryEmbedding,
    apply_rotary_pos_emb,
)

from omnistream import kernels as K

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAVE_TRITON = K.triton_available()
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install omnistream[gpu])")


# ------------------------------------------------------------------------------------------------
# helpers


def rotary(D: int, section, theta: float = 1e6) -> Qwen2_5OmniRotaryEmbedding:
    cfg = Qwen2_5OmniTextConfig(
        hidden_size=D * 4, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)},
    )
    return Qwen2_5OmniRotaryEmbedding(cfg).to(DEVICE)


def brute_force(q, q_pos, k_cache, v_cache, slot_pos, valid, rot, scaling=None):
    """Rotate with transformers' rotary module + apply_rotary_pos_emb, then plain softmax(QK^T)V over
    the valid slots, per batch row and head, in float64."""
    B, Hq, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    x = torch.empty(0, dtype=torch.float32, device=q.device)
    cos_k, sin_k = rot(x, slot_pos.permute(1, 0, 2).long())  # (B, N, D)
    cos_q, sin_q = rot(x, q_pos.t()[:, :, None].long())  # (B, 1, D)
    kr, _ = apply_rotary_pos_emb(k_cache.float(), k_cache.float(), cos_k, sin_k)  # (B, Hkv, N, D)
    qr, _ = apply_rotary_pos_emb(q.float()[:, :, None], q.float()[:, :, None], cos_q, sin_q)
    qr = qr[:, :, 0]
    out = torch.zeros(B, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        idx = torch.arange(N, device=q.device) if valid is None else valid[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        for hq in range(Hq):
            h = hq // G
            s = (kr[b, h, idx].double() @ qr[b, hq].double()) * scale
            out[b, hq] = torch.softmax(s, 0) @ v_cache[b, h, idx].double()
    return out


def make_case(B, Hkv, G, S, W, D, section, fill, dtype=torch.float32, seed=0, max_pos=20000):
    """Random cache; ``fill``: 'full' (wrapped ring, every slot valid), 'partial' (window not yet full:
    sinks + first few ring slots), 'holes' (random non-contiguous valid slots), 'none'."""
    g = torch.Generator().manual_seed(seed)
    N = S + W
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    slot_pos = torch.randint(0, max_pos, (B, 3, N), generator=g, dtype=torch.int32)
    q_pos = torch.randint(0, max_pos, (B, 3), generator=g, dtype=torch.int32)
    if fill == "full":
        valid = torch.ones(B, N, dtype=torch.bool)
    elif fill == "partial":
        valid = torch.zeros(B, N, dtype=torch.bool)
        for b in range(B):
            valid[b, : S + max(1, (W * (b + 1)) // (B + 2))] = True
    elif fill == "holes":
        valid = torch.rand(B, N, generator=g) < 0.6
        valid[:, 0] = True
    elif fill == "none":
        valid = torch.zeros(B, N, dtype=torch.bool)
    else:
        raise ValueError(fill)
    # garbage (NaN) in unfilled slots must never leak into the output
    if fill != "full" and dtype != torch.int32:
        k[~valid[:, None, :].expand(B, Hkv, N)] = float("nan")
        v[~valid[:, None, :].expand(B, Hkv, N)] = float("nan")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    t = lambda x: x.to(DEVICE)
    return t(q), t(q_pos), t(k), t(v), t(slot_pos), t(valid), t(inv_freq)


SECTIONS = {16: [2, 3, 3], 64: [8, 12, 12], 128: [16, 24, 24], 80: [10, 15, 15], 32: [4, 6, 6]}


# ------------------------------------------------------------------------------------------------
# reference vs transformers


@pytest.mark.parametrize("D", [16, 64, 128])
def test_mrope_cos_sin_matches_transformers(D):
    sec = SECTIONS[D]
    rot = rotary(D, sec)
    pos = torch.randint(0, 50000, (2, 3, 11), dtype=torch.int32, device=DEVICE)
    cos, sin = K.mrope_cos_sin(pos, rot.inv_freq, sec)
    cos_t, sin_t = rot(torch.empty(0, device=DEVICE), pos.permute(1, 0, 2).long())
    torch.testing.assert_close(cos, cos_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_t, rtol=0, atol=1e-6)
    assert K.mrope_component(sec).tolist() == [j for j, n in enumerate(sec) for _ in range(n)]


@pytest.mark.parametrize("fill", ["full", "partial", "holes", "none"])
def test_reference_vs_brute_force(fill):
    D, sec = 64, SECTIONS[64]
    q, qp, k, v, sp, valid, _ = make_case(2, 2, 4, 4, 29, D, sec, fill, seed=1)
    rot = rotary(D, sec)
    ref = K.window_decode_attention_ref(q, qp, k, v, sp, valid, rot.inv_freq, sec)
    bf = brute_force(q, qp, k, v, sp, valid, rot)
    torch.testing.assert_close(ref.double(), bf, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Triton decode attention


DECODE_CASES = [
    # B, Hkv, G, S, W, D, fill, num_splits
    (1, 2, 1, 4, 27, 16, "full", 1),
    (2, 2, 2, 4, 60, 16, "partial", 1),
    (2, 1, 7, 2, 100, 16, "holes", 3),
    (1, 2, 4, 4, 200, 64, "full", 4),
    (2, 2, 7, 4, 93, 64, "holes", 1),
    (3, 1, 2, 0, 45, 64, "partial", 2),
    (1, 2, 4, 4, 300, 128, "holes", 2),
    (2, 1, 1, 4, 61, 128, "full", 1),
    (1, 2, 2, 4, 70, 80, "holes", 2),  # non-power-of-two head dim
    (2, 2, 2, 4, 40, 64, "none", 2),
]


@needs_triton
@pytest.mark.parametrize("B,Hkv,G,S,W,D,fill,ns", DECODE_CASES)
def test_decode_triton_fp32(B, Hkv, G, S, W, D, fill, ns):
    sec = SECTIONS[D]
    q, qp, k, v, sp, valid, inv_freq = make_case(B, Hkv, G, S, W, D, sec, fill, seed=B * 100 + W)
    out = K.window_decode_attention(q, qp, k, v, sp, valid, inv_freq, sec, backend="triton", num_splits=ns)
    ref = K.window_decode_attention_ref(q, qp, k, v, sp, valid, inv_freq, sec)
    assert out.shape == (B, Hkv * G, D) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    bf = brute_force(q, qp, k, v, sp, valid, rotary(D, sec))
    torch.testing.assert_close(out.double(), bf, rtol=1e-4, atol=2e-5)


@needs_triton
def test_decode_triton_valid_none_and_scaling():
    D, sec = 64, SECTIONS[64]
    q, qp, k, v, sp, _, inv_freq = make_case(2, 2, 2, 4, 50, D, sec, "full", seed=7)
    out = K.window_decode_attention(q, qp, k, v, sp, None, inv_freq, sec, scaling=0.3, backend="triton", num_splits=2)
    ref = K.window_decode_attention_ref(q, qp, k, v, sp, None, inv_freq, sec, scaling=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("D,G,ns", [(128, 4, 2), (16, 2, 1)])
def test_decode_triton_half(dtype, tol, D, G, ns):
    sec = SECTIONS[D]
    q, qp, k, v, sp, valid, inv_freq = make_case(2, 2, G, 4, 90, D, sec, "holes", dtype=dtype, seed=3)
    out = K.window_decode_attention(q, qp, k, v, sp, valid, inv_freq, sec, backend="triton", num_splits=ns)
    assert out.dtype == dtype
    ref = K.window_decode_attention_ref(q, qp, k, v, sp, valid, inv_freq, sec)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@needs_triton
def test_decode_noncontiguous_inputs():
    """Strided views (e.g. q sliced out of a fused projection, cache slices) are handled."""
    D, sec = 64, SECTIONS[64]
    q, qp, k, v, sp, valid, inv_freq = make_case(2, 4, 2, 4, 40, D, sec, "holes", seed=5)
    kk = torch.stack([k, k], dim=2).flatten(1, 2)[:, ::2]  # non-contiguous, same values
    assert not kk.is_contiguous() and torch.equal(kk.nan_to_num(), k.nan_to_num())
    qq = torch.cat([q, q], dim=-1)[..., :D]
    out = K.window_decode_attention(qq, qp, kk, v, sp, valid, inv_freq, sec, backend="triton", num_splits=2)
    ref = K.window_decode_attention_ref(q, qp, k, v, sp, valid, inv_freq, sec)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# append


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ring_append(backend, dtype):
    B, Hkv, N, D, T = 2, 3, 20, 16, 5
    g = torch.Generator().manual_seed(11)

    def fresh():
        return (torch.zeros(B, Hkv, N, D, dtype=dtype, device=DEVICE), torch.zeros(B, Hkv, N, D, dtype=dtype, device=DEVICE),
                torch.full((B, 3, N), -1, dtype=torch.int32, device=DEVICE), torch.zeros(B, N, dtype=torch.bool, device=DEVICE))

    k_new = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)  # float32 -> cast into the cache dtype
    v_new = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
    pos_new = torch.randint(0, 1000, (B, 3, T), generator=g, dtype=torch.int32).to(DEVICE)
    slots = torch.tensor([17, 3, 9, 0, 12], dtype=torch.int64, device=DEVICE)
    got, want = fresh(), fresh()
    K.ring_append(*got, k_new, v_new, pos_new, slots, backend=backend)
    K.ring_append_ref(*want, k_new, v_new, pos_new, slots)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[3].sum().item() == B * T
    # a strided k_new view (e.g. a slice of the projected sequence) works too
    kv = torch.randn(B, Hkv, 2 * T, D, generator=g).to(DEVICE)
    K.ring_append(*got, kv[:, :, ::2], kv[:, :, 1::2], pos_new, slots, backend=backend)
    K.ring_append_ref(*want, kv[:, :, ::2], kv[:, :, 1::2], pos_new, slots)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# end to end: stream tokens through a sink + ring cache, decode after each append


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_streaming_sink_window(backend):
    """StreamingLLM-style: S sinks then a W ring; positions are cache positions (sinks 0..S-1, the
    window re-indexed S..S+W-1 by age each step); wrap-around leaves slots in rotated order."""
    B, Hkv, G, S, W, D = 1, 2, 2, 2, 6, 16
    sec = SECTIONS[D]
    N = S + W
    rot = rotary(D, sec)
    g = torch.Generator().manual_seed(2)
    kc = torch.zeros(B, Hkv, N, D, device=DEVICE)
    vc = torch.zeros_like(kc)
    sp = torch.zeros(B, 3, N, dtype=torch.int32, device=DEVICE)
    valid = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    keys, vals = [], []
    for step in range(S + 2 * W + 3):
        kn = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
        vn = torch.randn(B, Hkv, 1, D, generator=g).to(DEVICE)
        keys.append(kn)
        vals.append(vn)
        slot = step if step < S else S + (step - S) % W
        K.ring_append(kc, vc, sp, valid, kn, vn, torch.zeros(B, 3, 1, dtype=torch.int32, device=DEVICE),
                      torch.tensor([slot], device=DEVICE), backend=backend)
        # re-shift positions into cache space: window entries by age, text-like (t = h = w)
        kept = list(range(min(step + 1, S))) + list(range(max(S, step + 1 - W), step + 1))
        for rank, tok in enumerate(kept):
            s_ = tok if tok < S else S + (tok - S) % W
            sp[:, :, s_] = rank
        q = torch.randn(B, Hkv * G, D, generator=g).to(DEVICE)
        qp = torch.full((B, 3), len(kept) - 1, dtype=torch.int32, device=DEVICE)
        out = K.window_decode_attention(q, qp, kc, vc, sp, valid, rot.inv_freq, sec, backend=backend)
        # independent: contiguous sequence of the kept tokens at positions 0..len-1
        kseq = torch.cat([keys[t] for t in kept], dim=2)
        vseq = torch.cat([vals[t] for t in kept], dim=2)
        pos = torch.arange(len(kept), dtype=torch.int32, device=DEVICE).expand(B, 3, -1)
        bf = brute_force(q, qp, kseq, vseq, pos, None, rot)
        torch.testing.assert_close(out.double(), bf, rtol=1e-4, atol=2e-5)
    assert valid.all()


# ------------------------------------------------------------------------------------------------
# dispatcher


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMNISTREAM_KERNELS", raising=False)
    assert K.resolve_backend(cpu) == "torch"
    monkeypatch.setenv("OMNISTREAM_KERNELS", "torch")
    assert K.resolve_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("OMNISTREAM_KERNELS", "bogus")
    with pytest.raises(ValueError):
        K.resolve_backend(cpu)
    if HAVE_TRITON:
        monkeypatch.setenv("OMNISTREAM_KERNELS", "triton")
        assert K.resolve_backend(DEVICE) == "triton"
        assert K.resolve_backend(DEVICE, "torch") == "torch"  # explicit argument wins


@needs_triton
def test_decode_triton_long_positions():
    """Positions of a 128k+ context (angles up to ~3e5 rad): in-kernel range reduction keeps RoPE exact."""
    D, sec = 128, SECTIONS[128]
    q, qp, k, v, sp, valid, inv_freq = make_case(1, 2, 2, 4, 60, D, sec, "holes", seed=9, max_pos=300_000)
    out = K.window_decode_attention(q, qp, k, v, sp, valid, inv_freq, sec, backend="triton", num_splits=1)
    ref = K.window_decode_attention_ref(q, qp, k, v, sp, valid, inv_freq, sec)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
