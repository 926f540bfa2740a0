"""A simulated differential-drive robot: a generated scene, a MuJoCo camera, run as the robot process.

`omnistream robot --sim` (and the tests and benchmark) start this module as a separate process, exactly
where a real robot's bridge would run: it wraps `DiffDriveDriver` in a `RobotBridge` (so the watchdog,
e-stop, limits and command validation are the real ones) and publishes its camera over ZeroMQ.

* Kinematics: unicycle integration of the commanded (x.vel, theta.vel) over the wall-clock time between
  ticks (capped at 100 ms), on the scene's occupancy grid (navigation/scenes.py) with the same sliding
  along axis-aligned obstacles as the navigation simulator. `sim_t` counts simulated seconds.
* Camera: MuJoCo renders the scene from the robot's pose (1.25 m high, HFOV 79 degrees, as in the
  navigation simulator) in the navigation simulator's child renderer process (Mesa's LLVM never enters
  this process), at `fps`, on a ``PUB`` socket, one frame per message (`bridge.pack_frame`: the robot
  link's camera wire format).
* Trajectory: every tick appends ``{"t", "sim_t", "x", "z", "heading", "x.vel", "theta.vel"}`` to a JSON
  lines file when `--trajectory` is given (the tests measure stop times and motion from it).
* Fault injection: SIGUSR1 cuts the camera stream (as an unplugged camera), SIGUSR2 restores it.
  SIGTERM/SIGINT stop the base and exit 0; the process dies with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from omnistream.navigation.scenes import Scene, generate_scene, scene_id_for
from omnistream.navigation.sim import slide_move
from omnistream.robot.bridge import BaseDriver, RobotBridge, pack_frame
from omnistream.robot.interfaces import Limits

log = logging.getLogger("omnistream.robot.sim")


def wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def nearest_navigable(scene: Scene, x: float, z: float) -> tuple[float, float]:
    """The navigable cell centre closest to (x, z) (a room centre may be under a table)."""
    nav = scene.navigable()
    r, c = np.nonzero(nav)
    xs, zs = scene.cell_center(r, c)
    i = int(np.argmin((xs - x) ** 2 + (zs - z) ** 2))
    return float(xs[i]), float(zs[i])


def start_pose(scene: Scene, room: str | None = None) -> tuple[float, float, float]:
    """(x, z, heading): the navigable point nearest the centre of `room` (default: the first room)."""
    rm = next((r for r in scene.rooms if r.name == room), None) if room else scene.rooms[0]
    if rm is None:
        raise ValueError(f"no room {room!r} in {scene.scene_id}; rooms: {[r.name for r in scene.rooms]}")
    x, z = nearest_navigable(scene, *rm.center)
    return x, z, 0.0


class DiffDriveDriver(BaseDriver):
    """Unicycle kinematics on the occupancy grid; thread-safe pose for the camera thread."""

    def __init__(self, scene: Scene, pose: tuple[float, float, float], trajectory: str | None = None,
                 substep_m: float = 0.02):
        self.scene = scene
        self.x, self.z, self.heading = pose
        self.v = self.w = 0.0
        self.sim_t = 0.0
        self.odometer = 0.0  # metres driven
        self.collisions = 0
        self.substep_m = substep_m
        self._last: float | None = None
        self.lock = threading.Lock()
        self._traj = open(trajectory, "a", buffering=1, encoding="utf-8") if trajectory else None  # noqa: SIM115

    def apply(self, x_vel: float, theta_vel: float) -> None:
        self.v, self.w = x_vel, theta_vel

    def update(self, now: float) -> None:
        dt = 0.0 if self._last is None else min(max(now - self._last, 0.0), 0.1)
        self._last = now
        if dt > 0:
            with self.lock:
                self.heading = wrap(self.heading + self.w * dt)
                self._forward(self.v * dt)
            self.sim_t += dt
        if self._traj is not None:
            self._traj.write(json.dumps({"t": time.time(), "sim_t": round(self.sim_t, 4), "x": round(self.x, 4),
                                         "z": round(self.z, 4), "heading": round(self.heading, 4),
                                         "x.vel": self.v, "theta.vel": self.w}) + "\n")

    def _forward(self, dist: float) -> None:
        """Move `dist` along the heading with sliding along blocked axes (the navigation simulator's rule)."""
        if dist == 0:
            return
        n = max(1, math.ceil(abs(dist) / self.substep_m))
        dx, dz = -math.sin(self.heading) * dist / n, -math.cos(self.heading) * dist / n
        x, z, blocked = slide_move(self.scene.is_navigable, self.x, self.z, dx, dz, n)
        self.collisions += blocked
        self.odometer += math.hypot(x - self.x, z - self.z)
        self.x, self.z = x, z

    def pose(self) -> tuple[float, float, float]:
        with self.lock:
            return self.x, self.z, self.heading

    def state(self) -> dict:
        x, z, h = self.pose()
        return {"x": x, "y": 0.0, "z": z, "heading": h, "sim_t": round(self.sim_t, 4),
                "odometer": round(self.odometer, 4), "collisions": self.collisions, "room": self.scene.room_at(x, z)}

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()
            self._traj = None


class SimCamera(threading.Thread):
    """Renders the robot's view at `fps` and publishes it (latest-only on the subscriber's side)."""

    def __init__(self, driver: DiffDriveDriver, addr: str, width: int, height: int, fps: float,
                 ctx: zmq.Context):
        super().__init__(name="sim-camera", daemon=True)
        from omnistream.navigation.sim import MujocoSimulator

        self.driver, self.fps = driver, fps
        self.sim = MujocoSimulator(width=width, height=height)
        self.sim._load(driver.scene.scene_id)  # regenerated from the seed in the id, then sent to the renderer
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 2)
        self.sock.bind(addr)
        self.enabled = threading.Event()
        self.enabled.set()
        self.stop = threading.Event()
        self.seq = 0

    def render(self) -> np.ndarray:
        x, z, h = self.driver.pose()
        self.sim.set_pose(np.array([x, 0.0, z]), h)
        return self.sim._render()  # (H, W, 3) uint8

    def run(self) -> None:
        period = 1.0 / self.fps
        nxt = time.monotonic()
        while not self.stop.is_set():
            nxt += period
            if self.enabled.is_set():
                t = time.time()
                try:
                    rgb = self.render()
                except RuntimeError as e:
                    log.error("camera render failed: %s", e)
                    self.stop.wait(0.5)
                    continue
                self.seq += 1
                try:
                    self.sock.send(pack_frame({"seq": self.seq, "t": t, "w": rgb.shape[1], "h": rgb.shape[0]}, rgb),
                                   zmq.NOBLOCK)
                except zmq.Again:
                    pass
            self.stop.wait(max(0.0, nxt - time.monotonic()))
            nxt = max(nxt, time.monotonic() - period)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.sim.close()
        self.sock.close(0)


