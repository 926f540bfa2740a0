"""A growing (unbounded) KV cache kept in a row of a growable :class:`~omnistream.memory.pool.RowPool`:
:class:`GrowingCache`.

Why: a ``DynamicCache`` keeps each session's K/V in its own tensors, so a batched decode step over B
sessions must gather them into padded ``(B, H, L_max, D)`` buffers every step
(:class:`~omnistream.memory.batch.BatchCache`: one copy of every held K/V per layer per step). A
``GrowingCache`` keeps the session's tokens, in order, in slots ``[0, n)`` of its row of a pool shared by
the model's sessions; rows ``[lo, lo + B)`` of the pool then ARE the batch's keys and values
(:class:`~omnistream.memory.batch.PoolBatch`, as for pooled window caches): no per-step gather.

Semantics: those of a ``DynamicCache`` of full-attention layers, batch size 1 (the
:class:`~omnistream.model.thinker.StreamingThinker`'s forwards): ``update`` appends the new K/V (post-RoPE,
as given) and returns everything held; ``get_seq_length`` counts the tokens held; ``crop(-k)`` drops the
last ``k`` (only the length moves: the stale slots past it are never returned, and a batched step masks
them). Growth: when a forward's tokens would overflow the row, the POOL's slot count doubles (every row is
re-made and copied: amortised O(1) per token). That happens at the forward's first layer, before any
layer has written its K/V, or in ``PoolBatch.prepare`` for a batched step, so nothing moves mid-forward.
Memory: a lone session's row holds at most about twice its tokens (plus the pool's 16-slot floor); with
several sessions every row has the longest one's slot count (see :mod:`omnistream.memory.pool`).

Rows: taken at the first forward (when the head count, head size, dtype and device are known),
released when the cache is garbage-collected (the layers hold the cache by a weak proxy: no cycle),
moved by the pool's compaction (the cache is re-pointed). A cache whose shapes do not fit the shared
pool (the model was moved to another dtype or device after the pool's first row) keeps a private
growable pool of its own: same behaviour, no batching in place.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .pool import GROWING_MIN_SLOTS, RowPool

__all__ = ["GrowingCache", "GrowingLayer", "pooled_growing_ok"]


def pooled_growing_ok(config) -> bool:
    """Whether a language model with this config can use a GrowingCache: full attention in every layer
    (a sliding-window layer needs ``DynamicCache``'s sliding layers, and a padding mask cannot serve it)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in types)


class GrowingLayer(CacheLayerMixin):
    """One layer of a :class:`GrowingCache`: ``n`` tokens held in slots ``[0, n)`` of the cache's pool row;
    ``keys``/``values`` are views ``(1, H, n, D)`` of it (re-taken whenever the row or the buffers move)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: GrowingCache, layer_idx: int):
        super().__init__()
        self.owner = weakref.proxy(owner)  # no cycle: a dropped cache is freed (and its row released) at once
        self.layer_idx = layer_idx
        self.n = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.owner._take(key_states, value_states)
        self.is_initialized = True

    def _view(self) -> None:
        """``keys``/``values``: the held slots ``(1, H, n, D)`` of the row as it is now."""
        o = self.owner
        K, V = o.pool.row_views(o._ticket, self.layer_idx)  # (1, H, slots, D)
        self.keys, self.values = K[:, :, : self.n], V[:, :, : self.n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``key_states``/``value_states`` (1, H, k, D); return every held token's (1, H, n + k, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, k, _ = key_states.shape
        if b != 1:
            raise ValueError(f"a GrowingCache holds one session (batch size 1); got a batch of {b}")
        o = self.owner
        o.pool.ensure_slots(self.n + k)  # the first layer grows the pool before anything of this forward is written
        K, V = o.pool.row_views(o._ticket, self.layer_idx)  # (1, H, slots, D)
        K[:, :, self.n : self.n + k].copy_(key_states)
        V[:, :, self.n : self.n + k].copy_(value_states)
        self.n += k
        self.keys, self.values = K[:, :, : self.n], V[:, :, : self.n]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.n

    def get_max_length(self) -> int:
        return -1  # grows without bound, as a DynamicLayer

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers 5: a negative count; as ``DynamicLayer``,
        dropping more than is held leaves none)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to drop")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.n = max(self.n + int(tokens_to_remove), 0)
        self._view()

    def reset(self) -> None:
        """Forget the tokens; keep the row (its stale slots are never returned)."""
        self.n = 0
        if self.is_initialized:
            self._view()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a GrowingCache holds one session (batch size 1)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a GrowingCache holds one session (batch size 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a GrowingCache holds one session (batch size 1)")


class GrowingCache(Cache):
    """A ``DynamicCache`` (full attention, batch size 1) whose K/V live in a row of ``pool``, a growable
    :class:`~omnistream.memory.pool.RowPool` shared by the model's sessions (see the module docstring).

    ``config``: the language model's config (its ``num_hidden_layers``) or ``num_layers``; ``pool``: the
    shared pool (``growing_pool(lm)``), or None for a private one."""

    def __init__(self, config=None, *, pool: RowPool | None = None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("pass config or num_layers")
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            if not pooled_growing_ok(text):
                raise ValueError("a GrowingCache serves full-attention layers only; use a DynamicCache")
            num_layers = text.num_hidden_layers
        if pool is not None and not pool.growable:
            raise ValueError("a GrowingCache needs a growable RowPool")
        self.pool = pool if pool is not None else RowPool(GROWING_MIN_SLOTS, growable=True)
        self._ticket = None  # this cache's row of the pool (taken at the first forward)
        super().__init__(layers=[GrowingLayer(self, i) for i in range(num_layers)])

    def _take(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Take a row at the first layer's first update (a private pool when the shared one cannot hold it)."""
        if self._ticket is not None:
            return
        if key_states.shape[0] != 1:
            raise ValueError(f"a GrowingCache holds one session (batch size 1); got a batch of {key_states.shape[0]}")
        if not self.pool.fits(len(self.layers), key_states, value_states):
            self.pool = RowPool(GROWING_MIN_SLOTS, growable=True)
        self._ticket = self.pool.take(self, len(self.layers), key_states, value_states)

    def _repoint(self) -> None:
        """The pool moved this cache's row (compaction) or re-made its buffers (growth): new views."""
        for layer in self.layers:
            if layer.is_initialized:
                layer._view()

    def slots_held(self) -> int:
        """Slots of its row this cache needs kept (the pool's slot trimming asks)."""
        return max((layer.n for layer in self.layers), default=0)

    @property
    def pool_row(self) -> int | None:
        """The pool row holding this cache's K/V (``None`` before the first forward)."""
        return None if self._ticket is None else self._ticket.row

    def memory_bytes(self) -> int:
        """Bytes of this cache's row, all layers (0 before the first forward): what it holds of the pool."""
        if self._ticket is None or self._ticket.row is None:
            return 0
        return self.pool.nbytes() // self.pool.rows

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1
