"""Robot deployment: the bridge's safety rules, the config, and the app end to end on the simulated robot.

The end-to-end tests run the real thing: `python -m omnistream.apps.robot --sim` as a process, which
starts the simulated robot process (MuJoCo camera, diff-drive kinematics, the real bridge) and the agent
stage process; they talk to it over its real control socket and HTTP endpoints and read the trajectory
the simulator records at every tick (wall time, pose, applied velocities).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path

import numpy as np
import pytest
import zmq

from omnistream.robot.bridge import BaseDriver, RobotBridge, parse_command
from omnistream.robot.interfaces import Limits

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- bridge
class LogDriver(BaseDriver):
    """A driver that only remembers what it was told (the bridge's decisions are what is tested)."""

    def __init__(self):
        self.applied: list[tuple[float, float]] = []

    def apply(self, x_vel, theta_vel):
        self.applied.append((x_vel, theta_vel))

    def state(self):
        return {"n_applied": len(self.applied)}


@pytest.fixture
def bridge(tmp_path):
    ctx = zmq.Context()
    drv = LogDriver()
    b = RobotBridge(drv, f"ipc://{tmp_path}/cmd", f"ipc://{tmp_path}/obs", limits=Limits(0.5, 1.5), ctx=ctx)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"ipc://{tmp_path}/cmd")

    def send(raw: bytes | dict, now: float):
        push.send(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
        deadline = time.monotonic() + 2
        while not b.cmd.poll(10) and time.monotonic() < deadline:
            pass
        b.tick(now)

    yield b, drv, send
    push.close(0)
    b.close()
    ctx.term()


@pytest.mark.timeout(30)
def test_bridge_rejects_bad_commands_robot_unaffected(bridge):
    b, _drv, send = bridge
    send({"seq": 1, "x.vel": 0.2, "theta.vel": 0.1}, now=100.0)
    assert b.applied == (0.2, 0.1)
    bad = [
        (b"\x00\xff\xfegarbage", "not a JSON command"),
        (b"[1, 2]", "must be a JSON object"),
        ({"seq": 2, "x.vel": 0.1, "theta.vel": 0.0, "turbo": True}, "unknown field"),
        ({"seq": 3, "x.vel": 1e6, "theta.vel": 0.0}, "out of range"),
        ({"seq": 4, "x.vel": float("nan"), "theta.vel": 0.0}, "not finite"),  # json.dumps writes NaN
        ({"seq": 5, "x.vel": "fast", "theta.vel": 0.0}, "must be a number"),
        ({"seq": 6, "x.vel": 0.1}, "needs both"),
        ({"seq": 7, "estop": "yes"}, "true or false"),
        (b"{" * 5000, "too large"),
    ]
    for i, (raw, why) in enumerate(bad):
        send(raw, now=100.1 + 0.01 * i)
        assert why in b.last_reject, (raw, b.last_reject)
        assert b.applied == (0.2, 0.1), "a rejected command changed the motion"
    assert b.counts["rejected"] == len(bad)
    assert b.observation(100.2)["rejected"] == len(bad)
    # the watchdog still runs from the last *valid* command: bad ones do not feed it
    b.tick(100.0 + 0.49)
    assert b.applied == (0.2, 0.1)
    b.tick(100.0 + 0.51)
    assert b.applied == (0.0, 0.0) and b.counts["watchdog_trips"] == 1 and b.stopped_by_watchdog


@pytest.mark.timeout(30)
def test_bridge_clips_and_latches_estop(bridge):
    b, _drv, send = bridge
    send({"seq": 1, "x.vel": 0.9, "theta.vel": -4.0}, now=10.0)  # beyond the limits, within 10x: clipped
    assert b.applied == (0.5, -1.5) and b.counts["clipped"] == 1
    send({"seq": 2, "estop": True}, now=10.1)
    assert b.applied == (0.0, 0.0) and b.estop
    send({"seq": 3, "x.vel": 0.3, "theta.vel": 0.0}, now=10.2)
    assert b.applied == (0.0, 0.0), "a drive command moved the robot through a latched e-stop"
    send({"seq": 4, "resume": True}, now=10.3)
    send({"seq": 5, "x.vel": 0.3, "theta.vel": 0.0}, now=10.4)
    assert b.applied == (0.3, 0.0) and not b.estop
    # several commands queued within one tick: the newest drive command wins, the e-stop is never lost
    send({"seq": 6, "resume": True}, now=10.5)
    queued = [{"seq": 7, "x.vel": 0.1, "theta.vel": 0.0}, {"seq": 8, "estop": True},
              {"seq": 9, "x.vel": 0.4, "theta.vel": 0.0}]
    for raw in queued:
        b.handle(json.dumps(raw).encode(), 10.6)  # what _drain does with a queue of three
    assert b.estop and b._pending is None
    b.tick(10.6)
    assert b.applied == (0.0, 0.0)
    b.counts["estops"] = 0
    send({"seq": 10, "resume": True}, now=10.7)
    for raw in ({"seq": 11, "x.vel": 0.1, "theta.vel": 0.0}, {"seq": 12, "x.vel": 0.4, "theta.vel": 0.2}):
        b.handle(json.dumps(raw).encode(), 10.8)
    b.tick(10.8)
    assert b.applied == (0.4, 0.2) and b.last_seq == 12


def test_parse_command_table():
    lim = Limits(0.5, 1.5)
    assert parse_command(b'{"seq": 1, "x.vel": 0.5, "theta.vel": -1.5}', lim)[0] is not None
    assert parse_command(b'{"seq": 1, "x.vel": 5.0, "theta.vel": 0}', lim)[0] is not None  # clipped later
    assert "out of range" in parse_command(b'{"x.vel": 5.01, "theta.vel": 0}', lim)[1]
    assert "seq" in parse_command(b'{"seq": "a", "x.vel": 0, "theta.vel": 0}', lim)[1]
    assert "no velocities" in parse_command(b'{"estop": true, "x.vel": 0}', lim)[1]
    assert parse_command(b'{"x.vel": true, "theta.vel": 0}', lim)[1] == "x.vel must be a number, got bool"


# ---------------------------------------------------------------------------------------------- config
def test_config_file_and_overrides(tmp_path):
    from omnistream.robot.config import load_config

    cfg = load_config(ROOT / "robot.example.yaml")
    assert cfg.modes == ("navigate",) and cfg.sim
    p = tmp_path / "r.yaml"
    p.write_text("sim: true\nforward_speed: 0.3\nmode: navigate\n")
    cfg = load_config(p, {"forward_speed": 0.4, "turn_deg": 30})
    assert cfg.forward_speed == 0.4 and cfg.turn_deg == 30.0
    with pytest.raises(ValueError, match="unknown robot config key"):
        load_config(p, {"warp_drive": 1})
    with pytest.raises(ValueError, match="forward_speed: expected float"):
        load_config(p, {"forward_speed": "fast"})
    with pytest.raises(ValueError, match="mode must be"):
        load_config(p, {"mode": "dance"})
    with pytest.raises(ValueError, match="command_period_s must be shorter than watchdog_s"):
        load_config(p, {"command_period_s": 0.6})
    with pytest.raises(ValueError, match="oracle agent needs the simulator"):
        load_config(None, {"sim": False})


def test_cli_flags_cover_every_field():
    import dataclasses

    from omnistream.cli import build_parser
    from omnistream.robot.config import RobotConfig

    args = build_parser().parse_args(["robot", "--sim", "--mode", "navigate", "--instruction", "go to the kitchen",
                                      "--forward-speed", "0.4", "--no-log-json"])
    for f in dataclasses.fields(RobotConfig):
        assert hasattr(args, f.name), f.name
    assert args.sim is True and args.forward_speed == 0.4 and args.log_json is False


def test_goal_for_instruction_names_rooms_and_furniture():
    from omnistream.robot.agent_stage import goal_for_instruction
    from omnistream.robot.sim_robot import load_sim_scene

    scene = load_sim_scene(1)
    goal, what = goal_for_instruction(scene, "Please go to the Dining Room.")
    assert what == "dining room" and scene.room_at(goal[0], goal[2]) == "dining room"
    assert scene.is_navigable(goal[0], goal[2])
    with pytest.raises(ValueError, match="names a room"):
        goal_for_instruction(scene, "dance")


# ---------------------------------------------------------------------------------------------- end to end
class App:
    """`python -m omnistream.apps.robot --sim ...` as a process, with its control socket and HTTP port."""

    def __init__(self, run_dir: Path, *extra: str, module: str = "omnistream.apps.robot"):
        self.run_dir = run_dir
        self.ctl = f"ipc://{run_dir}/control.sock"
        self.log = open(run_dir / "app.log", "w")  # noqa: SIM115
        argv = [sys.executable, "-m", module] + (["robot"] if module == "omnistream.cli" else [])
        argv += ["--sim", "--http-port", "0", "--control", self.ctl, "--run-dir", str(run_dir), "--camera-width",
                 "64", "--camera-height", "48", "--camera-fps", "15", "--forward-speed", "0.5", "--turn-speed",
                 "1.5", "--max-frame-age-s", "0.4", "--agent-timeout-s", "120", *extra]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"robot app did not start:\n{(run_dir / 'app.log').read_text()[-3000:]}")
        self.ready = json.loads(line)
        self.ctx = zmq.Context()
        self.traj = run_dir / "trajectory.jsonl"

    def command(self, raw: bytes | dict) -> dict:
        s = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)
        s.connect(self.ctl)
        s.send(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
        reply = json.loads(s.recv())
        s.close(0)
        return reply

    def http(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ready['http_port']}{path}", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def status(self) -> dict:
        return self.http("/status")[1]

    def trajectory(self) -> list[dict]:
        out = []
        for line in self.traj.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # the line being written
                pass
        return out

    def wait(self, pred, timeout_s: float, what: str):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; status: {json.dumps(self.status())[:2000]}")

    def moving_now(self) -> bool:
        t = self.trajectory()
        return bool(t) and (t[-1]["x.vel"] != 0 or t[-1]["theta.vel"] != 0)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.ctx.term()
        self.log.close()
        return self.proc.returncode


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped by its parent yet) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc: ppid links)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = App(tmp_path_factory.mktemp("robot"))
    yield a
    a.close()


