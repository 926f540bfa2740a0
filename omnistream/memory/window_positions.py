"""Position bookkeeping of a :class:`~omnistream.memory.window_cache.WindowCache` (StreamingLLM over M-RoPE).

This module decides, once per forward and on the host, which positions the model rotates the new
tokens at, which slots they land in, and how the held keys must be re-positioned; the result is a
:class:`Plan` that every layer then executes on its buffers (rotated layout:
:class:`~omnistream.memory.window_cache.WindowLayer`; kernel mode: :mod:`omnistream.memory.window_kernel`).

Positions (StreamingLLM: positions inside the cache, not in the original stream)
----------------------------------------------------------------------------------
Sinks keep their original positions ``s``. The window tokens visible to a forward (the ``W``
cached ones plus the new chunk) are all shifted by ONE shift ``delta`` (the same integer for the
t, h and w components; ``WindowConfig.shift="per_axis"`` uses one integer per component, see
below), chosen so that the window follows the sinks::

    delta = max(0, min(window positions over all 3 components) - sink_end),
    sink_end = max(sink positions over all 3 components) + 1,

and ``delta = 0`` until the first eviction (so a cache that never evicts is exactly a
``DynamicCache``). The query is shifted by the same ``delta``. The attention therefore sees the
query-window and window-window relative positions of the original stream (a common shift cancels
in RoPE), and the query-sink relative positions ``(p_q - delta) - s``.

Why re-positioning costs ~nothing: RoPE scores depend only on position differences, and a shift
``c`` of all three components rotates every frequency by ``c * inv_freq`` whatever component the
frequency reads. So we never re-rotate the window per step. Keys are stored *rotated* at
``p - B`` (``B``, the *base*, is a per-session offset); queries are rotated at ``p - B`` too (the
caller passes the positions returned by :meth:`WindowPositions.cache_positions`), and only the ``S``
sink keys are re-rotated, at ``s + (delta - B)``, from an unrotated-at-birth copy (so no rounding
accumulates on them). Query-window: ``(p_q - B) - (p_k - B)`` = original; query-sink:
``(p_q - B) - (s + delta - B) = (p_q - delta) - s``: exactly StreamingLLM. To keep the rotated
positions small, ``B`` is moved to ``delta`` (a *rebase*: every window key of every layer is rotated
once by the change, an O(W) elementwise op) whenever ``delta - B`` leaves ``[0, rebase_every)``,
i.e. at most once every ``rebase_every`` tokens for streams advancing at most one position per
token. Amortized per token: ``W / rebase_every`` key rotations (4 at the default
``rebase_every = W // 4``), plus ``S`` sink rotations. Each rebase rounds the stored keys once (in
bf16 ~2^-9 relative), so a key goes through at most ``W / rebase_every + 1`` roundings in its life
(why the default is not 1). With ``rebase_every=1`` the rotated positions are exactly
StreamingLLM's; otherwise they exceed them by less than ``rebase_every``.

Bound on rotated positions: a forward of ``n`` tokens rotates positions ``< sink_end + span +
rebase_every`` where ``span`` is max - min (over the three components) of the visible window
(``W`` cached + ``n`` new tokens). For text and audio (all three components equal, one position
per token) ``span < W + n`` and the rotated positions are ``< S + W + n + rebase_every``
(``S + W + n`` with ``rebase_every=1``). Caveat, inherent to TMRoPE rather than to the shift: inside
ONE long open audio-in-video segment, audio tokens sit at ``(st + k, st + k, st + k)`` while video
tokens keep h, w at ``st + row/col``, so the *relative* h/w positions between the window's audio and
video tokens grow with the segment's length, and no re-positioning that preserves relative
positions inside the window can keep them small (``benchmarks/long_session.py`` measures this).
``OmniChat(segment_s=60)`` closes and reopens the segment every 60 s of media (clips), which bounds
the span by about two clips (max rotated position 2.7k over a simulated hour instead of 90k).
``shift="per_axis"`` (one shift per component; same cost, same exact relative positions)
additionally bounds a long video-only segment, whose h/w stay at ``st + row/col`` while t grows.

The window's per-component minimum is kept in monotonic deques (O(1) amortized per token), so the
bookkeeping of a decode step is a few dozen Python operations whatever ``W``.
"""