def load_sim_scene(seed: int) -> Scene:
    scene = generate_scene(seed)
    scene.scene_id = scene_id_for(seed)
    return scene


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Simulated differential-drive robot (the robot process of --sim).")
    p.add_argument("--cmd", required=True, help="command PULL address to bind")
    p.add_argument("--obs", required=True, help="observation PUB address to bind")
    p.add_argument("--camera", required=True, help="camera PUB address to bind")
    p.add_argument("--scene-seed", type=int, default=1)
    p.add_argument("--start-room", help="room to start in (default: the first)")
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--trajectory", help="append the pose at every tick to this JSON lines file")
    p.add_argument("--watchdog-s", type=float, default=0.5)
    p.add_argument("--max-x-vel", type=float, default=0.5)
    p.add_argument("--max-theta-vel", type=float, default=1.5)
    p.add_argument("--rate-hz", type=float, default=50.0)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    from omnistream.runtime.stage import die_with_parent

    die_with_parent(args.parent_pid)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s sim-robot[%(process)d] %(levelname)s %(message)s")
    scene = load_sim_scene(args.scene_seed)
    driver = DiffDriveDriver(scene, start_pose(scene, args.start_room), args.trajectory)
    ctx = zmq.Context()
    bridge = RobotBridge(driver, args.cmd, args.obs, limits=Limits(args.max_x_vel, args.max_theta_vel),
                         watchdog_s=args.watchdog_s, rate_hz=args.rate_hz, ctx=ctx)
    camera = SimCamera(driver, args.camera, args.width, args.height, args.fps, ctx)
    signal.signal(signal.SIGTERM, lambda *_: bridge.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: bridge.stop_event.set())
    signal.signal(signal.SIGUSR1, lambda *_: camera.enabled.clear())
    signal.signal(signal.SIGUSR2, lambda *_: camera.enabled.set())
    camera.start()
    try:
        bridge.run()  # stops the base and closes the bridge on the way out
    finally:
        camera.close()
        ctx.term()
    return 0


class SimRobotProcess:
    """Starts and stops the simulated robot process (a fresh interpreter; it dies with its parent)."""

    def __init__(self, run_dir: str | Path, *, scene_seed: int = 1, start_room: str | None = None, width: int = 160,
                 height: int = 120, fps: float = 10.0, limits: Limits | None = None, watchdog_s: float = 0.5,
                 trajectory: str | Path | None = None, log_level: str = "WARNING"):
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        self.cmd_addr, self.obs_addr, self.camera_addr = (f"ipc://{run}/sim-{n}.sock" for n in ("cmd", "obs", "cam"))
        self.trajectory = str(trajectory) if trajectory else str(run / "trajectory.jsonl")
        lim = limits or Limits()
        self.argv = [sys.executable, "-m", "omnistream.robot.sim_robot", "--cmd", self.cmd_addr, "--obs", self.obs_addr,
                     "--camera", self.camera_addr, "--scene-seed", str(scene_seed), "--width", str(width),
                     "--height", str(height), "--fps", str(fps), "--trajectory", self.trajectory,
                     "--watchdog-s", str(watchdog_s), "--max-x-vel", str(lim.max_x_vel),
                     "--max-theta-vel", str(lim.max_theta_vel), "--parent-pid", str(os.getpid()),
                     "--log-level", log_level]
        if start_room:
            self.argv += ["--start-room", start_room]
        self.proc: subprocess.Popen | None = None

    def start(self) -> SimRobotProcess:
        self.proc = subprocess.Popen(self.argv)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM without waiting (the process stops its base, then exits); `stop` waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
