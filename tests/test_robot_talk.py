"""Talk + navigate on the simulated robot with the chat pipeline in stage processes (`MultiProcClient`).

The real app (`python -m omnistream.apps.robot --sim --mode navigate,talk --talk-layout all-in-one`) with the
tiny Thinker-Talker checkpoint in a supervised stage process: a `file:` microphone turn, answered with a forced
`navigate` tool call (a valid one although the weights are random: the grammar runs in the stage) and then
words after the tool's output, must come out of the `file:` speaker, and a kill -9 of the chat stage while
the oracle agent drives the base must stop the base (the robot depends on every runtime stage: none may be
down while it moves), and motion must resume once the supervisor has the stage serving again. The simulator's
trajectory (every tick: wall time, pose, applied velocities) is the independent record of what the base did.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.test_robot import ROOT, App, _alive, _descendants

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def talk_app(tmp_path_factory, tiny_dir):
    run = tmp_path_factory.mktemp("robot-talk")
    mic = ROOT / "omnistream" / "assets" / "hello.flac"
    a = App(run, "--mode", "navigate,talk", "--talk-model", str(tiny_dir), "--talk-layout", "all-in-one",
            "--mic", f"file:{mic}", "--speaker", f"file:{run / 'reply.wav'}", "--voice", "Chelsie",
            "--talk-max-new-tokens", "4", "--talk-max-speech-s", "0.5", "--talk-tool-choice", "navigate",
            "--talk-seed", "0",
            "--forward-step-m", "0.5")  # 1 s forward moves: a kill lands mid-move, which must not run to its end
    a.pids = []  # every process below the app, collected while it runs (checked for orphans at the end)
    yield a
    if a.proc.poll() is None:  # test_clean_exit_no_orphans did not get to close it
        a.close()


def _chat_stages(app: App) -> list[dict]:
    return app.status()["talk"]["client"]["stages"]


@pytest.mark.timeout(240)
def test_talk_multiproc_file_mic_to_file_speaker(talk_app):
    """(a) the microphone file's turn goes through the stage process; the spoken reply lands in the speaker file."""
    a = talk_app
    st = a.wait(lambda: (s := a.status())["talk"]["turns"] >= 1 and s, 200, "a talk turn")
    client = st["talk"]["client"]
    assert client["mode"] == "multi-process" and client["layout"] == "all-in-one"
    (stage,) = client["stages"]
    assert stage["state"] == "ready" and stage["alive"] and stage["pid"] in _descendants(a.proc.pid)
    assert set(stage["workers"]) >= {"encoders", "thinker", "talker", "token2wav"}
    reply = st["talk"]["replies"][-1]
    assert reply["audio_samples"] > 0
    (call,) = reply["calls"]  # the forced navigate call, carried out: a task from the voice
    args = json.loads(call["arguments"])
    assert call["name"] == "navigate" and isinstance(args["instruction"], str) and json.loads(call["output"])["ok"]
    assert st["task"]["source"] == "voice" and st["task"]["instruction"] == args["instruction"]
    assert st["task"]["state"] in ("running", "failed")  # the oracle refuses an instruction that names no room
    from omnistream.encoders.media import read_audio

    pcm, rate = read_audio(a.run_dir / "reply.wav")
    assert rate == 24000 and pcm.shape[0] == reply["audio_samples"]
    assert a.http("/health")[0] == 200
    a.pids += _descendants(a.proc.pid)


@pytest.mark.timeout(240)
def test_kill_chat_stage_stops_base_until_restarted(talk_app):
    """(b) kill -9 of the chat stage during motion: base stopped while it is down, motion resumes after."""
    a = talk_app
    a.wait(lambda: _chat_stages(a)[0]["state"] == "ready", 120, "the chat stage to serve")
    (stage0,) = _chat_stages(a)
    assert a.status()["agent_stage"]["state"] == "ready"
    assert a.command({"type": "instruction", "text": "go to the dining room"})["ok"]
    a.wait(lambda: (t := a.trajectory()) and t[-1]["x.vel"] != 0, 60, "the robot to drive forward")
    a.pids += _descendants(a.proc.pid)
    agent_restarts = a.status()["agent_stage"]["restarts"]
    t_kill = time.time()
    os.kill(stage0["pid"], signal.SIGKILL)
    stopped = a.wait(lambda: next((r for r in a.trajectory() if r["t"] >= t_kill and r["x.vel"] == 0
                                   and r["theta.vel"] == 0), None), 5, "the base to stop")
    assert stopped["t"] - t_kill <= 0.5, f"base stopped {stopped['t'] - t_kill:.3f} s after the kill"
    # while the stage is down (dead, restarting, loading the checkpoint): paused for it, the base still
    reasons, t_down = set(), None
    end = time.monotonic() + 150
    while time.monotonic() < end:
        t_poll = time.time()
        st = a.status()
        (stage,) = st["talk"]["client"]["stages"]
        if stage["restarts"] >= 1 and stage["state"] == "ready":
            break
        t_down = t_poll  # the stage was still down at this wall time
        reasons.add(st["pause_reason"])
        time.sleep(0.1)
    else:
        raise AssertionError(f"the chat stage did not come back: {stage}")
    assert stage["pid"] != stage0["pid"] and not _alive(stage0["pid"])
    assert t_down is not None and "talk stages down" in reasons, reasons
    down = [r for r in a.trajectory() if stopped["t"] <= r["t"] <= t_down]
    assert down and all(r["x.vel"] == 0 and r["theta.vel"] == 0 for r in down), "moved while a chat stage was down"
    # the stage serves again: the task was paused, not lost, and the base moves again
    a.wait(lambda: any(r["t"] > t_down and (r["x.vel"] or r["theta.vel"]) for r in a.trajectory()[-300:]), 60,
           "motion to resume")
    st = a.status()
    assert st["task"]["state"] in ("running", "done") and st["counts"]["pauses"] >= 1
    assert st["agent_stage"]["restarts"] == agent_restarts  # it was the chat stage that stopped the robot
    a.pids += _descendants(a.proc.pid)
    assert a.command({"type": "cancel"})["ok"]


@pytest.mark.timeout(120)
def test_clean_exit_no_orphans(talk_app):
    a = talk_app
    pids = sorted(set(a.pids) | set(_descendants(a.proc.pid)))
    assert a.close() == 0
    traj = a.trajectory()
    assert traj and traj[-1]["x.vel"] == 0 and traj[-1]["theta.vel"] == 0
    assert len(pids) >= 3  # the simulated robot, the agent stage, the chat stage (and their helpers)
    end = time.monotonic() + 10
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < end:
        time.sleep(0.1)
    assert not left, f"orphans after exit: {left}"