@pytest.mark.timeout(120)
def test_navigate_end_to_end_oracle(app):
    """Instruction in -> the base receives velocity commands -> the robot drives to the named room."""
    status, health = app.http("/health")
    assert status == 200 and health["status"] == "ok", health
    start = app.status()["robot"]
    assert start["room"] == "kitchen" and not app.status()["moving"]
    reply = app.command({"type": "instruction", "text": "go to the dining room"})
    assert reply["ok"], reply
    st = app.wait(lambda: (s := app.status())["task"]["state"] != "running" and s, 90, "the task to finish")
    assert st["task"]["state"] == "done" and st["task"]["target"] == "dining room", st["task"]
    assert st["robot"]["room"] == "dining room"
    goal = np.asarray(st["task"]["goal"])
    assert np.hypot(st["robot"]["x"] - goal[0], st["robot"]["z"] - goal[2]) <= 0.6  # the oracle stops within 0.5 m
    traj = app.trajectory()
    moving = [r for r in traj if r["x.vel"] != 0 or r["theta.vel"] != 0]
    # the base received the commanded velocities (the configured speeds, within the limits) ...
    assert {r["x.vel"] for r in moving} <= {0.0, 0.5} and {abs(r["theta.vel"]) for r in moving} <= {0.0, 1.5}
    assert any(r["x.vel"] == 0.5 for r in moving) and any(r["theta.vel"] != 0 for r in moving)
    # ... the recorded trajectory goes from the start to the goal, and the robot ends stopped
    assert np.hypot(traj[0]["x"] - start["x"], traj[0]["z"] - start["z"]) < 1e-6
    assert traj[-1]["x.vel"] == 0 and traj[-1]["theta.vel"] == 0
    path = sum(np.hypot(b["x"] - a["x"], b["z"] - a["z"]) for a, b in itertools.pairwise(traj))
    assert path >= np.hypot(goal[0] - start["x"], goal[2] - start["z"]) - 0.6
    assert st["camera_to_action_s"]["n"] == st["task"]["steps"]
    assert st["robot"]["watchdog_trips"] == 0  # every move ended with an explicit stop, not the watchdog


