"""Rows of preallocated K/V buffers shared by the window caches of one model: :class:`RowPool`.

Why: a batched decode step over B sessions must hand the attention one ``(B, H_kv, L, D)`` key tensor
per layer. When every session keeps its own buffers, building that tensor copies every held K/V once
per layer per step (:class:`~omnistream.memory.batch.BatchCache`). When the sessions' buffers are the
rows of one ``(R, H_kv, S, D)`` tensor per layer, rows ``[lo, lo + B)`` of it ARE that tensor: a view,
no copy (:class:`~omnistream.memory.batch.PoolBatch`).

What it holds: per layer one K and one V buffer ``(R, H_kv, S, D)``, ``S`` the slot count of the window
caches it serves (sinks + window + chunk scratch: every cache of a pool has the same). A
:class:`~omnistream.memory.window_cache.WindowCache` built with ``pool=`` takes a row at its first
forward (when the head count, head size, dtype and device are known) and stores its slots in views
``(1, H_kv, S, D)`` of its row; it does all its own bookkeeping (eviction, rebases, sink re-rotation) on
those views exactly as on private buffers, so a solo forward is unchanged.

Rows, as the Talker's static rows (:mod:`omnistream.model.graphs`): taken lowest-free-first; a released
row is compacted away (the highest live row moves into the hole and its cache is re-pointed), so the
live caches hold rows ``[0, n)`` and a tick in which every session replies is one view. Memory: the pool
starts with one row (a lone session holds what a private cache would), doubles when no row is free (a
growth holds the old and the new buffers for a moment) and halves after compaction while at most a
quarter of its rows are held. A cache releases its row when it is garbage-collected (``weakref.finalize``) or by
:meth:`WindowCache.release_row`. A finalizer may fire inside another session's forward (the cyclic
collector runs at any allocation), so :meth:`release` only marks the row; the row copies of compaction
run at safe points, between forwards (:meth:`compact`: at the next :meth:`take` and before a batched
step). The pool is used from one thread (the engine's); a finalizer may run anywhere, hence marks only.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["RowPool", "Ticket", "row_pool"]

ATTR = "_omnistream_row_pools"


class Ticket:
    """A cache's claim on one row; ``row`` changes when compaction moves it, ``None`` once released."""

    __slots__ = ("__weakref__", "row")

    def __init__(self, row: int):
        self.row: int | None = row


