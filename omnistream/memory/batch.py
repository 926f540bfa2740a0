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
K/V per layer per step, the same order of memory traffic as the attention's own read of them.

Design (rows of a pool, no copy): :class:`PoolBatch`, when every row is a ``WindowCache`` kept in a
row of the same :class:`~omnistream.memory.pool.RowPool` (``window_thinker`` caches; rotated layout or
kernel mode) or every row a :class:`~omnistream.memory.growing_cache.GrowingCache` of the same growable
pool (the ``StreamingThinker``'s default cache: tokens in order in slots ``[0, n)``, post-RoPE, the
padding mask as for a rotated window; a growable pool that would overflow doubles its slots in
:meth:`PoolBatch.prepare`, before the forward). Kernel-mode window rows (pre-RoPE) go to the kernel as
one strided view with per-row slot positions gathered once per forward, ``(B, 3, L_max)`` int32, not
per layer. Each row's cache still does its
own update (bookkeeping and the write of its new K/V, in its own row), then the step attends over the
pool's rows themselves: rows ``[lo, lo + B)`` and slots ``[0, L_max)`` of the per-layer
``(R, H, S, D)`` buffer are one strided view (no copy) when the batch's rows are consecutive pool rows
in batch order. When some sessions in between do not reply this tick, the forward runs over the whole
span of rows (up to ``PoolBatch.SPAN_LIMIT`` = 2x the batch) with those rows as idle queries whose
output is dropped; beyond that, one ``index_select`` of the rows per layer (the copy
of the gather design, of ``L_max`` slots per row, but one op per layer, not one per row). Measured on
CPU (tiny Thinker widened to 8 layers, 2,048-token sessions, batch 8, 34 MB of K/V gathered per step):
gather 12.5 ms, view 8.7 ms, span of 15 rows 9.1 ms, index_select 9.7 ms per step. On a GPU an idle
query costs one more row of the weight matmuls, nearly free while decode is bound by reading weights,
and its masked attention reads one row, where ``index_select`` reads and writes every selected one.
:func:`batch_cache` compacts the pool and orders the batch by pool row, so a tick in which every
session replies takes the plain view. A row's slots past its own ``L_b`` hold stale or zero keys of its own session:
the same padding mask hides them (``finfo.min`` before the softmax: an exact zero weight). Slicing
the slots to ``L_max`` keeps young sessions from attending over the whole window; a CUDA-graph capture
takes all ``S`` slots and power-of-two row buckets instead (static shapes: :mod:`omnistream.model.thinker_graphs`).

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

from .growing_cache import GrowingCache
from .window_cache import WindowCache

