"""Draining a replica (SIGTERM, ``POST /admin/drain``): what a rolling deploy needs.

From the first moment the server takes no new session (503 at the handshake, ``/health`` 503
``draining``: the load balancer stops routing here) while the sessions it has end one by one:

- an idle session (no reply running) is told at once -- an ``error`` event with code
  ``session_ending`` -- and closed with WebSocket code 1012 ("service restart"), so its client
  reconnects and the balancer puts it on another replica;
- a session with a reply running keeps it: the reply finishes, then the session is told and
  closed the same way;
- a reply still running when the grace period is nearly over (``cut_at``, :func:`cut_time`) is cut
  -- its ``response.done`` says ``incomplete`` (reason ``server_shutdown``) -- and its session
  closed; a connection that still has not closed by the end of the grace is dropped.

The grace period (``serve --drain-grace-s``, default 30 s) is what Kubernetes'
``terminationGracePeriodSeconds`` should match: the process exits before it is killed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from websockets.exceptions import ConnectionClosed

from omnistream.apps.realtime import ProtocolError

log = logging.getLogger("omnistream.server")
CLOSE_SERVICE_RESTART = 1012
STOP_REASON = "server_shutdown"  # Reply.stopped for a reply cut by the drain (response.done: incomplete)
POLL_S = 0.05


def cut_time(grace_s: float) -> float:
    """Seconds into the drain at which running replies are cut: late enough to let most finish,
    early enough (2 s, or half the grace when shorter) for their ``response.done`` and the close."""
    return max(grace_s - 2.0, grace_s / 2)


class Drainer:
    """Runs one server's drain (see the module doc); :attr:`done` is set when no session is left."""

    def __init__(self, server):
        self.server = server
        self.started: float | None = None  # monotonic time the drain began
        self.grace_s = 0.0
        self.done = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._told: set = set()

    @property
    def draining(self) -> bool:
        return self.started is not None

    def start(self, why: str, grace_s: float | None = None, again_cuts: bool = False) -> bool:
        """Begin draining (False if already draining). ``again_cuts``: a call while draining (a
        second SIGTERM/SIGINT) cuts the running replies at once instead of waiting for them."""
        if self.started is not None:
            if again_cuts:
                self.grace_s = min(self.grace_s, time.monotonic() - self.started + 1.0)
                log.warning("drain: told again (%s): cutting the running replies now", why)
            return False
        self.started = time.monotonic()
        self.grace_s = self.server.config.drain_grace_s if grace_s is None else grace_s
        log.info("draining (%s): no new sessions; %d open; grace %.1f s", why, len(self.server.sessions), self.grace_s,
                 extra={"fields": {"event": "drain.start", "sessions": len(self.server.sessions), "why": why}})
        self._task = asyncio.create_task(self._run())
        return True

    async def wait(self) -> None:
        await self.done.wait()

    async def close(self) -> None:
        """The server closes: a drain still running stops here (its sessions are closed with the server)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            while self.server.sessions:
                elapsed = time.monotonic() - self.started
                if elapsed >= self.grace_s:
                    break
                cut = elapsed >= cut_time(self.grace_s)
                for s in list(self.server.sessions):
                    r = s.response
                    if r is not None and cut and r.stopped is None:
                        log.warning("drain: session %s: reply %s cut at the end of the grace period", s.sid, r.id)
                        r.stop(STOP_REASON)
                        tasks.add(asyncio.create_task(_cancel(s)))
                    elif r is None and s not in self._told:
                        self._told.add(s)
                        tasks.add(asyncio.create_task(self._tell(s)))
                tasks = {t for t in tasks if not t.done()}
                await asyncio.sleep(POLL_S)
            for s in list(self.server.sessions):  # past the grace: drop what is left
                log.warning("drain: session %s did not close in time: dropped", s.sid)
                if s.ws.transport is not None:
                    s.ws.transport.abort()
            for t in tasks:
                t.cancel()
            dt = time.monotonic() - self.started
            log.info("drained in %.2f s", dt, extra={"fields": {"event": "drain.done", "drain_s": round(dt, 3)}})
        finally:
            self.done.set()

    async def _tell(self, s) -> None:
        """``session_ending`` + close 1012; bounded, as the client may not read any more."""
        left = max(0.1, self.started + self.grace_s - time.monotonic())
        try:
            async with asyncio.timeout(left):
                await s.send_error(ProtocolError("session_ending", "this server is restarting: the session ends; "
                                                 "reconnect to continue", type="server_error"))
                await s.ws.close(CLOSE_SERVICE_RESTART, "service restart: reconnect")
        except (ConnectionClosed, TimeoutError):
            pass
        except Exception:  # noqa: BLE001 -- one session's failure must not stop the drain
            log.debug("drain: telling session %s failed", s.sid, exc_info=True)


async def _cancel(s) -> None:
    try:
        await s.client.cancel(s.sid)
    except Exception:  # noqa: BLE001 -- the reply's own watchdog ends it anyway (cancel_grace_s)
        log.debug("drain: cancel failed", exc_info=True)
