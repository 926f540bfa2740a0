"""The output pacer: reply audio leaves in fixed-size chunks at real-time pace.

Pipecat's rule: audio is sent at most ``lead`` samples ahead of what the client has played, in
``chunk`` -sample deltas (40 ms). Keeping the client's buffer short is what makes a barge-in take
effect at once (nothing already queued on the client keeps talking) and what lets the server
know how much the user heard -- :meth:`AudioPacer.played`, the position the conversation is
truncated to.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from omnistream.apps.realtime_config import SAMPLE_RATE


class AudioPacer:
    """Int16 pieces in (:meth:`put`, any size, as the pipeline produces them); ``chunk`` -sample
    pieces out through ``send`` (:meth:`run`), never more than ``lead`` samples ahead of real time."""

    def __init__(self, chunk: int, lead: float):
        self.chunk, self.lead = chunk, lead
        self.pending: deque = deque()  # int16 pieces not yet sent
        self.pending_n = 0
        self.sent = 0  # samples sent
        self._play_pos, self._play_t = 0.0, None  # estimated samples played by the client
        self.wake = asyncio.Event()
        self.done = False  # no more audio will be put
        self.stopped = False

    def put(self, pcm: np.ndarray) -> None:
        """Queue (n,) int16 audio."""
        if not self.stopped:
            self.pending.append(pcm)
            self.pending_n += len(pcm)
            self.wake.set()

    def finish(self) -> None:
        """The reply's audio is complete: send what is queued, then :meth:`run` returns."""
        self.done = True
        self.wake.set()

    def stop(self) -> None:
        """Barge-in / cancel: nothing queued is sent any more; :meth:`run` returns at once."""
        self.stopped = True
        self.pending.clear()
        self.pending_n = 0
        self.wake.set()

    def played(self) -> int:
        """Samples the client has played: real time since the first chunk, stalling when it ran dry."""
        now = time.monotonic()
        if self._play_t is not None:
            self._play_pos = min(float(self.sent), self._play_pos + (now - self._play_t) * SAMPLE_RATE)
        self._play_t = now
        return int(self._play_pos)

    async def run(self, send: Callable[[np.ndarray], Awaitable[None]]) -> None:
        """Send the audio as it comes, paced; returns when finished and drained, or stopped."""
        while not self.stopped:
            if self.pending_n >= self.chunk or (self.done and self.pending_n > 0):
                n = min(self.chunk, self.pending_n)
                while self.sent and (wait := (self.sent + n - self.played() - self.lead) / SAMPLE_RATE) > 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), wait)
                    except TimeoutError:
                        pass
                    if self.stopped:
                        return
                pcm = self._take(n)
                self.played()
                self.sent += n
                await send(pcm)
            elif self.done:
                return
            else:
                self.wake.clear()
                await self.wake.wait()

    def _take(self, n: int) -> np.ndarray:
        out, need = [], n
        while need:
            head = self.pending[0]
            if len(head) <= need:
                out.append(self.pending.popleft())
                need -= len(head)
            else:
                out.append(head[:need])
                self.pending[0] = head[need:]
                need = 0
        self.pending_n -= n
        return np.concatenate(out) if len(out) > 1 else out[0]
