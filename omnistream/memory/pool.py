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

Growable pools (``growable=True``, :func:`growing_pool`): the rows of growing caches
(:class:`~omnistream.memory.growing_cache.GrowingCache`: a session's tokens in order in slots ``[0, n)``).
Their slot count doubles when a row would overflow (:meth:`ensure_slots`: all rows re-made, the held
slots copied, every live cache re-pointed; amortised O(1) per token, as a list's append) and halves at
safe points (:meth:`trim`: a new row, a batched step) while every live row holds at most half of it, so
a lone session holds less than twice what its ``DynamicCache`` held at its peak (above the 16-slot floor). No
hysteresis is needed for decode (a row that just doubled holds more than half); a crop across a
power of two followed by an append costs one extra halving and doubling. Slots only move between
forwards or before any layer of a forward has written (the cache asks at its first layer; a batched
step asks in ``PoolBatch.prepare``).
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["RowPool", "Ticket", "growing_pool", "row_pool"]

ATTR = "_omnistream_row_pools"
GROWING_MIN_SLOTS = 16  # a growable pool's smallest slot count


class Ticket:
    """A cache's claim on one row; ``row`` changes when compaction moves it, ``None`` once released."""

    __slots__ = ("__weakref__", "row")

    def __init__(self, row: int):
        self.row: int | None = row


class RowPool:
    """Rows of per-layer K/V buffers ``(R, H_kv, slots, D)`` (see the module docstring)."""

    def __init__(self, slots: int, rows: int = 1, *, growable: bool = False):
        if slots < 1 or rows < 1:
            raise ValueError("a RowPool needs slots >= 1 and rows >= 1")
        self.slots, self.rows = int(slots), int(rows)
        self.growable = bool(growable)  # slots double on demand and halve when little is held (growing caches)
        self.min_slots = self.slots
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
        zeroed. ``cache`` must have ``_repoint()`` (called whenever its row or the buffers move) and, in a
        growable pool, ``slots_held()`` (the slots of its row it needs kept)."""
        if not self.fits(layers, key_states, value_states):
            raise ValueError("this RowPool holds caches of another shape, dtype or device")
        if self.spec is None:
            _, h, _, d = key_states.shape
            self.spec = (layers, h, d, value_states.shape[-1], key_states.dtype, key_states.device)
            self._inference = torch.is_inference_mode_enabled()
            self._alloc(self.rows)
        self.trim()  # (a growable pool gives back the slots its remaining rows no longer need)
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
            self._alloc(rows, self._trimmed_slots())

    def _trimmed_slots(self) -> int:
        """A growable pool's slot count after halving while every live row holds at most half of it."""
        if not self.growable:
            return self.slots
        need = max([c.slots_held() for c in (o() for o in self.owner if o is not None) if c is not None] or [0])
        slots = self.slots
        while slots > self.min_slots and need <= slots // 2:
            slots //= 2
        return slots

    def trim(self) -> None:
        """Compact, then give back slots no live row needs (growable pools; between forwards only)."""
        self.compact()
        slots = self._trimmed_slots()
        if slots < self.slots and self.spec is not None:
            self._alloc(self.rows, slots)

    def ensure_slots(self, n: int) -> None:
        """Make every row hold at least ``n`` slots: a growable pool doubles its slot count (rows re-made and
        copied, caches re-pointed); a fixed one refuses. Call before a forward's first write, never mid-layer."""
        if n <= self.slots:
            return
        if not self.growable:
            raise ValueError(f"{n} slots needed in a RowPool of {self.slots} slots")
        slots = self.slots
        while slots < n:
            slots *= 2
        if self.spec is None:
            self.slots = slots
        else:
            self._alloc(self.rows, slots)

    def _alloc(self, rows: int, slots: int | None = None) -> None:
        """(Re)make the buffers with ``rows`` rows (more, or fewer after compaction) and ``slots`` slots
        (growable pools; default unchanged), keeping the held rows' first slots; re-points every live cache."""
        layers, h, dk, dv, dtype, device = self.spec
        slots = self.slots if slots is None else int(slots)
        with torch.inference_mode(self._inference):
            def grown(old: torch.Tensor | None, d: int) -> torch.Tensor:
                new = torch.zeros(rows, h, slots, d, dtype=dtype, device=device)
                if old is not None:
                    n, s = min(rows, old.shape[0]), min(slots, old.shape[2])
                    new[:n, :, :s].copy_(old[:n, :, :s])
                return new

            old_k = self.K or [None] * layers
            old_v = self.V or [None] * layers
            self.K = [grown(old_k[i], dk) for i in range(layers)]
            self.V = [grown(old_v[i], dv) for i in range(layers)]
        self.tickets = (self.tickets + [None] * rows)[:rows]
        self.owner = (self.owner + [None] * rows)[:rows]
        self.rows, self.slots = rows, slots
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


def growing_pool(model) -> RowPool:
    """The growable pool of ``model`` (the language model) for its sessions' growing caches."""
    pools = model.__dict__.setdefault(ATTR, {})
    if (0, "growing") not in pools:
        pools[0, "growing"] = RowPool(GROWING_MIN_SLOTS, growable=True)
    return pools[0, "growing"]


def row_pool(model, slots: int, kind: str = "rotated") -> RowPool:
    """The pool of ``model`` (the language model the caches serve) for caches of ``slots`` slots of one
    kind (``"rotated"`` or ``"kernel"``: they never share a forward, so mixing them would split the rows)."""
    pools = model.__dict__.setdefault(ATTR, {})
    if (slots, kind) not in pools:
        pools[slots, kind] = RowPool(slots)
    return pools[slots, kind]
