"""The robot app's navigation loop: tasks in, agent actions out as velocity commands over time.

Discrete actions become velocity commands over time (not position deltas): MOVE_FORWARD is
`forward_speed` m/s for `forward_step_m / forward_speed` s, TURN_LEFT/RIGHT is `turn_speed` rad/s for
`turn_deg / turn_speed` s, re-sent every `command_period_s` (which also feeds the robot's watchdog) and
followed by an explicit zero. Why velocity: a position-delta command needs a controller on the robot that
the watchdog cannot interrupt mid-move, and an interrupted move (e-stop, camera lost, agent down) would
leave the robot's goal pending; velocity streaming makes "stop sending" equal "stop", which is what the
watchdog guarantees. The price is open-loop step lengths (timing jitter); the agents re-observe after
every step (the oracle re-plans from the reported pose), so the error does not accumulate.

Navigation runs only while everything it needs is fresh: a camera frame younger than `max_frame_age_s`,
an observation from the robot, a serving agent stage, no e-stop and no task held by a released e-stop;
otherwise the base is stopped and the task paused (`status.pause_reason`) until it is.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from omnistream.navigation.agents import ACTIONS
from omnistream.robot.agent_stage import StageDown

log = logging.getLogger("omnistream.robot")

HELD = "e-stop released: waiting for continue or a new instruction"


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

    def summary(self) -> dict:
        return {"id": self.id, "instruction": self.instruction, "source": self.source, "state": self.state,
                "steps": self.steps, "goal": self.goal, "target": self.target,
                "actions": "".join("SFLR"[ACTIONS.index(a)] for a in self.actions[-200:]), "error": self.error}


def pose_of(obs: dict) -> list[float]:
    """[x, y, z, heading] of a robot observation (zeros before the first one)."""
    return [float(obs.get("x", 0.0)), 0.0, float(obs.get("z", 0.0)), float(obs.get("heading", 0.0))] if obs else \
        [0.0, 0.0, 0.0, 0.0]


class Navigator:
    """The loop in its own thread; reads the app's robot, camera, stage and task, writes pauses and counts."""

    def __init__(self, app):
        self.app, self.cfg = app, app.cfg
        self.pause_reason: str | None = "starting"
        self.counts = {"steps": 0, "pauses": 0, "stage_lost": 0}
        self.latencies: list[float] = []  # frame capture -> first velocity command of the step (s)
        self.trajectory: list[list[float]] = []  # [t, x, z, heading] after each step

    def _pause(self, reason: str | None) -> None:
        if reason != self.pause_reason:
            if reason:
                self.counts["pauses"] += 1
                log.warning("navigation paused: %s (base stopped)", reason)
            else:
                log.info("navigation resumed")
            self.pause_reason = reason
        if reason:
            self.app.safe_stop()

    def blocker(self) -> str | None:
        """Why the robot may not move now (None: it may)."""
        app = self.app
        if app.estop:
            return "emergency stop"
        obs = app.robot.get_observation()
        if obs.get("estop"):  # latched on the robot's side (its own button, another client): held too
            app.held = True
            return "robot e-stop latched"
        if app.held:
            return HELD
        if app.stage is not None and not app.stage.alive():
            return "agent stage down"
        if not obs or obs.get("age_s", 1e9) > 1.0:
            return "no observation from the robot"
        if app.camera.read_latest(self.cfg.max_frame_age_s) is None:
            return "camera: no fresh frame"
        if app.talk is not None and not app.talk.stages_ready():
            return "talk stages down"
        return None

    def run(self) -> None:
        app = self.app
        reset_for: int | None = None  # the task id the agent stage was reset for
        while not app.stop_event.is_set():
            with app.lock:
                task = app.task
            if task is None or task.state != "running":
                app.new_task.wait(0.2)
                app.new_task.clear()
                self._check_stage()
                continue
            why = self.blocker()
            if why is not None:
                if why == "agent stage down":
                    self._stage_lost("died")
                    reset_for = None
                self._pause(why)
                app.stop_event.wait(0.05)
                continue
            self._pause(None)
            try:
                if reset_for != task.id:
                    obs = app.robot.get_observation()
                    r = app.stage.call({"op": "reset", "instruction": task.instruction, "pose": pose_of(obs),
                                        "task": task.id},
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
                app.safe_stop()
            except InterruptedError:
                app.safe_stop()

    def _check_stage(self) -> None:
        if self.app.stage is not None and not self.app.stage.alive():
            self._stage_lost("died while idle")

    def _stage_lost(self, reason: str) -> None:
        app = self.app
        app.safe_stop()  # first: the base must not move on a dead agent's last command
        self.counts["stage_lost"] += 1
        self._pause("agent stage down")
        while not app.stop_event.is_set():
            try:
                app.stage.restart(reason, abort=app.stop_event.is_set)
                return
            except InterruptedError:
                return  # the app is stopping
            except StageDown as e:
                log.error("agent stage restart failed: %s; retrying", e)
                app.stop_event.wait(1.0)

    def _interrupted(self, task: Task):
        app = self.app
        # a cancelled task (control `cancel`, the `stop` tool) ends its move at once, not at the step's end
        return lambda: (app.stop_event.is_set() or app.estop or app.held or app.task is not task
                        or task.state != "running")

    def _step(self, task: Task) -> None:
        app = self.app
        got = app.camera.read_latest(self.cfg.max_frame_age_s)
        if got is None:
            return
        rgb, _ = got  # (H, W, 3) uint8
        frame_wall = getattr(app.camera, "capture_wall_time", None) or time.time()
        obs = app.robot.get_observation()
        header = {"op": "act", "w": int(rgb.shape[1]), "h": int(rgb.shape[0]), "pose": pose_of(obs),
                  "step": task.steps}
        interrupted = self._interrupted(task)
        r = app.stage.call(header, rgb.tobytes(), timeout_s=self.cfg.agent_timeout_s, abort=interrupted)
        if task.state != "running":  # cancelled while the agent was thinking: its action is not carried out
            return
        action = r["action"]
        task.steps += 1
        self.counts["steps"] += 1
        task.actions.append(action)
        if action == "STOP" or task.steps >= task.max_steps:
            app.safe_stop()
            self._record_latency(frame_wall)
            task.state = "done"
            log.info("task %d done after %d steps (%s)", task.id, task.steps, action)
        else:
            self._execute(action, frame_wall, interrupted)
        obs = app.robot.get_observation()
        if obs:
            self.trajectory.append([round(time.time(), 3), obs.get("x"), obs.get("z"), obs.get("heading")])
            del self.trajectory[:-1000]

    def _record_latency(self, frame_wall: float) -> None:
        self.latencies.append(time.time() - frame_wall)
        del self.latencies[:-1000]

    def _execute(self, action: str, frame_wall: float, interrupted) -> None:
        app, cfg = self.app, self.cfg
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
                if app.robot.get_observation().get("estop"):  # latched on the robot's side mid-move: the
                    app.held = True  # rest of the move must not run after its release
                    return
                if not app.stage.alive() or (app.talk is not None and not app.talk.stages_ready()):
                    return  # a supervised stage (agent or talk) is down: stop now, not at the step's end
                if app.camera.read_latest(cfg.max_frame_age_s) is None:
                    return  # camera lost mid-move: stop; the loop pauses until it is back
                if now >= next_send:
                    app.robot.send_action({"x.vel": v, "theta.vel": w})
                    if first:
                        self._record_latency(frame_wall)
                        first = False
                    next_send += cfg.command_period_s
                time.sleep(min(0.01, max(0.0, dur - (time.monotonic() - t0))))
        finally:
            app.safe_stop()
