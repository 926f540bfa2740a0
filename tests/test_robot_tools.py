"""The robot's agent interface as tools: a talk-mode conversation calls navigate / stop / status.

The real app (`RobotApp`, in this process so the test can hold typed turns with `TalkLoop.say`) on the
simulated robot, the random agent in its stage process and the tiny random Thinker-Talker checkpoint in
process. With `tool_choice` forcing a tool, the grammar makes even random weights write a valid call; the
app carries it out through the control socket's command path. The simulator's trajectory (every tick:
wall time, pose, applied velocities) is the independent record of what the base did.
"""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from omnistream.engine.tools import ToolCall

pytestmark = pytest.mark.slow


def _trajectory(run_dir) -> list[dict]:
    out = []
    for line in (run_dir / "trajectory.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # the line being written
            pass
    return out


def _wait(pred, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if v := pred():
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def robot(tmp_path_factory, tiny_dir):
    from omnistream.apps.robot import RobotApp
    from omnistream.robot.config import load_config

    run = tmp_path_factory.mktemp("robot-tools")
    cfg = load_config(None, {
        "sim": True, "mode": "navigate,talk", "agent": "random", "run_dir": str(run), "http_port": -1,
        "control": f"ipc://{run}/control.sock", "camera_width": 64, "camera_height": 48, "camera_fps": 15.0,
        "forward_speed": 0.5, "turn_speed": 1.5, "max_frame_age_s": 0.4, "agent_timeout_s": 120.0,
        "talk_model": str(tiny_dir), "speaker": f"file:{run / 'reply.wav'}", "voice": "Chelsie",
        "talk_max_new_tokens": 6, "talk_max_speech_s": 0.5, "talk_seed": 0})
    app = RobotApp(cfg)
    try:
        app.start()
        yield app
    finally:
        app.shutdown()
    assert app.crashed is None


@pytest.mark.timeout(300)
def test_forced_navigate_call_moves_robot_then_stop_and_status(robot):
    from omnistream.robot.tools import robot_tools

    app, schema = robot, {t["name"]: t["parameters"] for t in robot_tools()}
    t0 = time.time()
    rec = app.talk.say("Please drive around the house.", tool_choice="navigate")
    (call,) = [c for c in rec["calls"] if c["name"] == "navigate"]
    args = json.loads(call["arguments"])
    jsonschema.validate(args, schema["navigate"])  # the grammar made random weights write a valid call
    out = json.loads(call["output"])
    assert out["ok"] and out["instruction"] == args["instruction"]
    task = app.task
    assert task.id == out["task"] and task.source == "voice" and task.instruction == args["instruction"]
    assert rec["audio_samples"] > 0  # the model answered after the tool's output, spoken
    _wait(lambda: any(r["t"] > t0 and (r["x.vel"] or r["theta.vel"]) for r in _trajectory(app.run_dir)), 60,
          "the base to move")

    rec = app.talk.say("Stop!", tool_choice="stop")
    (call,) = rec["calls"][:1]
    out = json.loads(call["output"])
    assert call["name"] == "stop" and out["ok"] and out["stopped"] and not out["moving"]
    assert app.task.state == "cancelled"
    t_after = time.time()
    time.sleep(1.0)  # a cancelled task must not move the base again (the watchdog would allow 0.5 s of it)
    later = [r for r in _trajectory(app.run_dir) if r["t"] >= t_after]
    assert later and all(r["x.vel"] == 0 and r["theta.vel"] == 0 for r in later)

    rec = app.talk.say("How are you doing?", tool_choice="status")
    out = json.loads(rec["calls"][0]["output"])
    st = app.status()
    assert rec["calls"][0]["name"] == "status" and out["ok"] and out["estop"] is False and out["moving"] is False
    assert out["task"]["id"] == task.id and out["task"]["state"] == "cancelled"
    assert out["position"]["x"] == pytest.approx(st["robot"]["x"], abs=1e-3)
    assert out["position"]["z"] == pytest.approx(st["robot"]["z"], abs=1e-3)


@pytest.mark.timeout(120)
def test_stop_tool_ends_the_move_at_once(robot):
    """`stop` mid-move: no velocity reaches the base after the call returns (the move is not finished)."""
    app = robot
    t0 = time.time()
    out = json.loads(app.talk.tools.execute(ToolCall("navigate", '{"instruction": "explore the house"}')))
    assert out["ok"] and app.task.source == "voice"
    _wait(lambda: any(r["t"] > t0 and r["x.vel"] for r in _trajectory(app.run_dir)), 60, "a forward move")
    out = json.loads(app.talk.tools.execute(ToolCall("stop", "{}")))
    t_stop = time.time()
    assert out["ok"] and out["stopped"] and out["moving"] is False and out["task"]["state"] == "cancelled"
    time.sleep(0.8)  # longer than a forward move (0.25 m at 0.5 m/s)
    late = [r for r in _trajectory(app.run_dir) if r["t"] > t_stop + 0.05]
    assert late and not any(r["x.vel"] or r["theta.vel"] for r in late), "the base moved after stop()"


@pytest.mark.timeout(300)
def test_tools_never_release_an_estop(robot):
    """A navigate call under a latched e-stop records the task but nothing moves; the latch stays."""
    app = robot
    app.emergency_stop()
    try:
        t0 = time.time()
        out = json.loads(app.talk.tools.execute(ToolCall("navigate", '{"instruction": "go to the kitchen"}')))
        assert out["ok"] and "emergency stop" in out["note"]
        out = json.loads(app.talk.tools.execute(ToolCall("stop", "{}")))
        assert out["ok"] and out["estop"] is True and app.estop
        time.sleep(1.0)
        assert app.estop and not any(r["x.vel"] or r["theta.vel"] for r in _trajectory(app.run_dir) if r["t"] >= t0)
        bad = [ToolCall("navigate", '{"instruction": ""}'), ToolCall("navigate", '{"where": "x"}'),
               ToolCall("resume", "{}"), ToolCall("status", "[1]")]
        for c in bad:
            assert json.loads(app.talk.tools.execute(c))["ok"] is False, c
    finally:
        app.resume()


def test_config_tool_choice_is_checked():
    from omnistream.robot.config import load_config

    assert load_config(None, {"sim": True, "talk_tool_choice": "navigate"}).talk_tool_choice == "navigate"
    with pytest.raises(ValueError, match="talk_tool_choice must be one of"):
        load_config(None, {"sim": True, "talk_tool_choice": "dance"})
    with pytest.raises(ValueError, match="talk_tool_choice must be one of auto, none, required, stop, status,"):
        load_config(None, {"mode": "talk", "talk_model": "x", "talk_tool_choice": "navigate"})  # no navigate mode