from __future__ import annotations

from collections import deque

import torch

__all__ = ["Plan", "WindowPositions"]


class Plan:
    """What every layer does in the forward that follows one ``cache_positions`` call."""

    __slots__ = (
        "C",
        "_dev",
        "dB",
        "id",
        "k_cs",
        "k_held_cs",
        "k_pos",
        "k_slots",
        "n",
        "nsink0",
        "out",
        "rebase_cs",
        "ring_valid",
        "runs",
        "sink_cs",
        "sink_shift",
    )

    def __init__(self, **kw):
        self.k_pos = self.k_slots = self.k_cs = self.k_held_cs = None
        for k, v in kw.items():
            setattr(self, k, v)
        self._dev = {}

    def cos_sin(self, which: str, device):
        key = (which, device)
        if key not in self._dev:
            c, s = getattr(self, which)
            self._dev[key] = (c.to(device), s.to(device))
        return self._dev[key]

    def moves(self) -> list[tuple[int, int, int]]:
        """``(scratch slot, ring slot, length)`` of the chunk rows not already in place: the new tokens
        are written at the scratch tail ``C..C+n`` and moved to their ring slots at the next forward."""
        C = self.C
        return [(C + i, dst, ln) for i, dst, ln in self.runs if dst != C + i]


class WindowPositions:
    """Host-side position state of a :class:`WindowCache`, mixed into it (it reads the cache's ``S``,
    ``W``, ``R``, ``per_axis``, ``kernel``, ``inv_freq``, ``comp`` and ``layers``).

    Public state (read by tests and benchmarks): ``seen``, ``nsink``, ``count``, ``head``, ``evicted``,
    ``base``, ``delta``, ``sink_end``, ``slot_pos``, ``last_rotated_range``, ``max_rotated_position``,
    ``min_rotated_position``."""

    def _reset_positions(self) -> None:
        S, W = self.S, self.W
        self.seen = 0  # tokens appended in the session
        self.nsink = 0  # sinks held
        self.count = 0  # window tokens held
        self.head = 0  # ring slot (relative to S) of the next window token; == count while count < W
        self.m_total = 0  # window tokens ever appended (global index of the next one)
        self.evicted = False
        self.base = (0, 0, 0)  # B, per component (equal components in "uniform" mode)
        self.delta = (0, 0, 0)  # shift of the last forward
        self.sink_end = (0, 0, 0)
        self._cs_memo: dict = {}
        self.last_rotated_range = (0, 0)
        self.slot_pos = [[0] * (S + W) for _ in range(3)]  # original positions of the held tokens, per slot
        self._mins = [deque() for _ in range(3)]  # monotonic (global index, value) per component
        self._plan: Plan | None = None
        self.max_rotated_position = -(2**62)  # largest position handed to the model (diagnostic)
        self.min_rotated_position = 2**62

    def _forward_pending(self) -> bool:
        """Whether ``cache_positions`` was called and some layer has not run its forward yet."""
        return self._plan is not None and any(
            layer.is_initialized and layer._done != self._plan.id for layer in self.layers
        )

    def window_order(self) -> list[int]:
        """Slot indices of the held tokens in stream order (sinks first)."""
        S, W = self.S, self.W
        ring = [S + i for i in range(self.count)] if self.count < W else [S + (self.head + i) % W for i in range(W)]
        return list(range(self.nsink)) + ring

    def kept_positions(self) -> torch.Tensor:
        """(3, n_cached) original positions of the held tokens in stream order."""
        order = self.window_order()
        return torch.tensor([[c[i] for i in order] for c in self.slot_pos], dtype=torch.long).view(3, -1)

    def bookkeeping_bytes(self) -> int:
        """Host-side position bookkeeping (slot positions + min-deques), also bounded by S + W."""
        return 3 * len(self.slot_pos[0]) * 8 + sum(len(d) for d in self._mins) * 72

    # ------------------------------------------------------------------ window minima
    def _axis_min(self):
        """[3] min of each component over the held window tokens (None if empty)."""
        if self.count == 0:
            return None
        return [d[0][1] for d in self._mins]

    def _push(self, cols: list, first_index: int) -> None:
        """Push window tokens (3 lists of k ints) with global indices first_index.. on the min-deques."""
        big = 2**62
        for vals, d in zip(cols, self._mins):
            # only suffix minima can survive (a later token <= them pops them): filter first
            keep, later = [], big
            for i in range(len(vals) - 1, -1, -1):
                if vals[i] < later:
                    keep.append(i)
                    later = vals[i]
            for i in reversed(keep):
                v = vals[i]
                while d and d[-1][1] >= v:
                    d.pop()
                d.append((first_index + i, v))

    def _evict_mins(self) -> None:
        lo = self.m_total - self.count
        for d in self._mins:
            while d and d[0][0] < lo:
                d.popleft()

    def _rebuild_mins(self) -> None:
        self._mins = [deque() for _ in range(3)]
        order = self.window_order()[self.nsink :]
        if order:
            self._push([[c[i] for i in order] for c in self.slot_pos], self.m_total - self.count)

    # ------------------------------------------------------------------ the plan of a forward
    def _cos_sin(self, shift: tuple, memo: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (D,) cos/sin rotating every frequency by ``shift[component] * inv_freq``. Sink shifts
        repeat (they cycle through ``[0, rebase_every)``) and are memoized, at most 1024 of them."""
        cs = self._cs_memo.get(shift) if memo else None
        if cs is None:
            ang = torch.tensor(shift, dtype=torch.float64)[self.comp] * self.inv_freq
            ang = torch.cat((ang, ang))
            cs = (ang.cos().float(), ang.sin().float())
            if memo:
                if len(self._cs_memo) >= 1024:
                    self._cs_memo.clear()
                self._cs_memo[shift] = cs
        return cs

    def _place(self, runs: list, cols: list, src: int, dst: int, ln: int) -> None:
        """Chunk rows ``src..src+ln`` end in slots ``dst..dst+ln``: record the run and their positions."""
        runs.append((src, dst, ln))
        for sp, c in zip(self.slot_pos, cols):
            sp[dst : dst + ln] = c[src : src + ln]

    def cache_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Register the ORIGINAL positions ``(3, n)`` or ``(3, 1, n)`` of the tokens of the next
        forward and return the positions to pass to the model instead, as ``(3, 1, n)`` (the shape
        the model reads as 3-D positions of a batch of one) on the input's device.
        Call exactly once before each forward that uses this cache. (CPU positions avoid a
        device sync; the bookkeeping is host-side Python, O(1) amortized per token.)"""
        shape, device = position_ids.shape, position_ids.device
        if position_ids.ndim == 3 and position_ids.shape[1] != 1:
            raise ValueError("WindowCache positions are per session: position_ids of shape (3, 1, n)")
        if shape[0] != 3 or position_ids.ndim not in (2, 3):
            raise ValueError(f"expected (3, n) or (3, 1, n) position_ids, got {tuple(shape)}")
        if self._forward_pending():
            raise RuntimeError("cache_positions called twice without a forward in between")
        pos = position_ids.detach().reshape(3, -1).to("cpu", torch.long)
        cols = pos.tolist()
        n = len(cols[0])
        if n == 0:
            raise ValueError("no tokens")
        S, W = self.S, self.W
        nsink0, count0, head0 = self.nsink, self.count, self.head
        k_s = min(S - nsink0, n)  # tokens that become sinks (only before the sinks are full)
        m = n - k_s  # window tokens of this forward

        # the shift of this forward: the visible window is the held window plus the chunk's window tokens
        delta = (0, 0, 0)
        if self.evicted:
            lo = self._axis_min()
            if m:
                lo_c = [min(c[k_s:]) for c in cols]
                lo = lo_c if lo is None else [min(a, b) for a, b in zip(lo, lo_c)]
            if not self.per_axis:
                lo = [min(lo)] * 3
            delta = tuple(max(0, a - e) for a, e in zip(lo, self.sink_end))
        base = self.base
        if self.evicted and any(not 0 <= d - b < self.R for d, b in zip(delta, base)):
            base = delta
        dB = tuple(b - a for a, b in zip(self.base, base))
        sink_shift = tuple(d - b for d, b in zip(delta, base))
        if not any(base):
            out = pos
        elif n <= 64:  # cheaper than a tensor op for decode steps
            out = torch.tensor([[v - b for v in c] for c, b in zip(cols, base)], dtype=torch.long)
        else:
            out = pos - torch.tensor(base, dtype=torch.long)[:, None]

        # bookkeeping after this forward: which chunk rows end where (the ring keeps the last W)
        runs = []
        if k_s:
            self._place(runs, cols, 0, nsink0, k_s)
            self.nsink += k_s
            if self.nsink == S:
                ends = [max(c[:S]) + 1 for c in self.slot_pos]
                self.sink_end = tuple(ends) if self.per_axis else (max(ends),) * 3
        if m:
            keep = min(m, W)
            first = m - keep
            start = (head0 + first) % W
            l1 = min(keep, W - start)
            self._place(runs, cols, k_s + first, S + start, l1)
            if keep > l1:  # the ring wraps around
                self._place(runs, cols, k_s + first + l1, S, keep - l1)
            self._push([c[k_s + first :] for c in cols], self.m_total + first)
            self.m_total += m
            self.head = (head0 + m) % W
            self.count = min(count0 + m, W)
            if count0 + m > W:
                self.evicted = True
            self._evict_mins()
        self.seen += n
        self.base, self.delta = base, delta
        self._plan_id += 1
        k = self.kernel  # kernel mode never re-rotates keys: positions only
        self._plan = Plan(
            id=self._plan_id, C=nsink0 + count0, n=n, nsink0=nsink0, ring_valid=count0, dB=dB,
            sink_shift=sink_shift, runs=runs, out=out,
            rebase_cs=self._cos_sin(tuple(-x for x in dB)) if count0 and any(dB) and not k else None,
            sink_cs=self._cos_sin(sink_shift, memo=True) if nsink0 and any(sink_shift) and not k else None,
        )
        hi = max(max(c) - b for c, b in zip(cols, base))
        lo_r = min(min(c) - b for c, b in zip(cols, base))
        self.last_rotated_range = (lo_r, hi)
        self.max_rotated_position = max(self.max_rotated_position, hi)
        self.min_rotated_position = min(self.min_rotated_position, lo_r)
        return out.reshape(3, 1, n).to(device)

    def _crop_positions(self, k: int, roll: int) -> None:
        """Drop the last ``k`` held tokens from the bookkeeping; ``roll`` (the head of a full ring, or 0)
        is the rotation the caller applied to the ring's buffers to make them chronological from slot S."""
        S, W = self.S, self.W
        if roll:
            for sp in self.slot_pos:
                sp[S : S + W] = sp[S + roll : S + W] + sp[S : S + roll]
        drop_w = min(k, self.count)
        self.count -= drop_w
        self.m_total -= drop_w
        self.head = self.count % W
        drop_s = k - drop_w
        if drop_s:
            self.nsink -= drop_s
            self.sink_end = (0, 0, 0)
        self.seen -= k
        self._plan = None
        self._rebuild_mins()
