"""Pure-torch references for the sink + sliding-window KV-cache kernels (readable; the oracle).

Cache layout (per layer), shared by the references, the Triton kernels and the cache class:

* ``k_cache``, ``v_cache``: ``(B, H_kv, N, D)``, ``N = S + W`` slots (S sinks, then a W-slot ring).
  Keys are stored **before** RoPE.  Slot order does not matter to attention: the softmax is over
  a set and each key carries its own position.
* ``slot_pos``: ``(B, 3, N)`` int32, the 3-D (t, h, w) M-RoPE position of each slot, already in
  cache-position space (the caller shifts it).
* ``valid``: ``(B, N)`` bool, which slots are filled (may be non-contiguous after wrap-around).

Query: ``q`` ``(B, H_q, D)`` for one new token, not rotated, at ``q_pos`` ``(B, 3)`` int32.
GQA: ``H_q = G * H_kv`` and query head ``i`` reads kv head ``i // G`` (transformers' repeat_kv).

RoPE is Qwen's "rotate_half" convention (pairs ``i`` and ``i + D/2``); frequency ``i`` (of
``D/2``) uses position component ``mrope_component(mrope_section)[i]``, exactly like
``Qwen2_5OmniRotaryEmbedding.recomposition_frequencies`` (chunk ``j`` of ``mrope_section`` takes
component ``j % 3``; the same frequencies are repeated for both halves).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "apply_rope",
    "mrope_component",
    "mrope_cos_sin",
    "ring_append_ref",
    "rotate_half",
    "window_decode_attention_ref",
]


def mrope_component(mrope_section: Sequence[int], device=None) -> torch.Tensor:
    """(D/2,) int32: which position component (0=t, 1=h, 2=w) each rotary frequency uses."""
    comp = [j % 3 for j, n in enumerate(mrope_section) for _ in range(int(n))]
    return torch.tensor(comp, dtype=torch.int32, device=device)


def _check_section(inv_freq: torch.Tensor, mrope_section: Sequence[int]) -> None:
    if sum(int(n) for n in mrope_section) != inv_freq.numel():
        raise ValueError(
            f"mrope_section {list(mrope_section)} must sum to D/2 = len(inv_freq) = {inv_freq.numel()}"
        )


def mrope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int]):
    """M-RoPE cos/sin in float32.

    ``pos``: ``(..., 3, N)`` integer positions; returns ``cos, sin`` of shape ``(..., N, D)``.
    """
    _check_section(inv_freq, mrope_section)
    freqs = pos.float()[..., None] * inv_freq.float().to(pos.device)  # (..., 3, N, D/2)
    chunks = freqs.split([int(n) for n in mrope_section], dim=-1)
    freqs = torch.cat([c[..., j % 3, :, :] for j, c in enumerate(chunks)], dim=-1)  # (..., N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, computed in float32, returned in ``x.dtype``.

    ``cos``/``sin`` must broadcast against ``x`` (e.g. ``(B, 1, N, D)`` for ``x`` ``(B, H, N, D)``).
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def window_decode_attention_ref(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    valid: torch.Tensor | None,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    scaling: float | None = None,
) -> torch.Tensor:
    """Decode attention of one query token over the sink + window cache; returns ``(B, H_q, D)``.

    Everything is computed in float32 and cast to ``q.dtype``.  ``valid=None`` means all slots are
    filled.  A row with no valid slot returns zeros.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={Hkv}")
    G = Hq // Hkv
    scale = D**-0.5 if scaling is None else float(scaling)

    cos_k, sin_k = mrope_cos_sin(slot_pos, inv_freq, mrope_section)  # (B, N, D)
    cos_q, sin_q = mrope_cos_sin(q_pos[:, :, None], inv_freq, mrope_section)  # (B, 1, D)
    kf, vf = k_cache.float(), v_cache.float()
    if valid is not None:  # unfilled slots may hold garbage (even NaN): never let it in
        empty = ~valid.bool()[:, None, :, None]
        kf, vf = kf.masked_fill(empty, 0.0), vf.masked_fill(empty, 0.0)
    k = apply_rope(kf, cos_k[:, None], sin_k[:, None])  # (B, Hkv, N, D)
    qr = apply_rope(q.float(), cos_q, sin_q).view(B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhnd->bhgn", qr, k) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-invalid rows -> zeros
    out = torch.einsum("bhgn,bhnd->bhgd", probs, vf)
    return out.reshape(B, Hq, D).to(q.dtype)


def ring_append_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    valid: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write ``T`` new tokens into the given slots, in place.

    ``k_new``/``v_new``: ``(B, H_kv, T, D)`` un-rotated; ``pos_new``: ``(B, 3, T)``; ``slots``:
    ``(T,)`` int64, the same slots for every batch row, **distinct** (the cache decides which
    slots; with T > W it passes only the last W tokens).  Sets ``valid[:, slots] = True``.
    """
    slots = slots.to(device=k_cache.device, dtype=torch.long)
    k_cache[:, :, slots] = k_new.to(k_cache.dtype)
    v_cache[:, :, slots] = v_new.to(v_cache.dtype)
    slot_pos[:, :, slots] = pos_new.to(slot_pos.dtype)
    valid[:, slots] = True
