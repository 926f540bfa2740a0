"""``omnistream robot`` figures on the simulated robot (MuJoCo diff-drive, tiny JanusVLN checkpoint).

    python benchmarks/robot.py --json
    python benchmarks/robot.py --json --model DIR --width 640 --height 480   # a real JanusVLN checkpoint

- ``camera_to_action_s``: median time from a camera frame's capture (the simulated robot's wall clock,
  stamped when it rendered the frame) to the first base command of the step decided on that frame: frame
  transport, the agent stage's JanusVLN step and the command send. Each instruction is one task; a random
  checkpoint says STOP at once (its text is unparseable), so every task is one step and the command is
  the stop.
- ``frames_dropped_ratio``: frames the 30 fps camera published that the app's camera reader never
  received (sequence gaps), over all published during the janus run. The reader keeps only the newest
  frame on purpose; a dropped frame here means the reader thread itself fell behind.
- ``watchdog_stop_s``: a commander process streams drive commands at 10 Hz to the robot process and is
  killed with SIGKILL while the base moves; the time until the simulator records zero velocity. The
  robot-side watchdog (500 ms) is the only thing that can stop it.
- ``agent_kill_stop_s``: kill -9 of the agent stage (oracle) while the robot drives; the time until the
  base is stopped (the app notices the dead stage and stops the base before the watchdog would).
- ``estop_reply_s``: an ``estop`` control command sent while the robot drives, until its reply, which
  reports the state after the stop (the robot confirmed the latch with zero velocities).
- ``sigterm_exit_s``: SIGTERM to the app while the robot drives, until the app process has exited (base
  stopped, stage and robot processes stopped, run directory removed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# not this script's own directory: its kernels.py would shadow the `kernels` package transformers probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _first_stop_after(traj_path: Path, t0: float, timeout_s: float = 5.0) -> float | None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for line in traj_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r["t"] >= t0 and r["x.vel"] == 0 and r["theta.vel"] == 0:
                return r["t"] - t0
        time.sleep(0.05)
    return None


def watchdog_stop(run: Path, repeats: int) -> list[float]:
    from omnistream.robot.sim_robot import SimRobotProcess

    sim = SimRobotProcess(run, width=32, height=24, fps=2).start()
    out = []
    try:
        code = ("import json,sys,time,zmq\ns=zmq.Context().socket(zmq.PUSH)\ns.connect(sys.argv[1])\ni=0\n"
                "while True:\n  s.send(json.dumps({'seq':i,'x.vel':0.0,'theta.vel':0.5}).encode()); i+=1; "
                "time.sleep(0.1)\n")
        for _ in range(repeats):
            cmd = subprocess.Popen([sys.executable, "-c", code, sim.cmd_addr])
            try:
                end = time.monotonic() + 60
                traj = Path(sim.trajectory)
                while time.monotonic() < end:  # wait until the base turns
                    lines = traj.read_text().splitlines() if traj.exists() else []
                    try:
                        if lines and json.loads(lines[-1])["theta.vel"] != 0:
                            break
                    except ValueError:  # the line being written
                        pass
                    time.sleep(0.05)
                time.sleep(0.3)
                t0 = time.time()
            finally:
                cmd.send_signal(signal.SIGKILL)
                cmd.wait()
            dt = _first_stop_after(traj, t0)
            if dt is not None:
                out.append(dt)
            time.sleep(0.2)
    finally:
        sim.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", help="JanusVLN checkpoint (default: a tiny random one)")
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=10, help="janus tasks (one step each with a random checkpoint)")
    ap.add_argument("--repeats", type=int, default=3, help="watchdog / agent kill repetitions")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="omnistream-robot-bench-"))
    try:
        res = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")
    return 0


def measure(args, tmp: Path) -> dict:
    from test_robot import App

    res: dict = {"camera_fps": args.fps, "image": f"{args.width}x{args.height}"}
    model = args.model
    if model is None:
        from omnistream.navigation.tiny import make_tiny_janus

        model = str(make_tiny_janus(tmp / "tiny-janus"))
        res["checkpoint"] = "tiny random JanusVLN"
    run = tmp / "janus"
    run.mkdir()
    common = ["--camera-width", str(args.width), "--camera-height", str(args.height), "--camera-fps", str(args.fps)]
    t_start = time.monotonic()
    a = App(run, "--agent", "janus", "--model", model, *common)
    res["app_start_s"] = round(time.monotonic() - t_start, 2)
    try:
        for i in range(args.steps):
            a.command({"type": "instruction", "text": f"go to the dining room ({i})", "max_steps": 1})
            a.wait(lambda: a.status()["task"]["state"] != "running", 300, "a janus step")
        st = a.status()
        res["camera_to_action_s"] = st["camera_to_action_s"]["median"]
        res["camera_to_action_n"] = st["camera_to_action_s"]["n"]
        cam = st["camera"]
        res["frames_dropped_ratio"] = cam.get("dropped_ratio")
        res["frames_published"] = cam.get("published")
        res["camera_fps_achieved"] = round(cam["published"] / max(st["uptime_s"], 1e-9), 2) if cam.get(
            "published") else None
    finally:
        a.close()
    res["watchdog_stop_s"] = _median(watchdog_stop(tmp / "wd", args.repeats))
    run = tmp / "oracle"
    run.mkdir()
    a = App(run, "--instruction", "go to the bedroom", *common)
    kills = []
    try:
        for _ in range(args.repeats):
            a.wait(a.moving_now, 60, "the robot to move")
            pid = a.status()["agent_stage"]["pid"]
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            dt = _first_stop_after(a.traj, t0)
            if dt is not None:
                kills.append(dt)
            a.wait(lambda p=pid: a.status()["agent_stage"]["pid"] != p and a.status()["agent_stage"]["state"] ==
                   "ready", 60, "the agent stage to come back")
        estops = []
        for _ in range(args.repeats):
            a.wait(a.moving_now, 60, "the robot to move")
            t0 = time.monotonic()
            a.command({"type": "estop"})
            estops.append(time.monotonic() - t0)
            a.command({"type": "resume"})
            a.command({"type": "continue"})
        a.wait(a.moving_now, 60, "the robot to move")
        t0 = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(30)
        res["sigterm_exit_s"] = round(time.monotonic() - t0, 3)
    finally:
        a.close()
    res["agent_kill_stop_s"] = _median(kills)
    res["estop_reply_s"] = _median(estops)
    return res


def _median(xs):
    return round(statistics.median(xs), 4) if xs else None


if __name__ == "__main__":
    raise SystemExit(main())