__all__ = ["BatchCache", "PoolBatch", "batch_cache", "cache_kind", "check_model"]


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
        self.order = list(range(len(self.rows)))  # row b of the batch is caches[order[b]] (see batch_cache)
        self.copy_bytes = 0  # K/V bytes copied to build the attention's inputs, all layers (diagnostic)

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

    def spread(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The forward's input rows from the batch rows (the same here; see :meth:`PoolBatch.spread`)."""
        return x

    def pick(self, y: torch.Tensor) -> torch.Tensor:
        """The batch rows of a forward output (the same here; see :meth:`PoolBatch.pick`)."""
        return y

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
            self.copy_bytes += k.nbytes + v.nbytes
            if self.kernel:
                handles.append(self._row_handle(k, b))
        if not self.kernel:
            return K, V
        return self._tag(K, handles), V

    def _forward_row(self, b: int) -> int:
        """The row of the forward that batch row b is (the same here; see :class:`PoolBatch`)."""
        return b

    def _row_handle(self, k: torch.Tensor, b: int):
        from omnistream.kernels.window_attention import HANDLE_ATTR

        h = getattr(k, HANDLE_ATTR, None)
        if h is None:
            raise RuntimeError(f"row {b}: a kernel-mode WindowCache returned no decode handle")
        return h

    def _tag(self, K: torch.Tensor, handles: list):
        """Kernel mode: the padded pre-RoPE keys tagged with one handle holding every row's slot positions."""
        from omnistream.kernels.window_attention import HANDLE_ATTR, DecodeHandle

        B, L = K.shape[0], K.shape[-2]  # B: the forward's rows (a PoolBatch span may hold idle rows)
        if self._slot_pos is None:  # the slot positions are per cache, shared by its layers: once per forward
            sp = torch.zeros(B, 3, L, dtype=torch.int32, device=K.device)
            for b, h in enumerate(handles):
                sp[self._forward_row(b), :, : self.lengths[b]] = h.slot_pos[0]
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


def _pooled(cache) -> bool:
    """A cache whose buffers are a pool row with room for the step's token: a WindowCache with a scratch
    slot, or a GrowingCache (its pool grows in ``PoolBatch.prepare`` when a row would overflow)."""
    if isinstance(cache, WindowCache):
        return cache.pool_row is not None and cache.T >= 1
    return isinstance(cache, GrowingCache) and cache.pool_row is not None


def batch_cache(caches: Sequence) -> BatchCache:
    """The batch for one decode forward of ``caches``: a :class:`PoolBatch` when they all live in one
    pool (compacted first, rows ordered by pool row: read ``.order``), else a :class:`BatchCache`."""
    if len(caches) > 1 and all(_pooled(c) for c in caches) and len({id(c.pool) for c in caches}) == 1:
        caches[0].pool.compact()
        order = sorted(range(len(caches)), key=lambda i: caches[i].pool_row)
        batch = PoolBatch([caches[i] for i in order])
        batch.order = order
        return batch
    return BatchCache(caches)


class PoolBatch(BatchCache):
    """B rows of one :class:`~omnistream.memory.pool.RowPool` as one decode forward, attending over the
    pool's own buffers (see the module docstring). Build it with :func:`batch_cache`.

    ``SPAN_LIMIT``: when the rows are not consecutive but lie within ``SPAN_LIMIT * B`` pool rows, the
    forward runs over that whole span ``[lo, hi)`` (a view) with the rows that do not step as idle
    queries (zero input, one visible slot, output dropped, cache untouched): compute for ``hi - lo``
    rows instead of a copy of B rows' K/V. Beyond it, one ``index_select`` per layer."""

    SPAN_LIMIT = 2.0

    def __init__(self, caches: Sequence):
        super().__init__(caches)
        if not all(_pooled(c) for c in self.rows) or len({id(c.pool) for c in self.rows}) != 1:
            raise ValueError("PoolBatch rows must be window caches (chunk_tokens >= 1) or growing caches "
                             "in rows of one RowPool")
        self.pool = self.rows[0].pool
        self._prows: list[int] = []
        self._lo = 0  # first pool row of the forward (view modes)
        self._at: torch.Tensor | None = None  # span mode: (B,) forward row of each batch row
        self._idx: torch.Tensor | None = None  # select mode: (B,) pool row of each batch row

    def prepare(self, positions: Sequence[torch.Tensor], device) -> torch.Tensor:
        """As :meth:`BatchCache.prepare`; in span mode the positions and the valid slots cover the span."""
        self.pool.trim()  # a finalizer may have freed rows since batch_cache: nothing moves mid-forward
        pos = super().prepare(positions, device)  # (3, B, 1)
        self.pool.ensure_slots(max(self.lengths))  # growing rows: the pool grows now, not inside a layer
        B = len(self.rows)
        self._prows = rows = [c.pool_row for c in self.rows]
        lo, hi = min(rows), max(rows) + 1
        self._lo, self._at, self._idx = lo, None, None
        if rows == list(range(lo, hi)):
            return pos
        if hi - lo > self.SPAN_LIMIT * B:
            self._idx = torch.tensor(rows, device=device)
            return pos
        self._at = torch.tensor([r - lo for r in rows], device=device)
        valid = torch.zeros(hi - lo, self._valid.shape[1], dtype=torch.bool, device=device)
        valid[:, 0] = True  # an idle row sees one slot: its softmax stays finite
        self._valid = valid.index_copy_(0, self._at, self._valid)  # (N, L_max)
        return self.spread(pos, dim=1)  # (3, N, 1)

    @property
    def copies(self) -> bool:
        """Whether this step copies rows (``index_select``) instead of viewing them."""
        return self._idx is not None

    @property
    def width(self) -> int:
        """Rows of the forward: B, or the span's ``hi - lo`` in span mode."""
        return len(self.rows) if self._at is None else self._valid.shape[0]

    def spread(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The batch rows of ``x`` (B along ``dim``) placed at their forward rows (N along ``dim``, zeros between)."""
        if self._at is None:
            return x
        shape = list(x.shape)
        shape[dim] = self.width
        return x.new_zeros(shape).index_copy_(dim, self._at, x)

    def pick(self, y: torch.Tensor) -> torch.Tensor:
        """The batch rows (B, ...) of a forward output (N, ...)."""
        return y if self._at is None else y.index_select(0, self._at)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Row b's new K/V ``(1, H, 1, D)`` go into its own cache (its pool row); returns slots
        ``[0, L_max)`` of the forward's pool rows ``(N, H, L_max, D)``: a view unless in select mode."""
        if self.lengths is None:
            raise RuntimeError("BatchCache.prepare must run before the forward")
        N, _, n, _ = key_states.shape
        if N != self.width or n != 1:
            raise ValueError(f"BatchCache is a decode step of {self.width} rows x 1 token; got ({N}, {n})")
        Kp, Vp = self.pool.K[layer_idx], self.pool.V[layer_idx]  # (R, H, S, D)
        handles = []
        for b, (cache, ln, r) in enumerate(zip(self.rows, self.lengths, self._prows)):
            i = self._forward_row(b)
            k, _ = cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx)  # views of row r
            if k.shape[-2] != ln or k.data_ptr() != Kp[r].data_ptr():
                raise RuntimeError(f"row {b}: its cache did not return {ln} slots of its pool row {r}")
            if self.kernel:
                handles.append(self._row_handle(k, b))
        L = max(self.lengths)
        if self._idx is None:
            k, v = Kp[self._lo : self._lo + N, :, :L], Vp[self._lo : self._lo + N, :, :L]
        else:
            k, v = Kp[:, :, :L].index_select(0, self._idx), Vp[:, :, :L].index_select(0, self._idx)
            self.copy_bytes += k.nbytes + v.nbytes
        return (self._tag(k, handles), v) if self.kernel else (k, v)

    def _forward_row(self, b: int) -> int:
        return b if self._at is None else self._prows[b] - self._lo