@pytest.mark.timeout(120)
def test_kill_agent_stage_during_motion(app):
    """kill -9 of the agent stage: the base stops within 500 ms, the stage comes back, motion resumes."""
    pid0 = app.status()["agent_stage"]["pid"]
    assert app.command({"type": "instruction", "text": "go to the bedroom"})["ok"]
    app.wait(app.moving_now, 30, "the robot to move")
    t_kill = time.time()
    os.kill(pid0, signal.SIGKILL)
    stopped = app.wait(lambda: next((r for r in app.trajectory() if r["t"] >= t_kill and r["x.vel"] == 0
                                     and r["theta.vel"] == 0), None), 5, "the base to stop")
    assert stopped["t"] - t_kill <= 0.5, f"base stopped {stopped['t'] - t_kill:.3f} s after the kill"
    st = app.wait(lambda: (s := app.status())["agent_stage"]["restarts"] == 1 and s["agent_stage"]["state"] ==
                  "ready" and s, 60, "the stage to come back")
    assert st["agent_stage"]["pid"] != pid0 and not _alive(pid0)
    app.wait(lambda: any(r["t"] > stopped["t"] and (r["x.vel"] or r["theta.vel"]) for r in app.trajectory()[-200:]),
             30, "motion to resume")
    assert app.command({"type": "cancel"})["ok"]


