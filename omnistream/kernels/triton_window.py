"""Triton kernels for the sink + sliding-window KV cache (layout: see ``reference.py``).

* ``window_decode_attention_triton``: one new query token against the cache; RoPE (3-D M-RoPE,
  rotate_half) is applied in-kernel to q at ``q_pos`` and to every key at its ``slot_pos``.
  Grid ``(B * H_kv, num_splits)``: each program owns all ``G`` query heads of one kv head (the K/V
  tile is read once per kv head) and a contiguous range of slots, walked in ``BLOCK_N`` blocks with
  an online (base-2) softmax.  With ``num_splits > 1`` (split-K, for long caches / small batch)
  the partial (max, sum, acc) go to a float32 workspace and a second kernel merges them.
* ``ring_append_triton``: scatter ``T`` new (un-rotated) K/V rows and their positions into given
  slots and mark them valid.

This module imports triton at import time; import it lazily (``omnistream.kernels`` does).  On a
CPU-only machine it runs under the interpreter when ``TRITON_INTERPRET=1`` was set before import.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .reference import mrope_component

__all__ = ["default_num_splits", "ring_append_triton", "window_decode_attention_triton"]

_LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _cos_sin(ang):
    """cos/sin of float32 angles up to ~4e5 rad (RoPE at 128k+ positions): explicit 3-term
    Cody-Waite reduction to [-pi, pi] first, so a hardware-approximate sin/cos stays accurate."""
    k = tl.floor(ang * 0.15915494309189535 + 0.5)
    r = tl.fma(-k, 6.28125, ang)  # exact for k < 2**16
    r = tl.fma(-k, 0.0019353071693331003, r)
    r = tl.fma(-k, 1.0253131677018246e-11, r)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _window_decode_kernel(
    Q, QPOS, K, V, SPOS, VALID, INVF, COMP,
    OUT, WS_M, WS_L, WS_ACC,
    N, SLOTS_PER_SPLIT, NUM_SPLITS, qk_scale,
    s_qb, s_qh, s_qd,
    s_qpb, s_qpc,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_pb, s_pc, s_pn,
    s_mb, s_mn,
    s_ob, s_oh, s_od,
    H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, HAS_VALID: tl.constexpr,
    DOT_DT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_g = tl.arange(0, G_PAD)
    offs_h = tl.arange(0, HALF_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < G
    h_mask = offs_h < HALF
    d_mask = offs_d < 2 * HALF

    inv_freq = tl.load(INVF + offs_h, mask=h_mask, other=0.0)
    comp = tl.load(COMP + offs_h, mask=h_mask, other=0)

    # ---- query: rotate at q_pos, fold in softmax scale * log2(e)
    qp_t = tl.load(QPOS + b64 * s_qpb)
    qp_h = tl.load(QPOS + b64 * s_qpb + s_qpc)
    qp_w = tl.load(QPOS + b64 * s_qpb + 2 * s_qpc)
    qpos = tl.where(comp == 0, qp_t, tl.where(comp == 1, qp_h, qp_w)).to(tl.float32)
    cq, sq = _cos_sin(qpos * inv_freq)
    q_ptr = Q + b64 * s_qb + (h * G + offs_g)[:, None].to(tl.int64) * s_qh + offs_h[None, :] * s_qd
    qm = g_mask[:, None] & h_mask[None, :]
    q1 = tl.load(q_ptr, mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + HALF * s_qd, mask=qm, other=0.0).to(tl.float32)
    q1r = ((q1 * cq[None, :] - q2 * sq[None, :]) * qk_scale).to(K.dtype.element_ty).to(DOT_DT)
    q2r = ((q2 * cq[None, :] + q1 * sq[None, :]) * qk_scale).to(K.dtype.element_ty).to(DOT_DT)

    start = pid_s * SLOTS_PER_SPLIT
    end = tl.minimum(start + SLOTS_PER_SPLIT, N)

    m_i = tl.full((G_PAD,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)

    k_base = K + b64 * s_kb + h64 * s_kh
    v_base = V + b64 * s_vb + h64 * s_vh
    p_base = SPOS + b64 * s_pb
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        if HAS_VALID:
            ok = tl.load(VALID + b64 * s_mb + offs_n * s_mn, mask=n_mask, other=0) != 0
            n_mask = n_mask & ok
        offs_n64 = offs_n.to(tl.int64)
        p_t = tl.load(p_base + offs_n64 * s_pn, mask=n_mask, other=0)
        p_h = tl.load(p_base + s_pc + offs_n64 * s_pn, mask=n_mask, other=0)
        p_w = tl.load(p_base + 2 * s_pc + offs_n64 * s_pn, mask=n_mask, other=0)
        pos = tl.where(comp[None, :] == 0, p_t[:, None],
                       tl.where(comp[None, :] == 1, p_h[:, None], p_w[:, None])).to(tl.float32)
        ck, sk = _cos_sin(pos * inv_freq[None, :])
        km = n_mask[:, None] & h_mask[None, :]
        k_ptr = k_base + offs_n64[:, None] * s_kn + offs_h[None, :] * s_kd
        k1 = tl.load(k_ptr, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + HALF * s_kd, mask=km, other=0.0).to(tl.float32)
        k1r = (k1 * ck - k2 * sk).to(K.dtype.element_ty).to(DOT_DT)
        k2r = (k2 * ck + k1 * sk).to(K.dtype.element_ty).to(DOT_DT)
        if IEEE:
            s = tl.dot(q1r, tl.trans(k1r), input_precision="ieee")
            s = tl.dot(q2r, tl.trans(k2r), acc=s, input_precision="ieee")
        else:
            s = tl.dot(q1r, tl.trans(k1r))
            s = tl.dot(q2r, tl.trans(k2r), acc=s)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = v_base + offs_n64[:, None] * s_vn + offs_d[None, :] * s_vd
        v = tl.load(v_ptr, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(V.dtype.element_ty).to(DOT_DT), v.to(DOT_DT), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        row = (pid_bh.to(tl.int64) * NUM_SPLITS + pid_s) * G_PAD + offs_g
        tl.store(WS_M + row, m_i)
        tl.store(WS_L + row, l_i)
        tl.store(WS_ACC + row[:, None] * D_PAD + offs_d[None, :], acc)
    else:
        denom = tl.where(l_i > 0, l_i, 1.0)
        out = acc / denom[:, None]
        o_ptr = OUT + b64 * s_ob + (h * G + offs_g)[:, None].to(tl.int64) * s_oh + offs_d[None, :] * s_od
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _split_combine_kernel(
    WS_M, WS_L, WS_ACC, OUT, NUM_SPLITS,
    s_ob, s_oh, s_od,
    H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    pid = tl.program_id(0)  # over B * H_kv * G
    bh = pid // G
    g = pid % G
    b = bh // H_KV
    h = bh % H_KV
    offs_d = tl.arange(0, D_PAD)
    m_run = tl.full((), -1.0e30, dtype=tl.float32)
    l_run = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((D_PAD,), dtype=tl.float32)
    for sp in range(NUM_SPLITS):
        row = (bh.to(tl.int64) * NUM_SPLITS + sp) * G_PAD + g
        m_s = tl.load(WS_M + row)
        l_s = tl.load(WS_L + row)
        a_s = tl.load(WS_ACC + row * D_PAD + offs_d)
        m_new = tl.maximum(m_run, m_s)
        alpha = tl.exp2(m_run - m_new)
        beta = tl.exp2(m_s - m_new)
        l_run = l_run * alpha + l_s * beta
        acc = acc * alpha + a_s * beta
        m_run = m_new
    denom = tl.where(l_run > 0, l_run, 1.0)
    out = acc / denom
    o_ptr = OUT + b.to(tl.int64) * s_ob + (h * G + g).to(tl.int64) * s_oh + offs_d * s_od
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _ring_append_kernel(
    KC, VC, SPOS, VALID, KN, VN, PN, SLOTS,
    s_kcb, s_kch, s_kcn, s_kcd,
    s_vcb, s_vch, s_vcn, s_vcd,
    s_pb, s_pc, s_pn,
    s_mb, s_mn,
    s_knb, s_knh, s_knt, s_knd,
    s_vnb, s_vnh, s_vnt, s_vnd,
    s_pnb, s_pnc, s_pnt,
    T0,
    H_KV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64) + T0
    b = (pid_bh // H_KV).to(tl.int64)
    h = (pid_bh % H_KV).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    offs = tl.arange(0, D_PAD)
    dm = offs < D
    k = tl.load(KN + b * s_knb + h * s_knh + t * s_knt + offs * s_knd, mask=dm)
    tl.store(KC + b * s_kcb + h * s_kch + slot * s_kcn + offs * s_kcd, k.to(KC.dtype.element_ty), mask=dm)
    v = tl.load(VN + b * s_vnb + h * s_vnh + t * s_vnt + offs * s_vnd, mask=dm)
    tl.store(VC + b * s_vcb + h * s_vch + slot * s_vcn + offs * s_vcd, v.to(VC.dtype.element_ty), mask=dm)
    if h == 0:
        c = tl.arange(0, 4)
        cm = c < 3
        p = tl.load(PN + b * s_pnb + c * s_pnc + t * s_pnt, mask=cm)
        tl.store(SPOS + b * s_pb + c * s_pc + slot * s_pn, p.to(SPOS.dtype.element_ty), mask=cm)
        one = tl.full((1,), 1, dtype=VALID.dtype.element_ty)
        tl.store(VALID + b * s_mb + slot * s_mn + tl.arange(0, 1), one)


# ----------------------------------------------------------------------------------------------
# host wrappers


@functools.lru_cache(maxsize=64)
def _comp_on(section: tuple[int, ...], device: str) -> torch.Tensor:
    return mrope_component(section, device=device)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(B: int, H_kv: int, N: int, block_n: int, device: torch.device) -> int:
    """Split-K factor: aim for ~4 programs per SM, never below 2 blocks of slots per split."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    n_blocks = triton.cdiv(max(N, 1), block_n)
    want = triton.cdiv(4 * sms, max(B * H_kv, 1))
    return max(1, min(want, n_blocks // 2 if n_blocks >= 4 else 1))


def _as_u8(valid: torch.Tensor) -> torch.Tensor:
    return valid.view(torch.uint8) if valid.dtype == torch.bool else valid


def window_decode_attention_triton(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    valid: torch.Tensor | None,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    scaling: float | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    B, Hq, D = q.shape
    Bk, Hkv, N, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or Bk != B:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={Hkv}")
    if D % 2:
        raise ValueError("head dim must be even")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        q = q.to(k_cache.dtype)
        v_cache = v_cache.to(k_cache.dtype)
    G = Hq // Hkv
    half = D // 2
    if sum(int(n) for n in mrope_section) != half or inv_freq.numel() != half:
        raise ValueError(f"mrope_section {list(mrope_section)} / inv_freq must cover D/2 = {half}")
    dev = q.device
    inv_freq = inv_freq.to(device=dev, dtype=torch.float32).contiguous()
    comp = _comp_on(tuple(int(n) for n in mrope_section), str(dev))
    q_pos = q_pos.to(device=dev, dtype=torch.int32)
    slot_pos = slot_pos if slot_pos.dtype == torch.int32 else slot_pos.to(torch.int32)
    has_valid = valid is not None
    vmask = _as_u8(valid) if has_valid else slot_pos  # dummy pointer when absent
    s_mb, s_mn = (vmask.stride(0), vmask.stride(1)) if has_valid else (0, 0)

    g_pad = max(16, triton.next_power_of_2(G))
    # tl.dot needs K >= 16: small heads (D = 16 in the tiny models) pad each half with masked zero
    # columns. (Concatenating the two halves with join/permute/reshape instead gave wrong bf16/fp16
    # results on an H200 with Triton 3.6, though the interpreter agreed: benchmarks/gpu_check.sh.)
    half_pad = max(16, triton.next_power_of_2(half))
    d_pad = triton.next_power_of_2(D)
    if block_n is None:
        block_n = 64 if d_pad >= 128 or g_pad > 16 else 128
    if num_warps is None:
        num_warps = 4
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, N, block_n, dev)
    num_splits = max(1, min(int(num_splits), triton.cdiv(max(N, 1), block_n)))
    slots_per_split = triton.cdiv(triton.cdiv(max(N, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(N, 1), slots_per_split)
    split = num_splits > 1

    out = torch.empty((B, Hq, D), device=dev, dtype=q.dtype)
    if split:
        ws_m = torch.empty((B * Hkv * num_splits * g_pad,), device=dev, dtype=torch.float32)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty((B * Hkv * num_splits * g_pad, d_pad), device=dev, dtype=torch.float32)
    else:
        ws_m = ws_l = ws_acc = out  # unused
    # The interpreter's tl.dot mis-handles bf16 operands (numpy has no bf16): there, round to bf16
    # as the GPU would and multiply in float32.
    if k_cache.dtype == torch.float32 or (k_cache.dtype == torch.bfloat16 and _interpreting()):
        ieee, dot_dt = True, tl.float32
    else:
        ieee, dot_dt = False, _TL_DTYPES[k_cache.dtype]
    scale = (D**-0.5 if scaling is None else float(scaling)) * _LOG2E

    _window_decode_kernel[(B * Hkv, num_splits)](
        q, q_pos, k_cache, v_cache, slot_pos, vmask, inv_freq, comp,
        out, ws_m, ws_l, ws_acc,
        N, slots_per_split, num_splits, scale,
        q.stride(0), q.stride(1), q.stride(2),
        q_pos.stride(0), q_pos.stride(1),
        *k_cache.stride(), *v_cache.stride(),
        slot_pos.stride(0), slot_pos.stride(1), slot_pos.stride(2),
        s_mb, s_mn,
        out.stride(0), out.stride(1), out.stride(2),
        H_KV=Hkv, G=G, G_PAD=g_pad, HALF=half, HALF_PAD=half_pad, D_PAD=d_pad,
        BLOCK_N=block_n, SPLIT=split, IEEE=ieee, HAS_VALID=has_valid, DOT_DT=dot_dt,
        num_warps=num_warps,
    )
    if split:
        _split_combine_kernel[(B * Hkv * G,)](
            ws_m, ws_l, ws_acc, out, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            H_KV=Hkv, G=G, G_PAD=g_pad, D=D, D_PAD=d_pad,
            num_warps=1 if d_pad <= 64 else 2,
        )
    return out


_MAX_GRID_Y = 65535


def ring_append_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    valid: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    B, Hkv, _, D = k_cache.shape
    T = k_new.shape[2]
    if k_new.shape != (B, Hkv, T, D) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be (B, H_kv, T, D) = {(B, Hkv, T, D)}, got {tuple(k_new.shape)}")
    if pos_new.shape != (B, 3, T) or slots.shape != (T,):
        raise ValueError(f"pos_new must be (B, 3, T) and slots (T,), got {tuple(pos_new.shape)}, {tuple(slots.shape)}")
    if T == 0:
        return
    dev = k_cache.device
    slots = slots.to(device=dev, dtype=torch.int64).contiguous()
    pos_new = pos_new.to(dev)
    vmask = _as_u8(valid)
    d_pad = triton.next_power_of_2(D)
    for t0 in range(0, T, _MAX_GRID_Y):
        nt = min(_MAX_GRID_Y, T - t0)
        _ring_append_kernel[(B * Hkv, nt)](
            k_cache, v_cache, slot_pos, vmask, k_new, v_new, pos_new, slots,
            *k_cache.stride(), *v_cache.stride(),
            slot_pos.stride(0), slot_pos.stride(1), slot_pos.stride(2),
            vmask.stride(0), vmask.stride(1),
            *k_new.stride(), *v_new.stride(),
            pos_new.stride(0), pos_new.stride(1), pos_new.stride(2),
            t0,
            H_KV=Hkv, D=D, D_PAD=d_pad,
            num_warps=1 if d_pad <= 64 else 2,
        )
