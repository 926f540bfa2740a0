"""The window decode kernel on transformers' attention path (``attn_implementation="omnistream_window"``).

transformers' Qwen2.5-Omni attention rotates q and k, calls ``cache.update`` and then the function
registered under ``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` as
``fn(module, query, key, value, attention_mask, dropout=, scaling=, sliding_window=, position_ids=, ...)
-> (attn_output (B, T, H_q, D), weights)``. A :class:`~omnistream.memory.window_cache.WindowCache` in
kernel mode (``WindowConfig(kernel=True)``) stores PRE-RoPE keys plus per-slot cache positions and,
for a single-token decode step, returns a view of its buffers tagged with a :class:`DecodeHandle`
(a Python attribute on the returned key tensor). :func:`window_attention_forward` recognises the
tag and calls :func:`omnistream.kernels.window_decode_attention` (RoPE applied to each key in-kernel
at its slot position; the query arrives already rotated by the model, so it is passed at position 0,
an exact identity rotation). Anything untagged (prefill chunks, whose keys the cache materializes
rotated, or any other cache) goes to transformers' SDPA function unchanged; the mask function
registered under the same name is SDPA's, so masks are exactly SDPA's.

Only the language model's own config is switched (:func:`enable_window_attention`), never the audio
or vision towers'. A kernel-mode cache used without this attention function would hand pre-RoPE
keys to SDPA: the cache detects that an earlier handle was never consumed and raises at the next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import window_decode_attention

__all__ = ["NAME", "STATS", "DecodeHandle", "enable_window_attention", "window_attention_forward"]

NAME = "omnistream_window"
HANDLE_ATTR = "_omnistream_window"
STATS = {"kernel_calls": 0, "fallback_calls": 0}  # per process; tests read them to prove which path ran


@dataclass
class DecodeHandle:
    """What the kernel needs besides q, K, V: the cache positions of the slots (in the same frame
    as the already-rotated query), the RoPE frequencies, and the layer (to mark the handle consumed)."""

    layer: object
    slot_pos: torch.Tensor  # (1, 3, N) int32, or (B, 3, N) for a batch
    inv_freq: torch.Tensor  # (D/2,) float32, on the cache's device
    mrope_section: Sequence[int]
    q_pos: torch.Tensor  # (B, 3) int32 zeros: the query is already rotated
    consumed: bool = False
    # a batched decode step (omnistream.memory.batch.BatchCache): slot_pos is per row (B, 3, N), valid
    # (B, N) masks each row's padding, and consuming the batch handle consumes its rows' handles
    valid: torch.Tensor | None = None
    parts: tuple = ()


def window_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query`` (B, H_q, T, D) rotated; ``key``/``value`` (B, H_kv, N, D). Returns (B, T, H_q, D)."""
    h: DecodeHandle | None = getattr(key, HANDLE_ATTR, None)
    if h is None:
        STATS["fallback_calls"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, _, T, _ = query.shape
    if T != 1:
        raise RuntimeError("window decode handle on a multi-token forward (a WindowCache bug)")
    # attention_mask is ignored: every held slot of a row is visible to its new token; a batch of
    # sessions (ragged rows) masks each row's padding with h.valid
    out = window_decode_attention(
        query[:, :, 0], h.q_pos[:B], key, value, h.slot_pos.expand(B, -1, -1), h.valid, h.inv_freq,
        h.mrope_section, scaling,
    )  # (B, H_q, D)
    h.consumed = True
    for part in h.parts:
        part.consumed = True
    STATS["kernel_calls"] += 1
    return out.unsqueeze(1), None


ALL_ATTENTION_FUNCTIONS.register(NAME, window_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _lm_config(model_or_config):
    m = model_or_config
    if hasattr(m, "model") and hasattr(m.model, "language_model"):  # a Thinker
        return m.model.language_model.config
    if hasattr(m, "layers") and hasattr(m, "config"):  # a language model
        return m.config
    if hasattr(m, "config"):
        m = m.config
    return m.get_text_config() if hasattr(m, "get_text_config") else m


def enable_window_attention(model_or_config) -> str | None:
    """Route the language model's attention through :func:`window_attention_forward`; returns the
    previous ``_attn_implementation`` (to restore it). Other caches keep working (SDPA fallback),
    so this is safe for a model shared with growing-cache sessions when it was using SDPA."""
    cfg = _lm_config(model_or_config)
    prev = cfg._attn_implementation
    if prev not in (None, "sdpa", NAME):
        raise ValueError(f"window attention falls back to SDPA; the model uses {prev!r} (load it with sdpa)")
    cfg._attn_implementation = NAME
    return prev


def disable_window_attention(model_or_config, previous: str | None = "sdpa") -> None:
    """Undo :func:`enable_window_attention`."""
    _lm_config(model_or_config)._attn_implementation = previous
