"""Attention sinks + sliding window KV cache (StreamingLLM) for Qwen2.5-Omni's 3-D M-RoPE positions.

:class:`WindowCache` is a transformers :class:`~transformers.cache_utils.Cache`: the Thinker and
Talker layers use it unchanged (``cache.update`` in ``Qwen2_5OmniAttention.forward``). Per layer it
keeps the first ``S`` tokens of the session (the *sinks*) and the ``W`` most recent tokens (the
*window*, a ring buffer) in buffers allocated once; nothing is reallocated per step.

The parts, one module each:

* :mod:`omnistream.memory.window_config`: :class:`WindowConfig` (sizes) and the RoPE read from the model.
* :mod:`omnistream.memory.window_positions`: the StreamingLLM positions (the shift ``delta``, the base
  ``B`` and its rebases, the bound on rotated positions), planned on the host once per forward.
* this module: the buffers of each layer (:class:`WindowLayer`, rotated layout: keys stored rotated,
  re-rotated only at a rebase and for the sinks) and the cache that ties them to the plan.
* :mod:`omnistream.memory.window_kernel`: kernel mode (pre-RoPE keys + per-slot positions, decoded by
  the Triton kernel).

Chunks (``n > 1`` tokens per forward, prefill): the ``n`` queries attend to everything the cache
held before the forward (sinks + up to ``W`` window tokens) and causally to the chunk itself;
eviction happens after the forward (the cache then keeps the sinks and the last ``W`` tokens). A
chunk larger than ``W`` is allowed: its own tokens see each other causally at their (shifted)
positions, so the span of a forward is ``S + W + n``. Up to ``chunk_tokens`` new tokens go to a
preallocated scratch tail; a larger chunk makes one transient ``torch.cat`` copy for that forward.

Mask / valid slots: the valid slots are always a contiguous prefix (slot order is irrelevant to
attention, so the ring needs no reordering); ``update`` returns only that prefix plus the new
chunk, so there are no padded slots to mask and transformers' own causal mask (sized by
:meth:`WindowLayer.get_mask_sizes`, query offset = cached tokens) is exact.

``get_seq_length()`` returns the number of tokens *seen* (appended) in the session, like
transformers' sliding-window layers (``cumulative_length``) and like ``DynamicCache`` before any
eviction; ``StreamingThinker.n_tokens`` relies on it. The number of tokens held is
:attr:`WindowCache.n_cached`; the mask offsets use the latter (``get_query_offset``). Because
positions are explicit, nothing derives positions from ``get_seq_length`` (``generate()``'s
default ``cache_position`` path is not supported: pass ``position_ids``).

Usage::

    cache = WindowCache(lm.config, WindowConfig(sink_tokens=4, window_tokens=4096))
    out = lm(inputs_embeds=x, position_ids=cache.cache_positions(pos), cache=cache, use_cache=True)

or :func:`window_thinker` for a ``StreamingThinker`` over a window cache. Several sessions' caches
decode in one forward through :class:`omnistream.memory.batch.BatchCache` (each keeps its own plan).
With ``pool=`` (``window_thinker`` does it, in both layouts) a cache's buffers are its row of a
:class:`~omnistream.memory.pool.RowPool` shared by the sessions of one model, and a batched step attends
over those rows in place (:class:`~omnistream.memory.batch.PoolBatch`): no per-step copy of the caches.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .window_config import AUDIO_TOKENS_PER_SECOND, WindowConfig, rope_setup, text_config
from .window_kernel import KernelSlots, update_kernel
from .window_positions import WindowPositions

__all__ = ["AUDIO_TOKENS_PER_SECOND", "WindowCache", "WindowConfig", "WindowLayer"]


def _rotate_(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``dst = src * cos + rotate_half(src) * sin`` (float32 math, cast to ``dst.dtype``)."""
    x = src.float()
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    dst.copy_(x * cos + rot * sin)


