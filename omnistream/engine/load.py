"""How busy an engine loop is per replying session: the measurement admission control reads.

Each loop iteration of an engine (the in-process engine thread, or a stage's loop) records the
time it spent working and how many sessions had a reply in progress. Over a sliding window the
cost of one replying session is ``busy time / replying session-seconds``: the fraction of the
engine one replying session takes at the batch sizes it actually ran. A new session is admitted
while ``(sessions + 1) * cost <= headroom``, i.e. even if every session replied at once the
engine would still keep up with real time. Batching makes the per-session cost fall as the batch
grows, so an estimate taken at a smaller load is conservative; with too little measured yet
(under ``min_sample_s`` replying session-seconds in the window) every session is admitted up to
the hard ``max_sessions`` cap.
"""

from __future__ import annotations

import math
import time
from collections import deque


class LoadMeter:
    def __init__(self, window_s: float = 20.0, headroom: float = 0.9, min_sample_s: float = 2.0):
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], not {headroom!r}")
        self.window_s, self.headroom, self.min_sample_s = window_s, headroom, min_sample_s
        self._samples: deque = deque()  # (t, dt, busy_s, replying session-seconds)
        self._last = time.monotonic()
        self._busy = self._wall = self._session_s = 0.0

    def record(self, busy_s: float, replying: int, did_work: bool = True) -> None:
        """One loop iteration: ``busy_s`` of work (counted when ``did_work``), ``replying`` sessions."""
        now = time.monotonic()
        dt, self._last = now - self._last, now
        busy = busy_s if did_work else 0.0
        sample = (now, dt, busy, dt * replying)
        self._samples.append(sample)
        self._wall += dt
        self._busy += busy
        self._session_s += sample[3]
        while self._samples and now - self._samples[0][0] > self.window_s:
            _, odt, obusy, osess = self._samples.popleft()
            self._wall -= odt
            self._busy -= obusy
            self._session_s -= osess

    def cost(self) -> float | None:
        """Fraction of the engine one replying session takes (None: not enough measured yet)."""
        if self._session_s < self.min_sample_s:
            return None
        return max(self._busy, 0.0) / self._session_s

    def capacity(self) -> int | None:
        c = self.cost()
        if c is None:
            return None
        return math.inf if c <= 0 else int(self.headroom / c)

    def admission(self, sessions: int) -> str | None:
        """None if one more session fits; else the reason (for HTTP 503 / ``server_busy``)."""
        cap = self.capacity()
        if cap is None or sessions == 0 or sessions + 1 <= cap:  # (an idle server always takes one)
            return None
        return (f"at capacity: {sessions} sessions; one replying session takes {100 * self.cost():.0f}% of the "
                f"engine, so at most {cap} keep real time; try again later")

    def status(self, sessions: int) -> dict:
        c, cap = self.cost(), self.capacity()
        return {"busy_fraction": round(self._busy / self._wall, 3) if self._wall > 0 else 0.0,
                "cost_per_replying_session": None if c is None else round(c, 4),
                "capacity_sessions": None if cap is None or cap == math.inf else cap,
                "headroom": self.headroom, "sessions": sessions}