@pytest.mark.timeout(120)
def test_camera_cut_pauses_and_resumes(app):
    sim_pid = app.status()["sim"]["pid"]
    assert app.command({"type": "instruction", "text": "go to the kitchen"})["ok"]
    app.wait(app.moving_now, 30, "the robot to move")
    os.kill(sim_pid, signal.SIGUSR1)  # camera unplugged
    t_cut = time.time()
    st = app.wait(lambda: (s := app.status())["pause_reason"] == "camera: no fresh frame" and s, 10, "a pause")
    assert app.http("/health")[0] == 503
    time.sleep(1.2)
    tail = [r for r in app.trajectory() if r["t"] > t_cut + 1.0]  # frames older than 0.4 s: stopped by then
    assert tail and all(r["x.vel"] == 0 and r["theta.vel"] == 0 for r in tail), "moved without a camera"
    os.kill(sim_pid, signal.SIGUSR2)  # camera back
    app.wait(lambda: app.status()["pause_reason"] is None, 10, "navigation to resume")
    app.wait(app.moving_now, 30, "the robot to move again")
    st = app.status()
    assert st["task"]["state"] == "running" and st["counts"]["pauses"] >= 1
    assert app.command({"type": "cancel"})["ok"]


@pytest.mark.timeout(60)
def test_bad_control_commands_rejected_robot_unaffected(app):
    app.wait(lambda: not app.moving_now(), 5, "the robot to be still")
    before = app.status()
    bad = [
        (b"\x89PNG\r\n\x1a\n garbage", "JSON"),
        (b'{"type": "instruction", "text": "go to the kitchen", "speed": 9}', "unknown field"),
        (b'{"type": "self_destruct"}', "Invalid value 'self_destruct'"),
        (b'{"type": "instruction", "text": "go to the kitchen", "max_steps": 0}', ">= 1"),
        (b'{"type": "instruction", "text": ""}', "length >= 1"),
        (json.dumps({"type": "instruction", "text": "x" * 3000}).encode(), "length <= 2000"),
        (b'{"text": "go"}', "type"),
    ]
    for raw, why in bad:
        r = app.command(raw)
        assert not r["ok"] and why in r["error"], (raw, r)
    time.sleep(0.3)
    after = app.status()
    assert after["counts"]["control_rejected"] == before["counts"]["control_rejected"] + len(bad)
    assert after["task"]["id"] == before["task"]["id"]  # no task started
    assert (after["robot"]["x"], after["robot"]["z"]) == (before["robot"]["x"], before["robot"]["z"])
    assert not app.moving_now()
    log = (app.run_dir / "app.log").read_text()
    assert "control: rejected command: Object contains unknown field `speed`" in log
    # the same on the robot's own command socket: the bridge rejects, the robot stays put
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"ipc://{app.run_dir}/sim-cmd.sock")
    push.send(b"\x00garbage")
    push.send(b'{"seq": 1, "x.vel": 99, "theta.vel": 0}')
    push.close()
    app.wait(lambda: app.status()["robot"]["rejected"] >= 2, 5, "the bridge to reject")
    assert "out of range" in app.status()["robot"]["last_reject"]
    time.sleep(0.2)
    assert not app.moving_now()
    assert app.http("/health")[0] == 200


