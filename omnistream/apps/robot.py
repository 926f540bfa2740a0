"""`omnistream robot`: the headless robot app -- navigate (and talk) safely, for days, without a screen.

Processes (each one can die without taking the others' safety with it):

* the **robot process**: a `RobotBridge` around the base (the simulated diff-drive robot with `--sim`),
  with the 500 ms watchdog, e-stop latch, clipping and command validation (omnistream/robot/bridge.py);
* the **agent stage**: the navigation agent (oracle | random | janus), supervised by this app: death or a
  hang is noticed within 50 ms / `agent_timeout_s`, the base is stopped at once, the stage restarted
  and the task resumed (omnistream/robot/agent_stage.py);
* **this app**: the camera reader, the navigation loop (a thread, robot_nav.py), the control socket and
  `/health` + `/status` over HTTP (robot_control.py), and the talk mode (omnistream/robot/talk.py). This
  module holds them together: start-up, the task and e-stop state they share, status, and shutdown.

Every way out stops the base first: a signal (SIGINT/SIGTERM, at any moment, start-up included: the app
exits within about 1 s), a start-up failure (one line, exit 2 for bad configuration or an address in use,
1 otherwise), a crashed loop (exit 1). A temporary run directory (no `run_dir`) and every temporary file
the app's processes make (TMPDIR points inside the run directory) are removed on each of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

import zmq

from omnistream import logs
from omnistream.apps.robot_control import ControlServer, HttpServer, StartupError
from omnistream.apps.robot_nav import Navigator, Task
from omnistream.robot.agent_stage import AgentStage, StageDown
from omnistream.robot.config import RobotConfig, add_config_args, config_from_args
from omnistream.robot.interfaces import RobotError

__all__ = ["RobotApp", "StartupError", "add_config_args", "main", "run", "run_cli"]

log = logging.getLogger("omnistream.robot")

CONFIRM_S = 1.0  # how long e-stop / resume wait for the robot to report the new state


# ---------------------------------------------------------------------------------------------- logs
def setup_logging(cfg: RobotConfig) -> None:
    """The server's log formats (omnistream.logs): ISO UTC timestamps, ``--log-json`` one object per line."""
    logs.setup_logging(json_lines=cfg.log_json, level=cfg.log_level)