class RowPool:
    """Rows of per-layer K/V buffers ``(R, H_kv, slots, D)`` (see the module docstring)."""

    def __init__(self, slots: int, rows: int = 1):
        if slots < 1 or rows < 1:
            raise ValueError("a RowPool needs slots >= 1 and rows >= 1")
        self.slots, self.rows = int(slots), int(rows)
        self.K: list[torch.Tensor] = []  # per layer (R, H_kv, slots, D)
        self.V: list[torch.Tensor] = []
        self.spec: tuple | None = None  # (layers, H_kv, D_k, D_v, dtype, device), fixed by the first take
        self._inference = False  # whether the buffers are inference tensors (made inside inference_mode)
        self.owner: list[weakref.ref | None] = []  # per row: the cache holding it
        self.tickets: list[Ticket | None] = []
        self.freed = 0  # rows marked free since the last compaction
        self.moves = 0  # rows moved by compaction (diagnostic)

    # ------------------------------------------------------------------ rows
    @property
    def used(self) -> int:
        """Rows held by live caches (after compaction they are rows ``[0, used)``)."""
        return sum(t is not None for t in self.tickets)

    def fits(self, layers: int, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether a cache with these per-layer shapes can live in this pool."""
        _, h, _, d = key_states.shape
        spec = (layers, h, d, value_states.shape[-1], key_states.dtype, key_states.device)
        return self.spec is None or self.spec == spec

    def take(self, cache, layers: int, key_states: torch.Tensor, value_states: torch.Tensor) -> Ticket:
        """A free row for ``cache`` (lowest first; doubles the rows when none is free). Its slots are
        zeroed. ``cache`` must have ``_repoint()`` (called whenever its row or the buffers move)."""
        if not self.fits(layers, key_states, value_states):
            raise ValueError("this RowPool holds caches of another shape, dtype or device")
        if self.spec is None:
            _, h, _, d = key_states.shape
            self.spec = (layers, h, d, value_states.shape[-1], key_states.dtype, key_states.device)
            self._inference = torch.is_inference_mode_enabled()
            self._alloc(self.rows)
        self.compact()
        if None in self.tickets:
            r = self.tickets.index(None)
        else:
            r = self.rows
            self._alloc(2 * self.rows)
        ticket = Ticket(r)
        self.tickets[r], self.owner[r] = ticket, weakref.ref(cache)
        with torch.inference_mode(self._inference):
            for k, v in zip(self.K, self.V):
                k[r].zero_()
                v[r].zero_()
        weakref.finalize(cache, self.release, ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Mark the ticket's row free (safe inside a forward: nothing moves until :meth:`compact`)."""
        r = ticket.row
        if r is None or self.tickets[r] is not ticket:
            return
        ticket.row = None
        self.tickets[r] = self.owner[r] = None
        self.freed += 1

    def compact(self) -> None:
        """Move the highest live rows into the holes below them (between forwards only)."""
        if not self.freed:
            return
        self.freed = 0
        with torch.inference_mode(self._inference):
            while True:
                live = [i for i, t in enumerate(self.tickets) if t is not None]
                holes = [i for i, t in enumerate(self.tickets) if t is None]
                if not live or not holes or holes[0] > live[-1]:
                    break
                src, dst = live[-1], holes[0]
                t, o = self.tickets[src], self.owner[src]
                for k, v in zip(self.K, self.V):
                    k[dst].copy_(k[src])
                    v[dst].copy_(v[src])
                if self.tickets[src] is not t:  # its cache died during the copy (a finalizer ran): nothing to move
                    continue
                self.tickets[dst], self.owner[dst] = t, o
                self.tickets[src] = self.owner[src] = None
                t.row = dst
                self.moves += 1
                cache = o()
                if cache is not None:
                    cache._repoint()
        rows = self.rows
        while rows > 1 and self.used <= rows // 4:
            rows //= 2
        if rows < self.rows:
            self._alloc(rows)

    def _alloc(self, rows: int) -> None:
        """(Re)make the buffers with ``rows`` rows (more, or fewer after compaction), keeping the held
        rows; re-points every live cache."""
        layers, h, dk, dv, dtype, device = self.spec
        with torch.inference_mode(self._inference):
            def grown(old: torch.Tensor | None, d: int) -> torch.Tensor:
                new = torch.zeros(rows, h, self.slots, d, dtype=dtype, device=device)
                if old is not None:
                    n = min(rows, old.shape[0])
                    new[:n].copy_(old[:n])
                return new

            old_k = self.K or [None] * layers
            old_v = self.V or [None] * layers
            self.K = [grown(old_k[i], dk) for i in range(layers)]
            self.V = [grown(old_v[i], dv) for i in range(layers)]
        self.tickets = (self.tickets + [None] * rows)[:rows]
        self.owner = (self.owner + [None] * rows)[:rows]
        self.rows = rows
        for o in self.owner:
            cache = o() if o is not None else None
            if cache is not None:
                cache._repoint()

    def row_views(self, ticket: Ticket, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ticket's row of one layer: K and V views ``(1, H_kv, slots, D)``."""
        r = ticket.row
        if r is None:
            raise RuntimeError("this cache's pool row was released")
        return self.K[layer][r : r + 1], self.V[layer][r : r + 1]

    def nbytes(self) -> int:
        """Bytes of all rows' buffers (held and free)."""
        return sum(t.numel() * t.element_size() for t in (*self.K, *self.V))


def row_pool(model, slots: int, kind: str = "rotated") -> RowPool:
    """The pool of ``model`` (the language model the caches serve) for caches of ``slots`` slots of one
    kind (``"rotated"`` or ``"kernel"``: they never share a forward, so mixing them would split the rows)."""
    pools = model.__dict__.setdefault(ATTR, {})
    if (slots, kind) not in pools:
        pools[slots, kind] = RowPool(slots)
    return pools[slots, kind]