@pytest.mark.timeout(60)
def test_emergency_stop_release_does_not_restart_motion(app):
    """ISO 13850: resetting an e-stop must not restart the machine; only a new command does."""
    target = "kitchen" if app.status()["robot"]["room"] != "kitchen" else "bedroom"
    assert app.command({"type": "instruction", "text": f"go to the {target}"})["ok"]
    app.wait(app.moving_now, 30, "the robot to move")
    t0 = time.time()
    r = app.command({"type": "estop"})
    # the reply reports the state after the stop, as the robot itself reports it
    assert r["ok"] and r["status"]["estop"] and r["status"]["robot"]["estop"], r
    assert r["status"]["moving"] is False, r["status"]
    assert r["status"]["robot"]["x.vel"] == 0 and r["status"]["robot"]["theta.vel"] == 0, r["status"]["robot"]
    app.wait(lambda: not app.moving_now(), 1, "the e-stop to stop the base")
    assert any(x["t"] >= t0 and x["x.vel"] == 0 and x["theta.vel"] == 0 for x in app.trajectory())
    r = app.command({"type": "continue"})
    assert not r["ok"] and "resume first" in r["error"]
    time.sleep(0.3)
    assert not app.moving_now() and app.status()["robot"]["estop"]
    t_resume = time.time()
    r = app.command({"type": "resume"})
    assert r["ok"] and not r["status"]["estop"] and r["status"]["robot"]["estop"] is False, r
    time.sleep(1.0)  # motion restarted 47 ms after the release before the fix
    after = [x for x in app.trajectory() if x["t"] >= t_resume]
    assert after and all(x["x.vel"] == 0 and x["theta.vel"] == 0 for x in after), "the release restarted motion"
    st = app.status()
    assert st["task"]["state"] == "running" and st["held"] and "continue" in st["pause_reason"], st
    r = app.command({"type": "continue"})
    assert r["ok"] and not r["status"]["held"], r
    app.wait(app.moving_now, 30, "motion after continue")
    # the same through a new instruction: e-stop, release, then the instruction is the new command
    assert app.command({"type": "estop"})["ok"] and app.command({"type": "resume"})["ok"]
    time.sleep(0.3)
    assert not app.moving_now()
    assert app.command({"type": "instruction", "text": f"go to the {target}"})["ok"]
    app.wait(app.moving_now, 30, "motion after a new instruction")
    assert app.command({"type": "cancel"})["ok"]
    assert not app.command({"type": "continue"})["ok"]  # nothing running: nothing to continue


@pytest.mark.timeout(60)
def test_robot_side_estop_release_does_not_restart_motion(app):
    """The same rule for an e-stop latched on the robot's side (its own button, another client of the bridge)."""
    target = "kitchen" if app.status()["robot"]["room"] != "kitchen" else "bedroom"
    assert app.command({"type": "instruction", "text": f"go to the {target}"})["ok"]
    app.wait(app.moving_now, 30, "the robot to move")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"ipc://{app.run_dir}/sim-cmd.sock")
    try:
        push.send(json.dumps({"seq": 10**6, "estop": True}).encode())
        app.wait(lambda: app.status()["pause_reason"] == "robot e-stop latched", 5, "the app to see the latch")
        app.wait(lambda: not app.moving_now(), 1, "the base to stop")
        t_release = time.time()
        push.send(json.dumps({"seq": 10**6 + 1, "resume": True}).encode())
        app.wait(lambda: app.status()["robot"]["estop"] is False, 5, "the robot to release")
        time.sleep(1.0)
        after = [x for x in app.trajectory() if x["t"] >= t_release]
        assert after and all(x["x.vel"] == 0 and x["theta.vel"] == 0 for x in after), "the release restarted motion"
        assert app.status()["held"] and app.status()["task"]["state"] == "running"
        assert app.command({"type": "continue"})["ok"]
        app.wait(app.moving_now, 30, "motion after continue")
    finally:
        push.close()
    assert app.command({"type": "cancel"})["ok"]


@pytest.mark.timeout(120)
def test_sigterm_stops_base_clean_exit_no_orphans(tmp_path):
    """Through the real CLI (`omnistream robot`), with the robot moving when SIGTERM arrives."""
    a = App(tmp_path, "--instruction", "go to the dining room", "--log-json", module="omnistream.cli")
    try:
        a.wait(a.moving_now, 60, "the robot to move")
        st = a.status()
        pids = _descendants(a.proc.pid)  # the robot process, its MuJoCo renderer, the agent stage
        assert {st["sim"]["pid"], st["agent_stage"]["pid"]} <= set(pids) and len(pids) >= 3
        t0, m0 = time.time(), time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(30) == 0
        assert time.monotonic() - m0 <= 1.0, f"exited {time.monotonic() - m0:.2f} s after SIGTERM"
        assert not (tmp_path / "tmp").exists()  # the TMPDIR of the app's processes is removed with them
        traj = a.trajectory()
        assert traj[-1]["x.vel"] == 0 and traj[-1]["theta.vel"] == 0 and traj[-1]["t"] >= t0
        for pid in pids:
            a.wait(lambda p=pid: not _alive(p), 5, f"pid {pid} to exit")
        lines = [json.loads(x) for x in (tmp_path / "app.log").read_text().splitlines() if x.startswith("{")]
        assert any("SIGTERM" in x["msg"] for x in lines) and any("exited cleanly" in x["msg"] for x in lines)
    finally:
        a.close()


