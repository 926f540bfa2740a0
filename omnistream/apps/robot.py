"""`omnistream robot`: the headless robot app -- navigate (and talk) safely, for days, without a screen.

Processes (each one can die without taking the others' safety with it):

* the **robot process**: a `RobotBridge` around the base (the simulated diff-drive robot with `--sim`),
  with the 500 ms watchdog, e-stop latch, clipping and command validation (omnistream/robot/bridge.py);
* the **agent stage**: the navigation agent (oracle | random | janus), supervised by this app: death or a
  hang is noticed within 50 ms / `agent_timeout_s`, the base is stopped at once, the stage restarted
  and the task resumed (omnistream/robot/agent_stage.py);
* **this app**: the camera reader, the navigation loop (a thread), the control socket (ZeroMQ ROUTER,
  JSON commands validated by msgspec), `/health` and `/status` over HTTP, and the talk mode.

Discrete actions become velocity commands over time (not position deltas): MOVE_FORWARD is
`forward_speed` m/s for `forward_step_m / forward_speed` s, TURN_LEFT/RIGHT is `turn_speed` rad/s for
`turn_deg / turn_speed` s, re-sent every `command_period_s` (which also feeds the robot's watchdog) and
followed by an explicit zero. Why velocity: a position-delta command needs a controller on the robot that
the watchdog cannot interrupt mid-move, and an interrupted move (e-stop, camera lost, agent down) would
leave the robot's goal pending; velocity streaming makes "stop sending" equal "stop", which is what the
watchdog guarantees. The price is open-loop step lengths (timing jitter); the agents re-observe after
every step (the oracle re-plans from the reported pose), so the error does not accumulate.

Navigation runs only while everything it needs is fresh: a camera frame younger than `max_frame_age_s`,
an observation from the robot, a serving agent stage and no e-stop; otherwise the base is stopped and
the task paused (`status.pause_reason`) until it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated

import msgspec
import zmq

from omnistream.navigation.agents import ACTIONS
from omnistream.robot.agent_stage import AgentStage, StageDown
from omnistream.robot.config import RobotConfig, add_config_args, config_from_args
from omnistream.robot.interfaces import RobotError

log = logging.getLogger("omnistream.robot")

# ---------------------------------------------------------------------------------------------- logs
class JsonFormatter(logging.Formatter):
    """One JSON object per line: t, level, logger, msg (+ exc) -- for journald / log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"t": round(record.created, 3), "level": record.levelname, "logger": record.name,
             "msg": record.getMessage(), "pid": record.process}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def setup_logging(cfg: RobotConfig) -> None:
    h = logging.StreamHandler()
    h.setFormatter(JsonFormatter() if cfg.log_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                                                          "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(cfg.log_level.upper())


# ---------------------------------------------------------------------------------------------- control
class _Cmd(msgspec.Struct, forbid_unknown_fields=True, tag_field="type"):
    pass


class InstructionCmd(_Cmd, tag="instruction"):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    max_steps: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


class EStopCmd(_Cmd, tag="estop"):
    pass


class ResumeCmd(_Cmd, tag="resume"):
    pass


class CancelCmd(_Cmd, tag="cancel"):
    pass


class StatusCmd(_Cmd, tag="status"):
    pass


CONTROL_DECODER = msgspec.json.Decoder(InstructionCmd | EStopCmd | ResumeCmd | CancelCmd | StatusCmd)


# ---------------------------------------------------------------------------------------------- the app
@dataclass
class Task:
    instruction: str
    max_steps: int
    source: str  # config | control | voice
    id: int = 0
    steps: int = 0
    state: str = "running"  # running | done | failed | cancelled
    goal: list | None = None
    target: str | None = None
    actions: list = field(default_factory=list)
    error: str | None = None


class RobotApp:
    def __init__(self, cfg: RobotConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="omnistream-robot-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = zmq.Context()
        self.stop_event = threading.Event()
        self.lock = threading.RLock()
        self.task: Task | None = None
        self._task_ids = 0
        self.new_task = threading.Event()
        self.estop = False
        self.pause_reason: str | None = "starting"
        self.sim = None
        self.robot = None
        self.camera = None
        self.stage: AgentStage | None = None
        self.talk = None
        self.counts = {"control_rejected": 0, "control_ok": 0, "steps": 0, "pauses": 0, "stage_lost": 0}
        self.last_reject: str | None = None
        self.latencies: list[float] = []  # frame capture -> first velocity command of the step (s)
        self.trajectory: list[list[float]] = []  # [t, x, z, heading] after each step
        self.started = time.time()
        self.threads: list[threading.Thread] = []
        self.http = None
        self.http_port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from omnistream.robot.zmq_robot import ZmqCamera, ZmqRobot

        cfg = self.cfg
        if "talk" in cfg.modes:  # first: a missing audio device fails the start before anything runs
            from omnistream.robot.talk import TalkLoop

            self.talk = TalkLoop(self)
            self.talk.open_devices()
        cmd, obs, cam = cfg.robot_cmd, cfg.robot_obs, cfg.camera
        if cfg.sim:
            from omnistream.robot.sim_robot import SimRobotProcess

            self.sim = SimRobotProcess(self.run_dir, scene_seed=cfg.scene_seed, start_room=cfg.start_room,
                                       width=cfg.camera_width, height=cfg.camera_height, fps=cfg.camera_fps,
                                       limits=cfg.limits, watchdog_s=cfg.watchdog_s).start()
            cmd, obs, cam = self.sim.cmd_addr, self.sim.obs_addr, "zmq:" + self.sim.camera_addr
            log.info("simulated robot started (pid %d), trajectory %s", self.sim.pid, self.sim.trajectory)
        self.robot = ZmqRobot(cmd, obs, limits=cfg.limits, ctx=self.ctx)
        self.robot.connect()
        if cam.startswith("zmq:"):
            self.camera = ZmqCamera(cam[4:], ctx=self.ctx)
        else:
            from omnistream.robot.cameras import open_camera

            self.camera = open_camera(cam)
        self.camera.connect()
        self.robot.fresh_observation(timeout_s=60.0)  # the robot process answers before anything moves
        self.robot.stop()
        self._start_thread(self._control_loop, "control")
        if cfg.http_port >= 0:
            self._start_http()
        if "navigate" in cfg.modes:
            self.stage = AgentStage(self.run_dir, cfg.agent, cfg.model, cfg.scene_seed,
                                    load_timeout_s=cfg.agent_load_timeout_s, act_timeout_s=cfg.agent_timeout_s,
                                    threads=cfg.agent_threads, log_level="WARNING", ctx=self.ctx)
            self.stage.start()
            if cfg.instruction:
                self.submit(cfg.instruction, None, "config")
            self._start_thread(self._nav_loop, "navigate")
        if self.talk is not None:
            self._start_thread(self.talk.run, "talk")
        self.pause_reason = None
        log.info("robot app running: modes %s, control %s, http %s", ",".join(cfg.modes), cfg.control,
                 self.http_port)

    def _start_thread(self, fn, name: str) -> None:
        t = threading.Thread(target=self._guarded(fn, name), name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _guarded(self, fn, name):
        def run():
            try:
                fn()
            except Exception:  # a crashed loop must not leave the base moving
                log.exception("%s loop crashed: stopping the robot", name)
                self.safe_stop()
                self.stop_event.set()
        return run

    def wait(self) -> None:
        while not self.stop_event.wait(0.2):
            pass

    def shutdown(self) -> None:
        """Base stopped first, then everything else; idempotent."""
        self.stop_event.set()
        self.new_task.set()
        self.safe_stop()
        for t in self.threads:
            t.join(5)
        if self.talk is not None:
            self.talk.close()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.stage is not None:
            self.stage.close()
        if self.robot is not None:
            with contextlib.suppress(RobotError):
                self.robot.disconnect()  # sends a final stop, flushed (LINGER)
        if self.camera is not None:
            self.camera.disconnect()
        if self.sim is not None:
            rc = self.sim.stop()
            log.info("simulated robot exited (%s)", rc)
        self.ctx.term()

    def safe_stop(self) -> None:
        if self.robot is not None and self.robot.is_connected:
            with contextlib.suppress(RobotError, zmq.ZMQError):
                self.robot.stop()

    # ------------------------------------------------------------------ tasks
    def submit(self, instruction: str, max_steps: int | None, source: str) -> Task:
        with self.lock:
            self._task_ids += 1
            self.task = Task(instruction, max_steps or self.cfg.max_steps, source, id=self._task_ids)
            log.info("task %d from %s: %r", self.task.id, source, instruction)
            self.new_task.set()
            return self.task

    def _pause(self, reason: str | None) -> None:
        if reason != self.pause_reason:
            if reason:
                self.counts["pauses"] += 1
                log.warning("navigation paused: %s (base stopped)", reason)
            else:
                log.info("navigation resumed")
            self.pause_reason = reason
        if reason:
            self.safe_stop()

    def _blocker(self) -> str | None:
        """Why the robot may not move now (None: it may)."""
        if self.estop:
            return "emergency stop"
        if self.stage is not None and not self.stage.alive():
            return "agent stage down"
        obs = self.robot.get_observation()
        if not obs or obs.get("age_s", 1e9) > 1.0:
            return "no observation from the robot"
        if obs.get("estop"):
            return "robot e-stop latched"
        if self.camera.read_latest(self.cfg.max_frame_age_s) is None:
            return "camera: no fresh frame"
        if self.talk is not None and not self.talk.stages_ready():
            return "talk stages down"
        return None

    # ------------------------------------------------------------------ navigation
    def _nav_loop(self) -> None:
        reset_for: int | None = None  # the task id the agent stage was reset for
        while not self.stop_event.is_set():
            with self.lock:
                task = self.task
            if task is None or task.state != "running":
                self.new_task.wait(0.2)
                self.new_task.clear()
                self._check_stage()
                continue
            why = self._blocker()
            if why is not None:
                if why == "agent stage down":
                    self._stage_lost("died")
                    reset_for = None
                self._pause(why)
                self.stop_event.wait(0.05)
                continue
            self._pause(None)
            try:
                if reset_for != task.id:
                    obs = self.robot.get_observation()
                    r = self.stage.call({"op": "reset", "instruction": task.instruction, "pose": _pose(obs)},
                                        timeout_s=self.cfg.agent_timeout_s)
                    task.goal, task.target, reset_for = r.get("goal"), r.get("target"), task.id
                self._step(task)
            except StageDown as e:
                self._stage_lost(str(e))
                reset_for = None  # the new stage needs the task again (its memory starts over)
            except ValueError as e:  # the agent cannot take this task (e.g. no such room)
                log.error("task %d failed: %s", task.id, e)
                task.state = "failed"
                task.error = str(e)
                self.safe_stop()
            except InterruptedError:
                self.safe_stop()

    def _check_stage(self) -> None:
        if self.stage is not None and not self.stage.alive():
            self._stage_lost("died while idle")

    def _stage_lost(self, reason: str) -> None:
        self.safe_stop()  # first: the base must not move on a dead agent's last command
        self.counts["stage_lost"] += 1
        self._pause("agent stage down")
        while not self.stop_event.is_set():
            try:
                self.stage.restart(reason)
                return
            except StageDown as e:
                log.error("agent stage restart failed: %s; retrying", e)
                self.stop_event.wait(1.0)

    def _step(self, task: Task) -> None:
        got = self.camera.read_latest(self.cfg.max_frame_age_s)
        if got is None:
            return
        rgb, _ = got
        frame_wall = getattr(self.camera, "capture_wall_time", None) or time.time()
        obs = self.robot.get_observation()
        header = {"op": "act", "w": int(rgb.shape[1]), "h": int(rgb.shape[0]), "pose": _pose(obs),
                  "step": task.steps}
        interrupted = lambda: self.stop_event.is_set() or self.estop or self.task is not task
        r = self.stage.call(header, rgb.tobytes(), timeout_s=self.cfg.agent_timeout_s, abort=interrupted)
        action = r["action"]
        task.steps += 1
        self.counts["steps"] += 1
        task.actions.append(action)
        if action == "STOP" or task.steps >= task.max_steps:
            self.safe_stop()
            self._record_latency(frame_wall)
            task.state = "done"
            log.info("task %d done after %d steps (%s)", task.id, task.steps, action)
        else:
            self._execute(action, frame_wall, interrupted)
        obs = self.robot.get_observation()
        if obs:
            self.trajectory.append([round(time.time(), 3), obs.get("x"), obs.get("z"), obs.get("heading")])

    def _record_latency(self, frame_wall: float) -> None:
        self.latencies.append(time.time() - frame_wall)
        del self.latencies[:-1000]

    def _execute(self, action: str, frame_wall: float, interrupted) -> None:
        cfg = self.cfg
        if action == "MOVE_FORWARD":
            v, w, dur = cfg.forward_speed, 0.0, cfg.forward_step_m / cfg.forward_speed
        else:
            sign = 1.0 if action == "TURN_LEFT" else -1.0
            v, w, dur = 0.0, sign * cfg.turn_speed, math.radians(cfg.turn_deg) / cfg.turn_speed
        t0 = time.monotonic()
        next_send = t0
        first = True
        try:
            while (now := time.monotonic()) - t0 < dur:
                if interrupted():
                    return
                if not self.stage.alive() or (self.talk is not None and not self.talk.stages_ready()):
                    return  # a supervised stage (agent or talk) is down: stop now, not at the step's end
                if self.camera.read_latest(cfg.max_frame_age_s) is None:
                    return  # camera lost mid-move: stop; the loop pauses until it is back
                if now >= next_send:
                    self.robot.send_action({"x.vel": v, "theta.vel": w})
                    if first:
                        self._record_latency(frame_wall)
                        first = False
                    next_send += cfg.command_period_s
                time.sleep(min(0.01, max(0.0, dur - (time.monotonic() - t0))))
        finally:
            self.safe_stop()

    # ------------------------------------------------------------------ control socket
    def _control_loop(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.cfg.control)
        try:
            while not self.stop_event.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                ident, rest = frames[0], frames[1:]
                envelope = [b""] if rest and rest[0] == b"" else []  # a REQ client's delimiter
                body = rest[len(envelope):]
                reply = self.handle_control(body[0] if len(body) == 1 else None, len(body))
                sock.send_multipart([ident, *envelope, json.dumps(reply).encode()])
        finally:
            sock.close(0)

    def handle_control(self, raw: bytes | None, nparts: int = 1) -> dict:
        """One control message -> reply; bad ones are rejected with a logged reason, nothing else happens."""
        if raw is None:
            return self._reject(f"expected one message frame, got {nparts}")
        try:
            cmd = CONTROL_DECODER.decode(raw)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            return self._reject(str(e))
        self.counts["control_ok"] += 1
        if isinstance(cmd, InstructionCmd):
            if "navigate" not in self.cfg.modes:
                return self._reject("navigate mode is off")
            t = self.submit(cmd.text, cmd.max_steps, "control")
            return {"ok": True, "task": t.id}
        if isinstance(cmd, EStopCmd):
            self.emergency_stop()
        elif isinstance(cmd, ResumeCmd):
            self.resume()
        elif isinstance(cmd, CancelCmd):
            with self.lock:
                if self.task is not None and self.task.state == "running":
                    self.task.state = "cancelled"
            self.safe_stop()
        return {"ok": True, "status": self.status()}

    def _reject(self, why: str) -> dict:
        self.counts["control_rejected"] += 1
        self.last_reject = why
        log.warning("control: rejected command: %s", why)
        return {"ok": False, "error": why}

    def emergency_stop(self) -> None:
        self.estop = True
        log.warning("EMERGENCY STOP (control socket)")
        if self.robot is not None:
            self.robot.emergency_stop()
            self.robot.stop()

    def resume(self) -> None:
        self.estop = False
        if self.robot is not None:
            self.robot.resume()
        log.warning("emergency stop released")

    # ------------------------------------------------------------------ status / http
    def status(self) -> dict:
        obs = self.robot.get_observation() if self.robot is not None else {}
        task = self.task
        lat = sorted(self.latencies)
        return {
            "uptime_s": round(time.time() - self.started, 1), "modes": list(self.cfg.modes), "estop": self.estop,
            "pause_reason": self.pause_reason, "moving": bool(obs and (obs.get("x.vel") or obs.get("theta.vel"))),
            "robot": {k: obs.get(k) for k in ("x", "z", "heading", "x.vel", "theta.vel", "estop", "watchdog",
                                               "watchdog_trips", "rejected", "last_reject", "age_s", "sim_t",
                                               "room", "odometer")} if obs else None,
            "camera": self.camera.stats() if self.camera is not None else None,
            "agent_stage": self.stage.status() if self.stage is not None else None,
            "task": None if task is None else {
                "id": task.id, "instruction": task.instruction, "source": task.source, "state": task.state,
                "steps": task.steps, "goal": task.goal, "target": task.target, "actions": "".join("SFLR"[ACTIONS.index(a)] for a in task.actions[-200:]),
                "error": task.error},
            "counts": dict(self.counts), "last_control_reject": self.last_reject,
            "camera_to_action_s": {"median": statistics.median(lat) if lat else None, "n": len(lat)},
            "trajectory_tail": self.trajectory[-20:],
            "sim": {"pid": self.sim.pid, "trajectory": self.sim.trajectory} if self.sim is not None else None,
            "talk": self.talk.status() if self.talk is not None else None,
        }

    def health(self) -> tuple[bool, dict]:
        problems = []
        obs = self.robot.get_observation() if self.robot is not None else {}
        if not obs or obs.get("age_s", 1e9) > 1.0:
            problems.append("robot silent")
        if self.stage is not None and self.stage.state != "ready":
            problems.append(f"agent stage {self.stage.state}")
        if self.camera is not None and self.camera.read_latest(self.cfg.max_frame_age_s) is None:
            problems.append("camera: no fresh frame")
        return not problems, {"status": "ok" if not problems else "degraded", "problems": problems,
                              "estop": self.estop}

    def _start_http(self) -> None:
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/health":
                    ok, body = app.health()
                    self._send(200 if ok else 503, body)
                elif self.path == "/status":
                    self._send(200, app.status())
                else:
                    self._send(404, {"error": f"no such endpoint {self.path}; try /health or /status"})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):  # access logs at debug level, not on stderr
                log.debug("http: " + a[0], *a[1:])

        self.http = ThreadingHTTPServer((self.cfg.http_host, self.cfg.http_port), Handler)
        self.http.daemon_threads = True
        self.http_port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, name="http", daemon=True).start()


def _pose(obs: dict) -> list[float]:
    return [float(obs.get("x", 0.0)), 0.0, float(obs.get("z", 0.0)), float(obs.get("heading", 0.0))] if obs else \
        [0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------- entry
def run(cfg: RobotConfig) -> int:
    """Run until SIGTERM/SIGINT; the base is stopped on every way out."""
    app = RobotApp(cfg)

    def on_signal(signum, _frame):
        log.warning("%s: stopping the robot and exiting", signal.Signals(signum).name)
        app.safe_stop()
        app.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app.start()
        if app.http_port is not None:
            print(json.dumps({"event": "ready", "http_port": app.http_port, "control": cfg.control,
                              "run_dir": str(app.run_dir)}), flush=True)
        app.wait()
    finally:
        app.shutdown()
    log.info("robot app exited cleanly")
    return 0


def run_cli(args) -> int:
    cfg = config_from_args(args)
    setup_logging(cfg)
    return run(cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="omnistream robot", description="Headless robot app (see omnistream robot -h).")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    setup_logging(cfg)
    try:
        return run(cfg)
    except ValueError as e:  # configuration problems found at start-up (audio device, agent task, ...)
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
