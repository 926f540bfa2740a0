"""One decode forward over many sessions: :class:`BatchCache`, a transformers ``Cache`` whose rows are
the sessions' own caches.

Why: a scheduler tick decodes one token for every replying session. One forward of batch B turns B
matrix-vector products per weight into one matrix-matrix product (the weights are read once), while
each row must still attend to its own session's cache, of its own length, at its own M-RoPE
positions, and come out exactly as it would alone.

Design (gather per step): the per-session caches stay what they are (a ``DynamicCache``, a
:class:`~omnistream.memory.window_cache.WindowCache` in the rotated layout, or one in kernel mode)
and keep doing all their own bookkeeping (eviction, rebases, sink re-rotation, M-RoPE position
mapping) exactly as in a solo forward. :meth:`BatchCache.prepare` maps each row's positions through
its own cache; :meth:`BatchCache.update` hands each row's new K/V ``(1, H, 1, D)`` to that row's
cache and copies what the row's cache returns (its held keys + the new one, ``(1, H, L_b, D)``) into
one zero-padded ``(B, H, L_max, D)`` buffer. The buffer is allocated once per forward and shared by
all layers (each layer's attention consumes it before the next layer overwrites it; a row's padding
slots ``[L_b, L_max)`` are never written, so they stay zero). The price is one copy of every held
K/V per layer per step, the same order of memory traffic as the attention's own read of them. Rows
of preallocated batch buffers (per-row lengths, no copy) would remove it; not done yet.

Attention over ragged rows:

* post-RoPE rows (``DynamicCache``, rotated-layout ``WindowCache``): the padding slots are masked by
  an additive ``(B, 1, 1, L_max)`` mask handed to the model in place of its causal mask
  (:meth:`BatchCache.mask_mapping`; a one-token query sees every held token of its row, so padding is
  the only mask). Works with SDPA and eager attention.
* kernel-mode rows: the padded PRE-RoPE K/V, per-row slot positions ``(B, 3, L_max)`` and
  ``valid`` ``(B, L_max)`` go to :func:`omnistream.kernels.window_decode_attention` through the
  ``"omnistream_window"`` attention function (a batch :class:`DecodeHandle` on the key tensor).

The two kinds store different keys (rotated vs pre-RoPE), so they cannot share one forward:
:func:`cache_kind` tells callers how to group rows (``step_tokens`` runs one forward per group).
Decode only: one new token per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from .window_cache import WindowCache

__all__ = ["BatchCache", "cache_kind", "check_model"]


def cache_kind(cache) -> str:
    """``"kernel"`` for a kernel-mode WindowCache (pre-RoPE keys), else ``"rotated"`` (post-RoPE keys)."""
    return "kernel" if isinstance(cache, WindowCache) and cache.kernel else "rotated"


def cache_bytes(cache) -> int:
    """Bytes a session's KV cache holds: a window cache's ``memory_bytes()``, else the sum of a
    transformers cache's per-layer key and value tensors (``/status`` and ``/metrics``)."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    n = 0
    for layer in list(getattr(cache, "layers", ()) or ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "nbytes"):
                n += int(t.nbytes)
    return n


def check_model(model) -> None:
    """Refuse a model whose layers a padding mask cannot serve (sliding-window attention layers)."""
    if getattr(model, "has_sliding_layers", False):
        raise NotImplementedError("batched decode over sliding-window attention layers")