# ---------------------------------------------------------------------------------------------- start-up and exit
class Launch:
    """The app as a process with a private TMPDIR (what it leaves there is what it leaks) and no --run-dir:
    its run directory is a temporary one, which must be gone after every way out."""

    def __init__(self, tmp_path: Path, *args: str, module: str = "omnistream.apps.robot"):
        # short: the app's ipc:// sockets live under it and a socket path has at most 107 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="ort-", dir="/tmp"))
        weakref.finalize(self, shutil.rmtree, self.tmp, True)
        self.err_path, self.out_path = tmp_path / "stderr.log", tmp_path / "stdout.log"
        argv = [sys.executable, "-m", module] + (["robot"] if module == "omnistream.cli" else [])
        argv += ["--control", f"ipc://{tmp_path}/control.sock", *args]
        with open(self.err_path, "w") as err, open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, env={**os.environ,
                                                                                      "TMPDIR": str(self.tmp)})

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, text: str, timeout_s: float = 60) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and self.proc.poll() is None:
            if text in self.stderr or text in self.out_path.read_text():
                return
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} (exit {self.proc.poll()}):\n{self.stderr[-3000:]}")

    def wait_exit(self, timeout_s: float = 60) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.tmp.iterdir())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def launch(tmp_path):
    """Launch(tmp_path, ...) that is killed at the end of the test, whatever failed (no stray robot apps)."""
    started: list[Launch] = []

    def make(*args: str, module: str = "omnistream.apps.robot") -> Launch:
        started.append(Launch(tmp_path, *args, module=module))
        return started[-1]

    yield make
    for a in started:
        a.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_bridge() -> list[str]:
    """A real robot configured, and nothing listening there (the robot process is not running)."""
    return ["--no-sim", "--agent", "random", "--http-port", "-1", "--robot-cmd", f"tcp://127.0.0.1:{_free_port()}",
            "--robot-obs", f"tcp://127.0.0.1:{_free_port()}", "--camera", f"zmq:tcp://127.0.0.1:{_free_port()}"]


SIM = ["--sim", "--camera-width", "64", "--camera-height", "48", "--http-port", "0"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("setup,moment,sig", [
    ("no-bridge", "waiting for the robot", signal.SIGINT),  # waited 60 s, deaf to Ctrl-C, before the fix
    ("sim", "waiting for the robot", signal.SIGTERM),  # the simulated robot still loading
    ("sim", "agent stage oracle starting", signal.SIGINT),
    ("sim", "robot app running", signal.SIGTERM),
])
def test_signal_at_any_moment_exits_within_1s_and_cleans_up(launch, setup, moment, sig):
    a = launch(*(_no_bridge() if setup == "no-bridge" else SIM))
    a.wait_for(moment)
    time.sleep(0.1)
    pids = _descendants(a.proc.pid)
    t0 = time.monotonic()
    a.proc.send_signal(sig)
    rc = a.wait_exit(10)
    took = time.monotonic() - t0
    log = a.stderr
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    assert took <= 1.0, f"exited {took:.2f} s after {sig.name} ({moment})"
    assert f"{sig.name}: stopping the robot and exiting" in log
    assert a.leftovers() == [], "temporary files left behind"
    for pid in pids:
        end = time.monotonic() + 2
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.02)
        assert not _alive(pid), f"pid {pid} outlived the app"


@pytest.mark.timeout(60)
def test_robot_never_answers_one_line_error(launch):
    a = launch(*_no_bridge(), "--robot-timeout-s", "1")
    rc = a.wait_exit(30)
    lines = [x for x in a.stderr.splitlines() if " ERROR " in x]
    assert rc == 1 and "Traceback" not in a.stderr, a.stderr[-3000:]
    assert len(lines) == 1 and "did not answer within 1 s: is its bridge" in lines[0], lines
    assert a.leftovers() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["control", "http"])
