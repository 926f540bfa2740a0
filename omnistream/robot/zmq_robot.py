"""The built-in `Robot`: a ZeroMQ link to a robot process running `omnistream.robot.bridge`.

Commands go out on a ``PUSH`` (connected to the bridge's ``PULL``; the bridge applies only the newest
drive command of each tick), observations come back on a ``SUB`` with ``ZMQ_CONFLATE`` (only the latest
is kept: an old pose is worse than none). `send_action` returns the action as the bridge will apply it
(clipped with the same limits); `get_observation` returns the latest observation and its age, so the
app can tell a silent robot process from a quiet one.

`ZmqCamera` reads a camera published by the robot process (the simulated robot's, or a real robot's
bridge) the same latest-only way. Layers point one way: this module builds on `interfaces`, `cameras`
(the reader thread) and `bridge` (the wire format); the factories that choose between implementations
live above all of them, in `devices`.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time

import zmq

from omnistream.robot.bridge import unpack_frame
from omnistream.robot.cameras import ThreadedCamera
from omnistream.robot.interfaces import Limits, Robot, RobotError

log = logging.getLogger("omnistream.robot.link")

OBS_FEATURES = {"x": float, "z": float, "heading": float, "x.vel": float, "theta.vel": float, "estop": bool,
                "watchdog": bool, "t": float}


class ZmqRobot(Robot):
    name = "zmq"

    def __init__(self, cmd_addr: str, obs_addr: str, *, limits: Limits | None = None, obs_timeout_s: float = 1.0,
                 ctx: zmq.Context | None = None):
        self.cmd_addr, self.obs_addr = cmd_addr, obs_addr
        self.limits = limits or Limits()
        self.obs_timeout_s = obs_timeout_s
        self.ctx = ctx or zmq.Context.instance()
        self._seq = itertools.count()
        self._lock = threading.Lock()  # the nav loop, the control socket and signal handlers all send
        self.cmd = self.sub = None
        self._last_obs: dict | None = None
        self._last_obs_t = 0.0
        self.last_sent: dict | None = None

    @property
    def observation_features(self) -> dict:
        return dict(OBS_FEATURES)

    @property
    def is_connected(self) -> bool:
        return self.cmd is not None

    def connect(self) -> None:
        self.cmd = self.ctx.socket(zmq.PUSH)
        self.cmd.setsockopt(zmq.LINGER, 200)  # the last stop command is flushed on disconnect
        self.cmd.setsockopt(zmq.SNDHWM, 100)
        self.cmd.connect(self.cmd_addr)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.CONFLATE, 1)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.obs_addr)

    def disconnect(self) -> None:
        if self.cmd is None:
            return
        try:
            self.stop()
        finally:
            with self._lock:
                self.cmd.close(200)
                if self.sub is not None:  # (connect may have failed before the observation socket)
                    self.sub.close(0)
                self.cmd = self.sub = None

    def _send(self, msg: dict) -> None:
        if self.cmd is None:
            raise RobotError("robot not connected")
        msg = {"seq": next(self._seq), **msg}
        with self._lock:
            try:
                self.cmd.send(json.dumps(msg).encode(), zmq.NOBLOCK)
            except zmq.Again:  # the robot process is gone or stuck: its watchdog stops the base
                log.warning("robot link full: command %s dropped", msg.get("seq"))
        self.last_sent = msg

    def send_action(self, action: dict) -> dict:
        x, w = action.get("x.vel", 0.0), action.get("theta.vel", 0.0)
        why = self.limits.check(x, w)
        if why is not None:
            raise RobotError(f"bad action: {why}")
        x, w = self.limits.clip(x, w)
        self._send({"x.vel": x, "theta.vel": w})
        return {"x.vel": x, "theta.vel": w}

    def emergency_stop(self) -> None:
        self._send({"estop": True})

    def resume(self) -> None:
        self._send({"resume": True})

    def get_observation(self, wait_s: float = 0.0) -> dict:
        """The newest observation (with `age_s`), or {} if none arrived yet; waits up to wait_s for one."""
        if self.sub is None:
            raise RobotError("robot not connected")
        with self._lock:
            if self.sub.poll(int(wait_s * 1000) if self._last_obs is None else 0):
                try:
                    self._last_obs = json.loads(self.sub.recv())
                    self._last_obs_t = time.monotonic()
                except ValueError as e:
                    log.warning("bad observation from the robot: %s", e)
        if self._last_obs is None:
            return {}
        return {**self._last_obs, "age_s": round(time.monotonic() - self._last_obs_t, 4)}

    def fresh_observation(self, timeout_s: float = 1.0, after: float | None = None, until=None,
                          abort=None) -> dict:
        """Wait for an observation published after wall time `after` (default now) for which `until(obs)`
        holds (default: any); RobotError after `timeout_s`, InterruptedError as soon as `abort()` is true."""
        after = time.time() if after is None else after
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            obs = self.get_observation()
            if obs and obs.get("t", 0) > after and (until is None or until(obs)):
                return obs
            if abort is not None and abort():
                raise InterruptedError("aborted")
            time.sleep(0.01)
        what = "no observation" if until is None else "no confirming observation"
        raise RobotError(f"{what} from the robot at {self.obs_addr} within {timeout_s:.1f} s")


class ZmqCamera(ThreadedCamera):
    """A camera published by the robot process (see bridge.pack_frame), read latest-only.

    The ``SUB`` socket keeps only the newest message (CONFLATE); the reader thread counts gaps in the
    publisher's sequence numbers as `dropped` (frames this process was too busy to take at all), which is
    what `frames_dropped_ratio` in benchmarks/robot.py measures. ZeroMQ reconnects by itself; a silent
    publisher shows as frames getting old.
    """

    def __init__(self, addr: str, ctx: zmq.Context | None = None):
        super().__init__(addr)
        self.addr = addr
        self.ctx = ctx or zmq.Context.instance()
        self.sock = None
        self.last_seq = 0
        self.first_seq = 0
        self.dropped = 0

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.CONFLATE, 1)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(self.addr)

    def _frames(self):
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            try:
                header, rgb = unpack_frame(self.sock.recv())
            except (ValueError, KeyError) as e:
                log.warning("bad camera frame: %s", e)
                continue
            seq = int(header.get("seq", 0))
            if self.last_seq and seq > self.last_seq + 1:
                self.dropped += seq - self.last_seq - 1
            self.first_seq = self.first_seq or seq
            self.last_seq = seq
            yield rgb, float(header["t"])

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def stats(self) -> dict:
        published = self.last_seq - self.first_seq + 1 if self.last_seq else 0
        return {**super().stats(), "dropped": self.dropped, "published": published,
                "dropped_ratio": round(self.dropped / published, 4) if published else None}
