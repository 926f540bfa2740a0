"""omnistream.kernels: decode attention + append for the sink + sliding-window KV cache.

Layout (per layer; full description in ``omnistream/kernels/reference.py``):

* ``k_cache``, ``v_cache``: ``(B, H_kv, N, D)``, ``N = S + W`` (S sinks + W-slot ring), keys
  stored **before** RoPE;
* ``slot_pos``: ``(B, 3, N)`` int32 (t, h, w) cache positions of the slots;
* ``valid``: ``(B, N)`` bool, filled slots (any pattern; ``None`` = all filled);
* ``q``: ``(B, H_q, D)`` un-rotated, ``q_pos``: ``(B, 3)`` int32; ``H_q = G * H_kv``;
* ``inv_freq``: ``(D/2,)`` float32; ``mrope_section``: e.g. ``[16, 24, 24]`` (sums to D/2).

Public API::

    window_decode_attention(q, q_pos, k_cache, v_cache, slot_pos, valid, inv_freq, mrope_section,
                            scaling=None, *, backend=None, num_splits=None) -> (B, H_q, D)
    ring_append(k_cache, v_cache, slot_pos, valid, k_new, v_new, pos_new, slots, *, backend=None)

On the model's attention path: :mod:`omnistream.kernels.window_attention` (the
``"omnistream_window"`` attention function a kernel-mode ``WindowCache`` decodes through).

``backend``: ``"torch"`` | ``"triton"`` | ``None`` (auto).  Auto picks Triton when the tensors are
on CUDA and triton imports, else the torch reference.  The env var ``OMNISTREAM_KERNELS=torch|triton``
overrides auto (not an explicit ``backend=``).  Triton on CPU tensors means the Triton interpreter:
``TRITON_INTERPRET=1`` must be set before triton kernels are first defined (this module sets it
if triton is forced on CPU before the kernels are imported).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .reference import (
    apply_rope,
    mrope_component,
    mrope_cos_sin,
    ring_append_ref,
    rotate_half,
    window_decode_attention_ref,
)

__all__ = [
    "apply_rope",
    "mrope_component",
    "mrope_cos_sin",
    "resolve_backend",
    "ring_append",
    "ring_append_ref",
    "rotate_half",
    "triton_available",
    "window_decode_attention",
    "window_decode_attention_ref",
]

_triton_mod = None
_triton_err: Exception | None = None


def _load_triton(on_cpu: bool = False):
    """Import ``triton_window`` lazily; returns the module or None."""
    global _triton_mod, _triton_err
    if _triton_mod is not None:
        return _triton_mod
    if _triton_err is not None:
        return None
    if on_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from . import triton_window as mod
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken triton install
        _triton_err = e
        return None
    _triton_mod = mod
    return mod


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 -- a broken install counts as absent
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``."""
    choice = (backend or os.environ.get("OMNISTREAM_KERNELS", "") or "auto").strip().lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {choice!r} (use torch|triton|auto)")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and _load_triton() is not None else "torch"
    # forced triton
    if device.type != "cuda" and _triton_mod is not None and not _interpreting():
        raise RuntimeError(
            "triton kernels were compiled for GPU (TRITON_INTERPRET unset at import); cannot run them on CPU tensors"
        )
    if _load_triton(on_cpu=device.type != "cuda") is None:
        raise RuntimeError(f"OMNISTREAM_KERNELS=triton but triton is unavailable: {_triton_err!r}")
    return "triton"


def window_decode_attention(
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
    backend: str | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new (un-rotated) query token over the sink + window cache -> ``(B, H_q, D)``.

    RoPE is applied to q at ``q_pos`` and to each key at its ``slot_pos``.  Slots with
    ``valid == False`` are ignored; rows with no valid slot give zeros.  Append the new token's own
    K/V first (``ring_append``) if it should attend to itself.  ``scaling`` defaults to D**-0.5.
    """
    if resolve_backend(q.device, backend) == "triton":
        return _triton_mod.window_decode_attention_triton(
            q, q_pos, k_cache, v_cache, slot_pos, valid, inv_freq, mrope_section, scaling,
            num_splits=num_splits,
        )
    return window_decode_attention_ref(
        q, q_pos, k_cache, v_cache, slot_pos, valid, inv_freq, mrope_section, scaling
    )


def ring_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    valid: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos_new: torch.Tensor,
    slots: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """In place: ``k/v_cache[:, :, slots] = k/v_new``, ``slot_pos[:, :, slots] = pos_new``,
    ``valid[:, slots] = True``.  ``k_new``/``v_new`` ``(B, H_kv, T, D)`` un-rotated, ``pos_new``
    ``(B, 3, T)``, ``slots`` ``(T,)`` int64 distinct slot indices shared by all batch rows."""
    if resolve_backend(k_cache.device, backend) == "triton":
        _triton_mod.ring_append_triton(k_cache, v_cache, slot_pos, valid, k_new, v_new, pos_new, slots)
        return
    ring_append_ref(k_cache, v_cache, slot_pos, valid, k_new, v_new, pos_new, slots)