def test_address_in_use_one_line_error_exit_2(launch, which):
    """A second `omnistream robot` on taken ports: exit 2 with one line, before the robot process starts."""
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    taken.setsockopt(zmq.LINGER, 0)
    port = taken.bind_to_random_port("tcp://127.0.0.1")  # as the first robot app's control socket
    if which == "control":
        a = launch(*SIM, "--control", f"tcp://127.0.0.1:{port}", module="omnistream.cli")
        want = f"control socket tcp://127.0.0.1:{port}: Address already in use (is another omnistream robot running?)"
    else:
        a = launch(*SIM[:-1], str(port))
        want = f"http 127.0.0.1:{port}: Address already in use"
    try:
        rc = a.wait_exit(30)
    finally:
        taken.close(0)
        ctx.term()
    err = a.stderr
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert want in err and len([x for x in err.splitlines() if " ERROR " in x]) == 1, err[-3000:]
    assert "simulated robot started" not in err and "robot app running" not in err
    assert a.leftovers() == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_navigate_janus_tiny_checkpoint(tmp_path):
    """The JanusVLN agent (tiny random checkpoint) in the agent stage drives the base from camera frames.

    A random checkpoint's text is unparseable, which parse_action turns into STOP: the task ends after one
    step with an explicit stop command. What is checked is the path frame -> model -> action -> base.
    """
    from omnistream.navigation.tiny import make_tiny_janus

    ckpt = make_tiny_janus(tmp_path / "janus")
    run = tmp_path / "run"
    run.mkdir()
    a = App(run, "--agent", "janus", "--model", str(ckpt), "--agent-threads", "1", "--instruction",
            "go to the dining room", "--max-steps", "3")
    try:
        st = a.wait(lambda: (s := a.status())["task"]["state"] != "running" and s, 240, "the janus task to end")
        assert st["agent_stage"]["agent"] == "janus" and st["task"]["state"] == "done"
        assert 1 <= st["task"]["steps"] <= 3 and st["camera_to_action_s"]["n"] == st["task"]["steps"]
        assert "unparseable action output" in (run / "app.log").read_text()  # the stage logs what the model said
        traj = a.trajectory()
        assert traj and traj[-1]["x.vel"] == 0 and traj[-1]["theta.vel"] == 0
        assert a.status()["robot"]["watchdog_trips"] == 0
    finally:
        assert a.close() == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_talk_mode_file_mic_to_file_speaker(tmp_path, tiny_dir):
    """Talk and navigate together: the file microphone's turn goes through the Client, the reply is spoken."""
    mic = ROOT / "omnistream" / "assets" / "hello.flac"
    out = tmp_path / "reply.wav"
    a = App(tmp_path, "--mode", "navigate,talk", "--talk-model", str(tiny_dir), "--mic", f"file:{mic}",
            "--speaker", f"file:{out}", "--voice", "Chelsie", "--talk-max-new-tokens", "4", "--talk-max-speech-s",
            "0.5", "--talk-seed", "0")  # seeded: an unseeded random Talker can end a reply before its first code
    try:
        st = a.wait(lambda: (s := a.status())["talk"]["turns"] >= 1 and s, 240, "a talk turn")
        reply = st["talk"]["replies"][-1]
        assert reply["audio_samples"] > 0
        from omnistream.encoders.media import read_audio

        pcm, rate = read_audio(out)
        assert rate == 24000 and pcm.shape[0] == reply["audio_samples"]
        assert st["talk"]["client"]["mode"] == "in-process"
        assert a.http("/health")[0] == 200
    finally:
        assert a.close() == 0


@pytest.mark.timeout(120)
def test_missing_audio_device_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "omnistream.cli", "robot", "--sim", "--mode", "talk", "--talk-model",
                        str(tmp_path), "--mic", "ReSpeaker 4 Mic Array", "--http-port", "-1", "--run-dir",
                        str(tmp_path), "--control", f"ipc://{tmp_path}/c.sock"],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert p.returncode == 2, p.stderr[-2000:]
    try:
        import sounddevice  # noqa: F401
        want = "input audio device 'ReSpeaker 4 Mic Array' not found; input devices present:"
    except OSError:  # no PortAudio library on this machine: the error names the package to install
        want = "install libportaudio2"
    assert want in p.stderr and len([x for x in p.stderr.splitlines() if "error" in x.lower()]) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "trajectory.jsonl").exists()  # failed before the robot process started
