"""The navigation agent as a supervised stage process, and the app's handle on it.

The agent (oracle, random or JanusVLN) runs in its own process so that a crash, an OOM kill or a hang in
the model never takes the app (and with it the robot's e-stop and control socket) down: the app sees the
stage die or stop answering, stops the base at once, restarts the stage and carries on (the same
death-and-hang supervision as the chat runtime's stages, `omnistream.runtime.supervisor`, for a
request/reply stage).

Wire: the stage binds a ``ROUTER``; the app's ``DEALER`` sends ``[JSON header]`` or ``[JSON header, RGB
bytes]`` and gets ``[JSON reply]`` with the same ``id``. Ops:

* ``ping`` -> ``{"pong": true, "pid"}`` (the stage is loaded and serving);
* ``reset {"instruction", "task"?}`` -> ``{"ok": true, "goal"}``: a new task (``task``: the app's task id, which
  names the episode); the oracle resolves the instruction to
  a goal in the simulated scene (a room or a piece of furniture it names);
* ``act {"w", "h", "pose": [x, y, z, heading], "step"}`` + frame -> ``{"action", "text", "step_s"}``.

Errors come back as ``{"error": "..."}``; the stage never dies of a bad request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

log = logging.getLogger("omnistream.robot.agent")


class StageDown(RuntimeError):
    """The agent stage died or did not answer in time (it is being restarted)."""


# ------------------------------------------------------------------------------------------ stage side
def goal_for_instruction(scene, text: str) -> tuple[np.ndarray, str]:
    """(goal (3,), what) for an instruction naming a room ("go to the kitchen") or a piece of furniture
    ("stop by the red sofa"); the longest name mentioned wins. ValueError names what the scene has."""
    from omnistream.robot.sim_robot import nearest_navigable

    low = " " + re.sub(r"[^a-z0-9 ]+", " ", text.lower()) + " "
    cands = [(r.name, r.center) for r in scene.rooms]
    cands += [(b.name, (b.center[0], b.center[2])) for b in scene.boxes if b.kind == "furniture"]
    for name, (x, z) in sorted(cands, key=lambda c: -len(c[0])):
        if f" {name.lower()} " in low:
            gx, gz = nearest_navigable(scene, x, z)
            return np.array([gx, 0.0, gz]), name
    rooms = ", ".join(r.name for r in scene.rooms)
    raise ValueError(f"the oracle needs an instruction that names a room ({rooms}) or a piece of furniture")


class AgentServer:
    def __init__(self, kind: str, model: str | None, scene_seed: int, seed: int = 0):
        from omnistream.navigation.runner import make_agent

        self.kind = kind
        self.agent = make_agent(kind, model, seed)
        self.scene = None
        if kind == "oracle":
            from omnistream.robot.sim_robot import load_sim_scene

            self.scene = load_sim_scene(scene_seed)
        self.episode = None

    def reset(self, instruction: str, pose, task: int | None = None) -> dict:
        from omnistream.navigation.episodes import Episode, Goal, Instruction, heading_to_quat

        goal, what = (goal_for_instruction(self.scene, instruction) if self.scene is not None
                      else (np.zeros(3), None))
        pose = pose or [0.0, 0.0, 0.0, 0.0]
        self.episode = Episode(
            # the app's task id names the episode: a seeded agent (random) acts the same for the same task,
            # also in a restarted stage; without one (an old caller), a fresh name
            episode_id=f"robot-task-{task}" if task is not None else f"robot-{time.time_ns()}", trajectory_id=0,
            scene_id=self.scene.scene_id if self.scene is not None else "robot", start_position=np.array(pose[:3]),
            start_rotation=heading_to_quat(pose[3]), geodesic_distance=0.0, goals=[Goal(goal)], reference_path=[],
            instruction=Instruction(instruction))
        self.agent.reset(self.episode)
        return {"ok": True, "goal": goal.tolist() if self.scene is not None else None, "target": what}

    def act(self, header: dict, pixels: bytes | None) -> dict:
        from omnistream.navigation.agents import Observation

        if self.episode is None:
            raise ValueError("act before reset: no instruction")
        w, h = int(header["w"]), int(header["h"])
        if pixels is None or len(pixels) != w * h * 3:
            raise ValueError(f"frame of {0 if pixels is None else len(pixels)} bytes, expected {w}x{h}x3")
        rgb = np.frombuffer(pixels, np.uint8).reshape(h, w, 3)
        pose = header["pose"]
        t0 = time.perf_counter()
        obs = Observation(rgb=rgb, step=int(header.get("step", 0)), position=np.array(pose[:3], float),
                          heading=float(pose[3]))
        action = self.agent.act(obs)
        return {"action": action, "text": getattr(self.agent, "last_text", ""),
                "step_s": round(time.perf_counter() - t0, 4), "unparseable": self.agent.unparseable}

    def handle(self, frames: list[bytes]) -> dict:
        try:
            header = json.loads(frames[0])
            op = header.get("op")
            if op == "ping":
                return {"pong": True, "pid": os.getpid()}
            if op == "reset":
                task = header.get("task")
                return self.reset(str(header.get("instruction", "")), header.get("pose"),
                                  int(task) if isinstance(task, int) else None)
            if op == "act":
                return self.act(header, frames[1] if len(frames) > 1 else None)
            raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001 - a bad request is answered, never fatal
            log.warning("request failed: %s: %s", type(e).__name__, e)
            return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Navigation agent stage (started by `omnistream robot`).")
    p.add_argument("--addr", required=True)
    p.add_argument("--agent", default="oracle", choices=["oracle", "random", "janus"])
    p.add_argument("--model")
    p.add_argument("--scene-seed", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    from omnistream.runtime.stage import die_with_parent

    die_with_parent(args.parent_pid)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s agent[%(process)d] %(levelname)s %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads and args.agent == "janus":
        import torch

        torch.set_num_threads(args.threads)
    server = AgentServer(args.agent, args.model, args.scene_seed, args.seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(args.addr)
    import signal

    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    while running[0]:
        if not sock.poll(100):
            continue
        ident, *frames = sock.recv_multipart()
        if not frames:
            continue
        reply = server.handle(frames)
        try:
            reply["id"] = json.loads(frames[0]).get("id")
        except (ValueError, AttributeError):
            pass
        sock.send_multipart([ident, json.dumps(reply).encode()])
    sock.close(0)
    ctx.term()
    return 0


# ------------------------------------------------------------------------------------------ app side
class AgentStage:
    """Spawns the agent stage, calls it, notices death (exit) and hangs (no reply in time), restarts it."""

    def __init__(self, run_dir: str | Path, agent: str = "oracle", model: str | None = None, scene_seed: int = 1,
                 seed: int = 0, *, load_timeout_s: float = 180.0, act_timeout_s: float = 60.0, threads: int = 0,
                 log_level: str = "WARNING", ctx: zmq.Context | None = None):
        self.addr = f"ipc://{Path(run_dir)}/agent.sock"
        self.argv = [sys.executable, "-m", "omnistream.robot.agent_stage", "--addr", self.addr, "--agent", agent,
                     "--scene-seed", str(scene_seed), "--seed", str(seed), "--threads", str(threads),
                     "--parent-pid", str(os.getpid()), "--log-level", log_level]
        if model:
            self.argv += ["--model", str(model)]
        self.kind = agent
        self.load_timeout_s, self.act_timeout_s = load_timeout_s, act_timeout_s
        self.ctx = ctx or zmq.Context.instance()
        self.proc: subprocess.Popen | None = None
        self.sock = None
        self._ids = itertools.count()
        self.restarts = 0
        self.state = "stopped"  # starting | ready | down | stopped
        self.history: list[tuple[float, str]] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, abort=lambda: False) -> None:
        """Spawn and wait until it answers a ping (the model is loaded); StageDown if it does not,
        InterruptedError as soon as `abort()` is true (a signal must not wait for a model to load)."""
        self._kill()
        self.proc = subprocess.Popen(self.argv)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.addr)
        self.state = "starting"
        self.call({"op": "ping"}, timeout_s=self.load_timeout_s, abort=abort)
        self.state = "ready"
        log.info("agent stage %s ready (pid %d)", self.kind, self.proc.pid)

    def restart(self, reason: str, abort=lambda: False) -> None:
        self.restarts += 1
        self.history.append((time.time(), reason))
        log.error("agent stage %s: restarting", reason)
        self.start(abort)

    def call(self, header: dict, pixels: bytes | None = None, timeout_s: float | None = None,
             abort=lambda: False) -> dict:
        """One request; StageDown if the process exits or no reply comes within timeout_s."""
        if self.sock is None:
            raise StageDown("agent stage not started")
        rid = next(self._ids)
        header = {**header, "id": rid}
        self.sock.send_multipart([json.dumps(header).encode()] + ([pixels] if pixels is not None else []))
        end = time.monotonic() + (timeout_s or self.act_timeout_s)
        while time.monotonic() < end:
            if self.sock.poll(50):
                reply = json.loads(self.sock.recv_multipart()[0])
                if reply.get("id") != rid:
                    continue  # a late reply to an abandoned request
                if "error" in reply:
                    raise ValueError(reply["error"])
                return reply
            if not self.alive():
                self.state = "down"
                raise StageDown(f"died (exit code {self.proc.returncode if self.proc else None})")
            if abort():
                raise InterruptedError("aborted")
        self.state = "down"
        self._kill()
        raise StageDown(f"no reply within {timeout_s or self.act_timeout_s:.1f} s (hung): killed")

    def _kill(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def terminate(self) -> None:
        """Ask the stage to exit (SIGTERM) without waiting: the app stops all its processes at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def close(self, timeout_s: float = 0.5) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`: the app's shutdown is bounded (it exits within 1 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        self.state = "stopped"

    def status(self) -> dict:
        return {"agent": self.kind, "pid": self.pid, "alive": self.alive(), "state": self.state,
                "restarts": self.restarts, "history": self.history[-5:]}


if __name__ == "__main__":
    raise SystemExit(main())
