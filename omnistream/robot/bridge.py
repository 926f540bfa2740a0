"""The robot-process side of the ZeroMQ robot link: safety first, then whatever driver moves the base.

Any robot is attached by running a `RobotBridge` in its own process around a small `BaseDriver` (the
motor interface); the app's `omnistream.robot.zmq_robot.ZmqRobot` connects to it. The bridge owns the
safety rules, so they hold even when the app (or the machine it runs on) is gone:

* **watchdog**: no valid command for `watchdog_s` (500 ms) -> the base is stopped (a dead app, a killed
  agent stage, a cut network link all look like this);
* **emergency stop**: latched until an explicit resume; every drive command is ignored meanwhile;
* **limits**: velocities beyond the limits are clipped, and the reply says what was applied;
* **bad commands** (garbage bytes, not JSON, unknown fields, wrong types, non-finite or absurd values)
  are rejected with a logged reason and counted; the base keeps its last valid command (and its
  watchdog), so a bad command can neither move nor unstick it.

Wire (one host: ipc://, across hosts: tcp://): the bridge binds

* a ``PULL`` for commands, single-frame JSON: ``{"seq": n, "x.vel": v, "theta.vel": w}``,
  ``{"seq": n, "estop": true}`` or ``{"seq": n, "resume": true}``. Each tick drains everything queued
  and applies only the newest drive command (latest-only, like ``ZMQ_CONFLATE``), but processes every
  e-stop/resume in order: CONFLATE would let a drive command sent just after an e-stop overwrite it.
* a ``PUB`` of observations, single-frame JSON, every tick (the app's ``SUB`` keeps only the latest);
* (optionally) a ``PUB`` camera, one frame per message: ``[u32 header length][JSON header][H*W*3 RGB bytes]``,
  header ``{"seq", "t" (wall capture time), "w", "h"}`` (`pack_frame` / `unpack_frame`). The wire format lives
  here, with the rest of the link's protocol, so the app side (zmq_robot.py) and any robot process share it
  without the app importing a robot implementation.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from abc import ABC, abstractmethod

import numpy as np
import zmq

from omnistream.robot.interfaces import Limits

log = logging.getLogger("omnistream.robot.bridge")

WATCHDOG_S = 0.5
COMMAND_FIELDS = {"seq", "x.vel", "theta.vel", "estop", "resume", "t"}
MAX_COMMAND_BYTES = 4096


def pack_frame(header: dict, rgb: np.ndarray) -> bytes:
    """One camera frame (H, W, 3) uint8 as one message (the camera wire format of the module doc)."""
    h = json.dumps(header).encode()
    return struct.pack("<I", len(h)) + h + np.ascontiguousarray(rgb, np.uint8).tobytes()


def unpack_frame(buf: bytes) -> tuple[dict, np.ndarray]:
    """Inverse of pack_frame; ValueError on a malformed message."""
    if len(buf) < 4:
        raise ValueError("frame message too short")
    (n,) = struct.unpack_from("<I", buf)
    header = json.loads(bytes(buf[4:4 + n]))
    w, h = int(header["w"]), int(header["h"])
    pix = memoryview(buf)[4 + n:]
    if len(pix) != w * h * 3:
        raise ValueError(f"frame has {len(pix)} bytes, expected {w}x{h}x3")
    return header, np.frombuffer(pix, np.uint8).reshape(h, w, 3)


class BaseDriver(ABC):
    """The motors (or the simulator) behind the bridge."""

    @abstractmethod
    def apply(self, x_vel: float, theta_vel: float) -> None:
        """Set the base's target velocities (already validated and clipped)."""

    def update(self, now: float) -> None:
        """Called every tick (a simulator integrates here)."""

    @abstractmethod
    def state(self) -> dict:
        """JSON-serializable state for the observation (pose, odometry, ...)."""

    def close(self) -> None:
        pass


def parse_command(raw: bytes, limits: Limits) -> tuple[dict | None, str | None]:
    """(command, None) or (None, reason). Never raises: every byte string gets an answer."""
    if len(raw) > MAX_COMMAND_BYTES:
        return None, f"command too large ({len(raw)} bytes > {MAX_COMMAND_BYTES})"
    try:
        cmd = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return None, f"not a JSON command ({type(e).__name__}: {str(e)[:80]})"
    if not isinstance(cmd, dict):
        return None, f"a command must be a JSON object, got {type(cmd).__name__}"
    unknown = sorted(set(cmd) - COMMAND_FIELDS)
    if unknown:
        return None, f"unknown field(s) {unknown}; expected some of {sorted(COMMAND_FIELDS)}"
    seq = cmd.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None, "seq must be an integer"
    for flag in ("estop", "resume"):
        if flag in cmd and not isinstance(cmd[flag], bool):
            return None, f"{flag} must be true or false"
    if cmd.get("estop") or cmd.get("resume"):
        if "x.vel" in cmd or "theta.vel" in cmd:
            return None, "an estop/resume command carries no velocities"
        return cmd, None
    if "x.vel" not in cmd or "theta.vel" not in cmd:
        return None, "a drive command needs both x.vel and theta.vel"
    why = limits.check(cmd["x.vel"], cmd["theta.vel"])
    if why is not None:
        return None, why
    return cmd, None