# ---------------------------------------------------------------------------------------------- the app
class RobotApp:
    def __init__(self, cfg: RobotConfig, stop_event: threading.Event | None = None):
        self.cfg = cfg
        self.own_run_dir = not cfg.run_dir
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix="omnistream-robot-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.run_dir / "tmp"  # TMPDIR of the app's processes, removed with them
        self.tmp_dir.mkdir(exist_ok=True)
        self.ctx = zmq.Context()
        self.stop_event = stop_event or threading.Event()
        self.lock = threading.RLock()
        self.task: Task | None = None
        self._task_ids = 0
        self.new_task = threading.Event()
        self.estop = False  # latched by the control socket until `resume`
        self.held = False  # an e-stop stopped the task: it goes on only on `continue` or a new instruction
        self.crashed: str | None = None  # the loop that crashed (the exit status is then 1)
        self.sim = None
        self.robot = None
        self.camera = None
        self.stage: AgentStage | None = None
        self.talk = None
        self.nav = Navigator(self)
        self.control = ControlServer(self)
        self.http = HttpServer(self) if cfg.http_port >= 0 else None
        self.started = time.time()
        self.threads: list[threading.Thread] = []

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    # ------------------------------------------------------------------ lifecycle
    def _check_stop(self) -> None:
        if self.stop_event.is_set():
            raise InterruptedError("stopped during start-up")

    def start(self) -> None:
        """Bind, start the robot (process) and wait for it, start the stage, then serve. Raises StartupError
        (or ValueError: configuration) on a failure and InterruptedError when stopped meanwhile."""
        from omnistream.robot.devices import open_camera, open_robot

        cfg = self.cfg
        self.control.bind(cfg.control)  # first: a taken address fails the start before anything runs
        if self.http is not None:
            self.http.bind(cfg.http_host, cfg.http_port)
        if "talk" in cfg.modes:  # a missing audio device fails the start before the robot runs
            from omnistream.robot.talk import TalkLoop

            self.talk = TalkLoop(self)
            self.talk.open_devices()
        self._check_stop()
        cmd, obs, cam = cfg.robot_cmd, cfg.robot_obs, cfg.camera
        if cfg.sim:
            from omnistream.robot.sim_robot import SimRobotProcess

            self.sim = SimRobotProcess(self.run_dir, scene_seed=cfg.scene_seed, start_room=cfg.start_room,
                                       width=cfg.camera_width, height=cfg.camera_height, fps=cfg.camera_fps,
                                       limits=cfg.limits, watchdog_s=cfg.watchdog_s).start()
            cmd, obs, cam = self.sim.cmd_addr, self.sim.obs_addr, "zmq:" + self.sim.camera_addr
            log.info("simulated robot started (pid %d), trajectory %s", self.sim.pid, self.sim.trajectory)
        self.robot = open_robot(cmd, obs, limits=cfg.limits, ctx=self.ctx)
        self.robot.connect()
        self.camera = open_camera(cam, ctx=self.ctx)
        self.camera.connect()
        self._wait_for_robot(obs)
        self.robot.stop()
        self._start_thread(self.control.run, "control")
        if self.http is not None:
            self.http.start()
        if "navigate" in cfg.modes:
            self.stage = AgentStage(self.run_dir, cfg.agent, cfg.model, cfg.scene_seed,
                                    load_timeout_s=cfg.agent_load_timeout_s, act_timeout_s=cfg.agent_timeout_s,
                                    threads=cfg.agent_threads, log_level="WARNING", ctx=self.ctx)
            log.info("agent stage %s starting", cfg.agent)
            try:
                self.stage.start(abort=self.stop_event.is_set)
            except StageDown as e:
                raise StartupError(f"agent stage {cfg.agent} did not start: {e}") from None
            if cfg.instruction:
                self.submit(cfg.instruction, None, "config")
            self._start_thread(self.nav.run, "navigate")
        if self.talk is not None:
            self._start_thread(self.talk.run, "talk")
        self._check_stop()
        self.nav.pause_reason = None
        log.info("robot app running: modes %s, control %s, http %s", ",".join(cfg.modes), cfg.control,
                 self.http_port)

    def _wait_for_robot(self, obs_addr: str) -> None:
        """The robot process answers before anything moves; a signal or a dead --sim process ends the wait."""
        log.info("waiting for the robot at %s (up to %.0f s)", obs_addr, self.cfg.robot_timeout_s)
        sim_died = lambda: self.sim is not None and not self.sim.alive()
        try:
            self.robot.fresh_observation(timeout_s=self.cfg.robot_timeout_s,
                                         abort=lambda: self.stop_event.is_set() or sim_died())
        except RobotError:
            raise StartupError(f"the robot at {obs_addr} did not answer within {self.cfg.robot_timeout_s:g} s: "
                               "is its bridge (omnistream.robot.bridge) running there?") from None
        except InterruptedError:
            if sim_died():
                raise StartupError(f"the simulated robot exited at start-up (code {self.sim.proc.returncode})") \
                    from None
            raise

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
                self.crashed = name
                self.safe_stop()
                self.stop_event.set()
        return run

    def wait(self) -> None:
        # polls (no Event.wait in the main thread): the signal handler sets the event from this thread
        while not self.stop_event.is_set():
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Base stopped first, then everything else, each step bounded (about 1 s in all); idempotent."""
        self.stop_event.set()
        self.new_task.set()
        self.safe_stop()
        end = time.monotonic() + 0.5
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        if self.talk is not None:
            self.talk.close()
        if not any(t.name == "control" and t.is_alive() for t in self.threads):
            self.control.close()
        if self.http is not None:
            self.http.close()
        if self.robot is not None:
            with contextlib.suppress(RobotError, zmq.ZMQError):
                self.robot.disconnect()  # sends a final stop, flushed (LINGER)
        for proc in (self.stage, self.sim):  # both at once: each takes ~0.25 s to exit
            if proc is not None:
                proc.terminate()
        if self.camera is not None:
            self.camera.disconnect()
        if self.stage is not None:
            self.stage.close()
        if self.sim is not None:
            rc = self.sim.stop(timeout_s=1.0)
            log.info("simulated robot exited (%s)", rc)
        self.ctx.destroy(linger=0)  # sockets already closed keep their linger (the final stop is flushed)
        shutil.rmtree(self.run_dir if self.own_run_dir else self.tmp_dir, ignore_errors=True)

    def safe_stop(self) -> None:
        if self.robot is not None and self.robot.is_connected:
            with contextlib.suppress(RobotError, zmq.ZMQError):
                self.robot.stop()

    # ------------------------------------------------------------------ tasks and e-stop
    def submit(self, instruction: str, max_steps: int | None, source: str) -> Task:
        with self.lock:
            self._task_ids += 1
            self.task = Task(instruction, max_steps or self.cfg.max_steps, source, id=self._task_ids)
            if not self.estop:
                self.held = False  # a new explicit command after the release: it may move
            log.info("task %d from %s: %r", self.task.id, source, instruction)
            self.new_task.set()
            return self.task

    def _confirm(self, what: str, sent: float, until) -> None:
        """Wait (bounded) until the robot reports the state a command (sent at wall time `sent`) asked for,
        so that the reply shows the state after the command, not before it."""
        with contextlib.suppress(RobotError):
            self.robot.fresh_observation(timeout_s=CONFIRM_S, after=sent, until=until)
            return
        log.error("the robot did not confirm the %s within %.1f s", what, CONFIRM_S)

    def emergency_stop(self) -> None:
        with self.lock:
            self.estop = self.held = True
        log.warning("EMERGENCY STOP (control socket)")
        if self.robot is not None:
            sent = time.time()
            self.robot.emergency_stop()
            self.robot.stop()
            self._confirm("e-stop", sent, lambda o: o.get("estop") and not o.get("x.vel") and not o.get("theta.vel"))

    def resume(self) -> None:
        """Release the latch; the robot stays still (ISO 13850: a reset does not restart the machine)."""
        with self.lock:
            self.estop = False
        if self.robot is not None:
            sent = time.time()
            self.robot.resume()
            self._confirm("e-stop release", sent, lambda o: not o.get("estop"))
        log.warning("emergency stop released; %s", "the task waits for continue" if self.held else "robot still")

    def continue_task(self) -> str | None:
        """Go on with the task an e-stop held; the reason why not, or None."""
        with self.lock:
            if self.estop:
                return "the emergency stop is latched: send resume first"
            if self.robot is not None and self.robot.get_observation().get("estop"):
                return "the robot's own e-stop is latched"
            if self.task is None or self.task.state != "running":
                return "no running task to continue"
            self.held = False
            self.new_task.set()
        log.info("task %d continues", self.task.id)
        return None

    def cancel(self) -> None:
        """End the running task and stop the base (always, task or not); returns once the robot reports
        zero velocities (bounded), so the reply -- the control socket's, the `stop` tool's -- shows it still."""
        with self.lock:
            if self.task is not None and self.task.state == "running":
                self.task.state = "cancelled"
        sent = time.time()
        self.safe_stop()
        if self.robot is not None and self.robot.is_connected:
            self._confirm("stop", sent, lambda o: not o.get("x.vel") and not o.get("theta.vel"))

    # ------------------------------------------------------------------ status / health
    def status(self) -> dict:
        obs = self.robot.get_observation() if self.robot is not None else {}
        task = self.task
        lat = sorted(self.nav.latencies)
        return {
            "uptime_s": round(time.time() - self.started, 1), "modes": list(self.cfg.modes), "estop": self.estop,
            "held": self.held, "pause_reason": self.nav.pause_reason,
            "moving": bool(obs and (obs.get("x.vel") or obs.get("theta.vel"))),
            "robot": {k: obs.get(k) for k in ("x", "z", "heading", "x.vel", "theta.vel", "estop", "watchdog",
                                               "watchdog_trips", "rejected", "last_reject", "age_s", "sim_t",
                                               "room", "odometer")} if obs else None,
            "camera": self.camera.stats() if self.camera is not None else None,
            "agent_stage": self.stage.status() if self.stage is not None else None,
            "task": None if task is None else task.summary(),
            "counts": {**self.control.counts, **self.nav.counts}, "last_control_reject": self.control.last_reject,
            "camera_to_action_s": {"median": statistics.median(lat) if lat else None, "n": len(lat)},
            "trajectory_tail": self.nav.trajectory[-20:],
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


# ---------------------------------------------------------------------------------------------- entry
@contextlib.contextmanager
def _temp_inside(path: Path):
    """TMPDIR (this process's tempfile and its children's) inside `path` while the app runs."""
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]


def run(cfg: RobotConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0); start-up failures are one logged line and exit 2 (configuration,
    address in use) or 1; a crashed loop exits 1. The base is stopped on every way out."""
    stop = threading.Event()
    signalled: list[int] = []

    def on_signal(signum, _frame):  # no logging or robot I/O here: their locks may be held by this thread
        signalled.append(signum)
        stop.set()

    saved = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    app, code = None, 0
    try:
        try:
            app = RobotApp(cfg, stop)
        except OSError as e:  # the run directory cannot be made (permissions, a file in the way, ...)
            log.error("run directory %s: %s", cfg.run_dir or tempfile.gettempdir(), e)
            return 2
        with _temp_inside(app.tmp_dir):
            try:
                app.start()
                if app.http_port is not None:
                    print(json.dumps({"event": "ready", "http_port": app.http_port, "control": cfg.control,
                                      "run_dir": str(app.run_dir)}), flush=True)
                app.wait()
            except InterruptedError:
                pass  # a signal during start-up: logged below
            except StartupError as e:
                log.error("%s", e)
                code = e.code
            except ValueError as e:  # configuration problems found at start-up (audio device, agent task, ...)
                log.error("%s", e)
                code = 2
            except (RobotError, OSError, zmq.ZMQError) as e:
                log.error("start-up failed: %s: %s", type(e).__name__, e)
                code = 1
            if signalled:
                log.warning("%s: stopping the robot and exiting", signal.Signals(signalled[0]).name)
            elif app.crashed:
                log.error("the %s loop crashed: robot stopped, exiting", app.crashed)
                code = 1
    finally:
        if app is not None:
            app.shutdown()
        for s, h in saved.items():
            signal.signal(s, h)
    if code == 0:
        log.info("robot app exited cleanly")
    return code


def exit_now(code: int) -> NoReturn:
    """End the process once `run` has returned: it stopped the base, its processes and its threads, so the
    interpreter's teardown has nothing left to do for the robot, and with torch imported (the CLI imports it)
    that teardown alone takes ~0.6 s -- too long for "a signal ends the app within 1 s"."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def run_cli(args) -> NoReturn:
    """`omnistream robot` (cli.py): a configuration error raises ValueError (one line, exit 2, by the CLI);
    otherwise the process ends here with run's exit status."""
    cfg = config_from_args(args)
    setup_logging(cfg)
    exit_now(run(cfg))


def main(argv=None) -> NoReturn:
    p = argparse.ArgumentParser(prog="omnistream robot", description="Headless robot app (see omnistream robot -h).")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    setup_logging(cfg)
    exit_now(run(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