class WindowLayer(CacheLayerMixin):
    """One layer's buffers: ``keys``/``values`` ``(B, H, S + W + chunk_tokens, D)`` (slots ``[0, S)``
    sinks, ``[S, S + W)`` the ring, the rest scratch for a forward's new tokens; views of the cache's
    pool row when it has one) and ``sink_keys`` ``(B, H, S, D)``, the sinks as rotated at birth (their
    original positions)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: WindowCache, layer_idx: int):
        super().__init__()
        self.owner = weakref.proxy(owner)  # no cycle: a dropped cache is freed (and its pool row released) at once
        self.layer_idx = layer_idx
        self.sink_keys: torch.Tensor | None = None
        self._clear()

    def _clear(self) -> None:
        self._done = 0  # id of the last plan executed
        self._pending: list = []  # scratch -> ring moves of the last forward, done at the next update
        self._sink_shift = (0, 0, 0)
        self._handle = None  # kernel mode: the last decode step's DecodeHandle

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        b, h, _, d = key_states.shape
        if o.kernel and b != 1:
            raise NotImplementedError("kernel-mode WindowCache holds one session (batch size 1)")
        self.device = key_states.device
        cap = o.S + o.W + o.T
        if o._pooled(key_states, value_states):  # the cache's row of the shared pool: views (1, h, cap, d)
            self.keys, self.values = o.pool.row_views(o._ticket, self.layer_idx)
        else:
            self.keys = torch.zeros(b, h, cap, d, dtype=key_states.dtype, device=self.device)
            self.values = torch.zeros(b, h, cap, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
        # kernel mode keeps the sinks pre-RoPE in place: no rotated-at-birth copy
        self.sink_keys = torch.zeros(b, h, 0 if o.kernel else o.S, d, dtype=key_states.dtype, device=self.device)
        self.is_initialized = True

    def _flush(self) -> None:
        """Move the last forward's scratch tokens into their ring slots."""
        for src, dst, n in self._pending:
            self.keys[:, :, dst : dst + n].copy_(self.keys[:, :, src : src + n])
            self.values[:, :, dst : dst + n].copy_(self.values[:, :, src : src + n])
        self._pending = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        plan = o._plan
        if plan is None or self._done == plan.id:
            raise RuntimeError(
                "WindowCache: call cache.cache_positions(position_ids) before each forward and pass the "
                "positions it returns to the model"
            )
        if self.is_initialized and self._done != plan.id - 1:
            raise RuntimeError("WindowCache: a forward was skipped for this layer; reset() the cache")
        self._done = plan.id
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        K, V, S = self.keys, self.values, o.S
        if key_states.shape[-2] != plan.n:
            raise ValueError(f"{key_states.shape[-2]} new tokens but cache_positions was given {plan.n}")
        self._flush()
        if o.kernel:
            return update_kernel(self, plan, key_states, value_states)
        if plan.ring_valid and any(plan.dB):  # rebase: window keys from p - B_old to p - B_new
            cos, sin = plan.cos_sin("rebase_cs", K.device)
            ring = K[:, :, S : S + plan.ring_valid]
            _rotate_(ring, ring, cos, sin)
        if plan.nsink0 and plan.sink_shift != self._sink_shift:  # sinks at s + (delta - B)
            if any(plan.sink_shift):
                cos, sin = plan.cos_sin("sink_cs", K.device)
                _rotate_(K[:, :, : plan.nsink0], self.sink_keys[:, :, : plan.nsink0], cos, sin)
            else:
                K[:, :, : plan.nsink0].copy_(self.sink_keys[:, :, : plan.nsink0])
        self._sink_shift = plan.sink_shift
        C, n = plan.C, plan.n
        if C < S:  # new sinks (delta = B = 0 until the sinks are full): keep them as rotated at birth
            k = min(S - C, n)
            self.sink_keys[:, :, C : C + k].copy_(key_states[:, :, :k])
        if C + n <= K.shape[-2]:
            K[:, :, C : C + n].copy_(key_states)
            V[:, :, C : C + n].copy_(value_states)
            self._pending = plan.moves()
            return K[:, :, : C + n], V[:, :, : C + n]
        # chunk larger than the scratch: one transient copy, then commit at once (attention reads the copy)
        k_out = torch.cat((K[:, :, :C], key_states), dim=-2)
        v_out = torch.cat((V[:, :, :C], value_states), dim=-2)
        for i, dst, ln in plan.runs:
            K[:, :, dst : dst + ln].copy_(key_states[:, :, i : i + ln])
            V[:, :, dst : dst + ln].copy_(value_states[:, :, i : i + ln])
        return k_out, v_out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_query_offset() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        return -1  # no limit on how many tokens can be appended

    def crop(self, tokens_to_remove: int) -> None:  # the cache crops all layers at once
        raise RuntimeError("crop a WindowCache through WindowCache.crop")

    def reset(self) -> None:
        self._clear()
        super().reset()
        if self.sink_keys is not None:
            self.sink_keys.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reordering, in place (the buffers keep their addresses)."""
        if self.is_initialized:
            for t in (self.keys, self.values, self.sink_keys):
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("WindowCache buffers are preallocated for one batch size")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("WindowCache buffers are preallocated for one batch size")

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.sink_keys))


class WindowCache(WindowPositions, Cache):
    """Sinks + sliding-window KV cache for one session (batch size 1 in position space: every row of
    a batch shares the positions). See :mod:`omnistream.memory.window_positions` for the position
    semantics (:meth:`cache_positions`, ``base``, ``delta``, ...).

    ``config``: the language model's config (``thinker.model.language_model.config``; a full
    Omni/Thinker config is reduced with ``get_text_config``). ``inv_freq``/``mrope_section`` override
    the RoPE frequencies read from it; ``num_layers`` the layer count.

    ``pool``: a :class:`~omnistream.memory.pool.RowPool` of ``S + W + chunk_tokens`` slots shared with
    other sessions' caches of the same model: the buffers are then the cache's row of it (taken at the
    first forward, released when the cache is dropped or by :meth:`release_row`), so a batched decode
    step attends over the rows without copying them (:class:`~omnistream.memory.batch.PoolBatch`).
    Batch size 1 only (a mismatched pool keeps private buffers).
    """

    def __init__(
        self,
        config=None,
        window: WindowConfig | None = None,
        *,
        num_layers: int | None = None,
        inv_freq: torch.Tensor | None = None,
        mrope_section=None,
        max_position_embeddings: int | None = None,
        pool=None,
    ):
        config = text_config(config)
        window = window if window is not None else WindowConfig()
        mpe = max_position_embeddings or getattr(config, "max_position_embeddings", None)
        self.window = window.resolve(mpe)
        self.S, self.W, self.T = self.window.sink_tokens, self.window.window_tokens, self.window.chunk_tokens
        self.R = self.window.rebase_every
        self.per_axis = self.window.shift == "per_axis"
        if num_layers is None:
            if config is None:
                raise ValueError("pass config or num_layers")
            num_layers = config.num_hidden_layers
        self.inv_freq, self.comp, self.mrope_section = rope_setup(config, inv_freq, mrope_section)
        self.kernel = bool(self.window.kernel)
        if pool is not None and pool.slots != self.S + self.W + self.T:
            raise ValueError(f"a RowPool of {pool.slots} slots for a window cache of {self.S + self.W + self.T}")
        self.pool = pool
        self._ticket = None  # this cache's row of the pool (taken at the first forward)
        # kernel mode's device buffers, shared by all layers (allocated at the first kernel-mode forward)
        self._kslots = KernelSlots(self.S, self.S + self.W + self.T, self.inv_freq, self.mrope_section)
        super().__init__(layers=[WindowLayer(self, i) for i in range(num_layers)])
        self._plan_id = 0
        self._reset_positions()

    @torch.inference_mode()  # the buffers are usually inference tensors (StreamingThinker runs under it)
    def reset(self) -> None:
        """Forget the session; keep the buffers."""
        super().reset()
        self._reset_positions()
        self._kslots.reset()
        for layer in self.layers:
            layer._done = self._plan_id  # the next plan id is fresh for every layer

    def _pooled(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether this cache keeps its buffers in a pool row (taking the row at the first layer)."""
        if self._ticket is not None:
            return True
        pool = self.pool
        if pool is None or key_states.shape[0] != 1 or not pool.fits(len(self.layers), key_states, value_states):
            return False
        self._ticket = pool.take(self, len(self.layers), key_states, value_states)
        return True

    def _repoint(self) -> None:
        """The pool moved this cache's row (compaction) or its buffers (growth): take the new views."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = self.pool.row_views(self._ticket, layer.layer_idx)

    @property
    def pool_row(self) -> int | None:
        """The pool row holding this cache's buffers (``None``: private buffers or none yet)."""
        return None if self._ticket is None else self._ticket.row

    @torch.inference_mode()
    def release_row(self) -> None:
        """Give the pool row back now and forget the session (the next forward takes a new row)."""
        if self._ticket is None:
            return
        self.reset()
        self.pool.release(self._ticket)
        self._ticket = None
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False

    @property
    def n_cached(self) -> int:
        """Tokens held (sinks + window)."""
        return self.nsink + self.count

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Tokens held before the current forward (the mask's query offset)."""
        return self._plan.C if self._plan is not None else self.n_cached

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` restores the exact earlier state (not after an eviction: evicted tokens
        do not come back, though cropping tokens still in the window keeps working)."""
        return not self.evicted

    def memory_bytes(self) -> int:
        """Bytes of the preallocated K/V buffers of all layers (0 before the first forward), plus the
        per-slot position buffers in kernel mode. This is also the bound: the buffers never grow (a
        chunk over ``chunk_tokens`` adds one transient copy)."""
        kv = sum(layer.nbytes() for layer in self.layers)
        return kv + self._kslots.nbytes() if kv else 0

    @torch.inference_mode()  # callable outside inference mode (StreamingThinker.truncate)
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers 5 convention: a negative count).

        Before any eviction this is an exact rollback. After one, only tokens still in the window can
        be dropped, and the evicted tokens do not come back (the window then holds fewer than ``W``
        tokens until refilled)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to drop")
        k = -int(tokens_to_remove)
        if k == 0:
            return
        if self._forward_pending():
            raise RuntimeError("crop between cache_positions and its forward")
        if k > self.n_cached or (self.evicted and k > self.count):
            raise ValueError(
                f"cannot drop {k} tokens: {self.count} window tokens held"
                + (" (earlier ones were evicted)" if self.evicted else f" + {self.nsink} sinks")
            )
        S, W = self.S, self.W
        for layer in self.layers:
            layer._flush()
        self._kslots.flush()
        roll = self.head if self.count == W else 0
        if roll:  # make the ring chronological from slot S (rare: one O(W) copy)
            for layer in self.layers:
                if layer.is_initialized:
                    for t in (layer.keys, layer.values):
                        t[:, :, S : S + W] = t[:, :, S : S + W].roll(-roll, dims=-2)
            self._kslots.roll_ring(S, W, roll)
        self._crop_positions(k, roll)