class BatchCache(Cache):
    """The caches of B sessions as the rows of one decode forward (see the module docstring).

    Usage (one forward)::

        batch = BatchCache([s.cache for s in sessions])
        pos = batch.prepare([p_b for each row])          # (3, B, 1) positions for the model
        out = lm(inputs_embeds=x, position_ids=pos, cache=batch,
                 attention_mask=batch.mask_mapping(lm), use_cache=True)
    """

    def __init__(self, caches: Sequence):
        if not caches:
            raise ValueError("BatchCache needs at least one row")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("the same cache appears twice in one batch")
        kinds = {cache_kind(c) for c in caches}
        if len(kinds) > 1:
            raise ValueError(
                "kernel-mode WindowCache rows cannot share a forward with post-RoPE rows; group them by cache_kind"
            )
        super().__init__(layers=[])
        self.rows = list(caches)
        self.kernel = kinds == {"kernel"}
        if self.kernel and any(c.T < 1 for c in self.rows):
            raise ValueError("kernel-mode rows need chunk_tokens >= 1 (the decode step's scratch slot)")
        self.lengths: list[int] | None = None  # L_b: held tokens + the new one, per row
        self._valid: torch.Tensor | None = None  # (B, L_max) bool
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # padded (B, H, L_max, D) K and V
        self._slot_pos: torch.Tensor | None = None  # kernel mode: (B, 3, L_max) int32

    # ------------------------------------------------------------------ before the forward
    def prepare(self, positions: Sequence[torch.Tensor], device) -> torch.Tensor:
        """Register each row's ORIGINAL position ``(3,)`` or ``(3, 1)`` of its new token with its cache
        (a WindowCache maps it into its own frame); returns the ``(3, B, 1)`` position ids for the model."""
        if len(positions) != len(self.rows):
            raise ValueError(f"{len(positions)} positions for {len(self.rows)} rows")
        out, lengths = [], []
        for cache, p in zip(self.rows, positions):
            p = p.reshape(3, 1).long()
            if isinstance(cache, WindowCache):
                out.append(cache.cache_positions(p).reshape(3, 1).cpu())
                lengths.append(cache.get_query_offset() + 1)
            else:
                out.append(p.cpu())
                lengths.append(cache.get_seq_length() + 1)
        self.lengths = lengths
        self._kv = self._slot_pos = None
        ar = torch.arange(max(lengths), device=device)
        self._valid = ar[None, :] < torch.tensor(lengths, device=device)[:, None]  # (B, L_max)
        return torch.stack(out, dim=1).to(device)  # (3, B, 1)

    def mask_mapping(self, model) -> dict:
        """The model's per-layer-type masks: ``(B, 1, 1, L_max)`` additive, 0 on held slots and the
        dtype's minimum on padding (passed as ``attention_mask``, it replaces the causal mask)."""
        if self._valid is None:
            raise RuntimeError("BatchCache.prepare must run before the forward")
        check_model(model)
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(self._valid.shape, dtype=dtype, device=self._valid.device)
        mask = mask.masked_fill(~self._valid, torch.finfo(dtype).min)[:, None, None, :]
        return {t: mask for t in set(model.config.layer_types)}

    # ------------------------------------------------------------------ the Cache interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``key_states``/``value_states`` (B, H, 1, D): row b goes into its own cache; returns the
        padded (B, H, L_max, D) keys and values of all rows (tagged for the kernel in kernel mode)."""
        if self.lengths is None:
            raise RuntimeError("BatchCache.prepare must run before the forward")
        B, H, n, _ = key_states.shape
        if B != len(self.rows) or n != 1:
            raise ValueError(f"BatchCache is a decode step of {len(self.rows)} rows x 1 token; got ({B}, {n})")
        L = max(self.lengths)
        if self._kv is None:
            self._kv = (
                key_states.new_zeros(B, H, L, key_states.shape[-1]),
                value_states.new_zeros(B, H, L, value_states.shape[-1]),
            )
        K, V = self._kv
        handles = []
        for b, (cache, ln) in enumerate(zip(self.rows, self.lengths)):
            k, v = cache.update(key_states[b : b + 1], value_states[b : b + 1], layer_idx)  # (1, H, L_b, D)
            if k.shape[-2] != ln:
                raise RuntimeError(f"row {b}: its cache returned {k.shape[-2]} slots, expected {ln}")
            K[b, :, :ln].copy_(k[0])
            V[b, :, :ln].copy_(v[0])
            if self.kernel:
                handles.append(self._row_handle(k, b))
        if not self.kernel:
            return K, V
        return self._tag(K, handles), V

    def _row_handle(self, k: torch.Tensor, b: int):
        from omnistream.kernels.window_attention import HANDLE_ATTR

        h = getattr(k, HANDLE_ATTR, None)
        if h is None:
            raise RuntimeError(f"row {b}: a kernel-mode WindowCache returned no decode handle")
        return h

    def _tag(self, K: torch.Tensor, handles: list):
        """Kernel mode: the padded pre-RoPE keys tagged with one handle holding every row's slot positions."""
        from omnistream.kernels.window_attention import HANDLE_ATTR, DecodeHandle

        B, L = K.shape[0], K.shape[-2]
        if self._slot_pos is None:  # the slot positions are per cache, shared by its layers: once per forward
            sp = torch.zeros(B, 3, L, dtype=torch.int32, device=K.device)
            for b, h in enumerate(handles):
                sp[b, :, : self.lengths[b]] = h.slot_pos[0]
            self._slot_pos = sp
        h0 = handles[0]
        handle = DecodeHandle(None, self._slot_pos, h0.inv_freq, h0.mrope_section,
                              torch.zeros(B, 3, dtype=torch.int32, device=K.device), valid=self._valid,
                              parts=tuple(handles))
        view = K[:, :, :L]
        setattr(view, HANDLE_ATTR, handle)
        return view

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("a BatchCache has one length per row (BatchCache.lengths)")

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return max(self.lengths), 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1