class RobotBridge:
    """Command PULL + observation PUB around a driver, with the watchdog, e-stop and limits."""

    def __init__(self, driver: BaseDriver, cmd_addr: str, obs_addr: str, *, limits: Limits | None = None,
                 watchdog_s: float = WATCHDOG_S, rate_hz: float = 50.0, ctx: zmq.Context | None = None):
        self.driver, self.limits = driver, limits or Limits()
        self.watchdog_s, self.period = watchdog_s, 1.0 / rate_hz
        self.ctx = ctx or zmq.Context.instance()
        self.cmd = self.ctx.socket(zmq.PULL)
        self.cmd.setsockopt(zmq.LINGER, 0)
        self.cmd.setsockopt(zmq.RCVHWM, 1000)
        self.cmd.bind(cmd_addr)
        self.obs = self.ctx.socket(zmq.PUB)
        self.obs.setsockopt(zmq.LINGER, 0)
        self.obs.setsockopt(zmq.SNDHWM, 10)
        self.obs.bind(obs_addr)
        self.applied = (0.0, 0.0)
        self.estop = False
        self.last_cmd_t: float | None = None  # monotonic time of the last valid drive command
        self.last_seq = -1
        self.stopped_by_watchdog = False
        self.counts = {"commands": 0, "rejected": 0, "watchdog_trips": 0, "estops": 0, "clipped": 0}
        self.last_reject: str | None = None
        self._pending: tuple | None = None
        self.stop_event = threading.Event()

    # ------------------------------------------------------------------ commands
    def _reject(self, why: str) -> None:
        self.counts["rejected"] += 1
        self.last_reject = why
        log.warning("rejected command: %s", why)

    def _set(self, x_vel: float, theta_vel: float) -> None:
        self.applied = (x_vel, theta_vel)
        self.driver.apply(x_vel, theta_vel)

    def handle(self, raw: bytes, now: float) -> None:
        """One command; drive commands only stage their velocities (the tick applies the newest)."""
        cmd, why = parse_command(raw, self.limits)
        if cmd is None:
            self._reject(why)
            return
        self.counts["commands"] += 1
        self.last_seq = max(self.last_seq, cmd.get("seq", 0))
        if cmd.get("estop"):
            if not self.estop:
                log.warning("EMERGENCY STOP")
                self.counts["estops"] += 1
            self.estop = True
            self._set(0.0, 0.0)
            self._pending = None
        elif cmd.get("resume"):
            if self.estop:
                log.warning("emergency stop released")
            self.estop = False
        elif not self.estop:  # drive commands during an e-stop are dropped, not queued for the resume
            self._pending = (cmd["x.vel"], cmd["theta.vel"])
            self.last_cmd_t = now

    def _drain(self, now: float) -> None:
        while True:
            try:
                raw = self.cmd.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handle(raw, now)
        if self._pending is not None and not self.estop:
            x, w = self.limits.clip(*self._pending)
            if (x, w) != tuple(float(v) for v in self._pending):
                self.counts["clipped"] += 1
            self.stopped_by_watchdog = False
            self._set(x, w)
        self._pending = None

    # ------------------------------------------------------------------ the loop
    def tick(self, now: float) -> None:
        self._drain(now)
        moving = self.applied != (0.0, 0.0)
        if moving and (self.estop or self.last_cmd_t is None or now - self.last_cmd_t > self.watchdog_s):
            if not self.estop:
                self.counts["watchdog_trips"] += 1
                self.stopped_by_watchdog = True
                log.warning("watchdog: no command for %.0f ms: base stopped", 1000 * (now - (self.last_cmd_t or now)))
            self._set(0.0, 0.0)
        self.driver.update(now)
        self.publish(now)

    def observation(self, now: float) -> dict:
        return {"t": time.time(), "seq": self.last_seq, "x.vel": self.applied[0], "theta.vel": self.applied[1],
                "estop": self.estop, "watchdog": self.stopped_by_watchdog,
                "since_command_s": None if self.last_cmd_t is None else round(now - self.last_cmd_t, 4),
                "last_reject": self.last_reject, **self.counts, **self.driver.state()}

    def publish(self, now: float) -> None:
        try:
            self.obs.send(json.dumps(self.observation(now)).encode(), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def run(self) -> None:
        """Tick at rate_hz until `stop_event`; commands are handled as they arrive between ticks."""
        poller = zmq.Poller()
        poller.register(self.cmd, zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    self.tick(now)
                    next_tick = max(next_tick + self.period, now)
                    continue
                if poller.poll(max(0, int(1000 * (next_tick - now)))):
                    self.tick(time.monotonic())  # apply a new command at once, not at the next tick
        finally:
            self.close()

    def close(self) -> None:
        """Stop the base (always), then release the sockets."""
        try:
            self._set(0.0, 0.0)
            self.driver.update(time.monotonic())
            self.publish(time.monotonic())
        finally:
            self.driver.close()
            self.cmd.close(0)
            self.obs.close(0)
