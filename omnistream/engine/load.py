"""How much of an engine loop one real-time session takes: the measurement admission control reads.

Each loop iteration of an engine (the in-process engine thread, or a stage's loop) records the
time it spent working, how many sessions had a reply in progress, and how many seconds of speech
its speech worker (the last of Talker / Token2Wav it runs) had produced so far. Over a sliding
window the cost of one session is ``busy time / real-time seconds served``, where a speaking reply
serves the seconds of speech it got and any other reply (text, or a stage without a speech worker)
the wall time it was in progress. Why speech seconds and not wall time: an engine that falls behind
stretches every reply, so wall time per reply grows with the overload and ``busy / wall`` would
stay flat at ``1 / sessions`` -- a saturated engine would look like it had room; speech produced per
busy second does not move. A new session is admitted while ``(sessions + 1) * cost <= headroom``,
i.e. even if every session replied at once the engine would keep up with real time. Batching makes
the per-session cost fall as the batch grows, so an estimate taken at a smaller load is conservative;
with too little measured yet (under ``min_sample_s`` seconds served in the window) every session is
admitted up to the hard ``max_sessions`` cap.
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
        self._samples: deque = deque()  # (t, dt, busy_s, real-time seconds served)
        self._last = time.monotonic()
        self._busy = self._wall = self._session_s = 0.0
        self._speech: float | None = None  # the speech worker's running total at the last record

    def record(self, busy_s: float, replying: int, did_work: bool = True, speaking: int = 0,
               speech_s: float | None = None) -> None:
        """One loop iteration: ``busy_s`` of work (counted when ``did_work``), ``replying`` sessions of
        which ``speaking`` are speech replies, ``speech_s`` the seconds of speech produced so far in all
        (a running total: the meter takes the difference)."""
        now = time.monotonic()
        dt, self._last = now - self._last, now
        busy = busy_s if did_work else 0.0
        spoken = 0.0
        if speech_s is not None:  # (the first total is the baseline)
            spoken, self._speech = max(0.0, speech_s - (self._speech if self._speech is not None else speech_s)), speech_s
        sample = (now, dt, busy, spoken + dt * max(0, replying - speaking))
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
        """Fraction of the engine one real-time session takes (None: not enough measured yet)."""
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
