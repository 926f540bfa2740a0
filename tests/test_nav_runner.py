"""`omnistream nav` end to end on generated episodes: oracle SR 1.0, random agent, resume, plots, bad input."""

import gzip
import json
import logging

import numpy as np
import pytest

from omnistream.cli import main
from omnistream.navigation.agents import ACTIONS, Agent, OracleAgent, RandomAgent, parse_action
from omnistream.navigation.episodes import read_episodes
from omnistream.navigation.runner import load_results, run, run_episode
from omnistream.navigation.sim import GridSimulator, MujocoSimulator

SMALL = ["--width", "48", "--height", "36", "--no-progress"]


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    """4 episodes on 2 generated scenes, written through the CLI."""
    out = tmp_path_factory.mktemp("navrun")
    assert main(["nav", "make-episodes", "--scenes", "2", "--per-scene", "2", "--seed", "3", "--out", str(out)]) == 0
    return out / "val.json.gz"


def results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_oracle_succeeds_on_every_generated_episode(episodes, tmp_path, capsys):
    out = tmp_path / "oracle"
    assert main(["nav", "--episodes", str(episodes), "--agent", "oracle", "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 4 and summary["agent"] == "oracle"
    assert summary["SR"] == 1.0 and summary["OS"] == 1.0 and summary["unparseable"] == 0
    assert summary["SPL"] > 0.85  # shortest-path follower: only the turns' sub-step wiggle and early stop cost
    rows = results(out)
    assert sorted(r["episode_id"] for r in rows) == ["1", "2", "3", "4"]
    for r in rows:
        assert r["called_stop"] and r["NE"] < 0.6 and r["actions"].endswith("S")
        assert len(r["trajectory"]) == r["steps"]  # start + one position per non-STOP action
    table = capsys.readouterr().out
    assert "SR" in table and "nDTW" in table and "1.000" in table
    for eid in "1234":  # a PNG per episode
        assert (out / "plots" / f"{eid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_resume_skips_finished_and_repairs_a_cut_line(episodes, tmp_path):
    out = tmp_path / "rand"
    args = ["nav", "--episodes", str(episodes), "--agent", "random", "--out", str(out), "--max-steps", "40",
            "--no-plots", *SMALL]
    assert main([*args, "--limit", "2"]) == 0
    first = results(out)
    assert [r["episode_id"] for r in first] == ["1", "2"]
    assert main(args) == 0
    second = results(out)
    assert second[:2] == first  # not rerun: identical records, timings included
    assert [r["episode_id"] for r in second] == ["1", "2", "3", "4"]
    for r in second:
        assert 1 <= r["steps"] <= 40 and 0.0 <= r["nDTW"] <= 1.0
    # a crash mid-write leaves half a line: it is dropped and that episode reruns, with the same actions
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    assert main(args) == 0
    third = results(out)
    assert [r["episode_id"] for r in third] == ["1", "2", "3", "4"]
    assert third[3]["actions"] == second[3]["actions"]  # the random agent is seeded per episode
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 4
    assert summary["SR"] == pytest.approx(np.mean([r["SR"] for r in third]))
    # another agent into the same OUT would mix runs: refused
    with pytest.raises(ValueError, match="holds another run: agent was"):
        run(episodes, OracleAgent(), GridSimulator(episodes.parent / "scenes"), out, max_steps=40)


def _other_dataset(episodes, name="other.json.gz"):
    """The same episodes (same scenes, same ids) with other instructions: another dataset to a resume."""
    with gzip.open(episodes, "rt") as f:
        data = json.load(f)
    for ep in data["episodes"]:
        ep["instruction"]["instruction_text"] = "another dataset: " + ep["instruction"]["instruction_text"]
    path = episodes.parent / name
    with gzip.open(path, "wt") as f:
        json.dump(data, f)
    return path


def test_resume_refuses_another_run_and_overwrite_starts_over(episodes, tmp_path, capsys):
    """Issue 12: rerunning into the same --out with another episodes file (or step limit, or agent) used to
    report the old run's episodes as this run's. Now: one line naming the difference, exit 2, nothing
    touched; --overwrite starts over with only the new run's episodes."""
    out = tmp_path / "run"
    base = ["nav", "--agent", "random", "--out", str(out), "--max-steps", "5", "--no-plots", *SMALL]
    assert main([*base, "--episodes", str(episodes), "--limit", "2"]) == 0
    before = (out / "results.jsonl").read_text()
    ident = json.loads((out / "run.json").read_text())
    assert ident["split"] == "val" and ident["max_steps"] == 5 and ident["agent"]["seed"] == 0
    capsys.readouterr()
    other = _other_dataset(episodes)
    for extra, named in ([["--episodes", str(other)], "episodes_sha256"],
                         [["--episodes", str(episodes), "--max-steps", "6"], "max_steps"],
                         [["--episodes", str(episodes), "--seed", "1"], "agent"],
                         [["--episodes", str(episodes), "--width", "32"], "simulator"]):
        args = [*base, *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"holds another run: {named} was" in err and "--overwrite" in err
        assert (out / "results.jsonl").read_text() == before  # nothing touched
    assert main([*base, "--episodes", str(episodes)]) == 0  # the same run resumes
    assert len(results(out)) == 4
    assert main([*base, "--episodes", str(other), "--overwrite", "--limit", "3"]) == 0
    rows = results(out)
    assert [r["episode_id"] for r in rows] == ["1", "2", "3"]
    assert all(r["instruction"].startswith("another dataset: ") for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 3 and summary["episodes_file"] == str(other)
    # results from before run.json existed cannot be checked: refused too
    (out / "run.json").unlink()
    assert main([*base, "--episodes", str(other)]) == 2
    assert "without a run.json" in capsys.readouterr().err


def test_malformed_episode_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json.gz"
    ep = {"episode_id": 7, "trajectory_id": 1, "scene_id": "omnistream/scene_0000/scene_0000.glb",
          "start_position": [0, 0, 0], "start_rotation": [0, 0, 0, 1], "info": {"geodesic_distance": 4.0},
          "goals": [{"radius": 3.0}], "reference_path": [],
          "instruction": {"instruction_text": "go", "instruction_tokens": []}}
    with gzip.open(bad, "wt") as f:
        json.dump({"episodes": [ep]}, f)
    assert main(["nav", "--episodes", str(bad), "--out", str(tmp_path / "o"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "episode 7" in err and "goals[0].position" in err and "Traceback" not in err
    assert main(["nav", "--episodes", str(tmp_path / "none.json.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["nav", "--episodes", str(bad), "--agent", "janus", "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err


class _Babbler(Agent):
    """A model-like agent whose outputs go through parse_action: two valid, then gibberish, then an invalid action."""

    name = "babbler"

    def reset(self, episode):
        self.outputs = iter(["Move forward.", "I turn left", "the answer is 42", "JUMP"])

    def act(self, obs):
        text = next(self.outputs)
        return text if text == "JUMP" else self.parse(text)


def test_unparseable_outputs_are_counted(episodes, caplog):
    ep = read_episodes(episodes)[0]
    sim = GridSimulator(episodes.parent / "scenes")
    agent = _Babbler()
    with caplog.at_level(logging.WARNING):
        rec = run_episode(agent, sim, ep, max_steps=10)
    # forward, left, then gibberish -> STOP (counted); the episode ends there
    assert rec["actions"] == "FLS" and rec["unparseable"] == 1 and rec["called_stop"]
    assert any("unparseable" in m for m in caplog.messages)
    agent.outputs = iter(["JUMP"])  # an action outside ACTIONS is also STOP + counted
    agent.reset = lambda episode: None
    rec = run_episode(agent, sim, ep, max_steps=10)
    assert rec["actions"] == "S" and rec["unparseable"] == 1


@pytest.mark.parametrize(("text", "action", "ok"), [
    ("MOVE_FORWARD", "MOVE_FORWARD", True), ("stop", "STOP", True), ("Turn right.", "TURN_RIGHT", True),
    ("I will turn left and then move forward", "TURN_LEFT", True), ("go forward 25 cm", "MOVE_FORWARD", True),
    ("The next action is: STOP", "STOP", True), ("", "STOP", False), ("banana", "STOP", False),
    ("↑", "MOVE_FORWARD", True),
])
def test_parse_action(text, action, ok):
    assert parse_action(text) == (action, ok)


def test_random_agent_is_seeded_per_episode(episodes):
    ep = read_episodes(episodes)[1]
    a, b = RandomAgent(seed=5), RandomAgent(seed=5)
    a.reset(ep)
    b.reset(ep)
    seq_a = [a.act(None) for _ in range(50)]
    assert seq_a == [b.act(None) for _ in range(50)]
    assert set(seq_a) <= set(ACTIONS) and len(set(seq_a)) >= 3


def test_oracle_without_simulator_planner(episodes):
    """The oracle regenerates the scene from its id when no path function is given; same run as with one."""
    eps = read_episodes(episodes)[:1]
    sim = MujocoSimulator(episodes.parent / "scenes", 32, 24)
    try:
        rec_own = run_episode(OracleAgent(), GridSimulator(episodes.parent / "scenes"), eps[0])
        rec_sim = run_episode(OracleAgent(path_fn=sim.follower_path), sim, eps[0])
    finally:
        sim.close()
    assert rec_own["SR"] == 1.0 and rec_own["actions"] == rec_sim["actions"]


def test_run_rejects_bad_limits(episodes, tmp_path):
    with pytest.raises(ValueError, match="max-steps"):
        run(episodes, RandomAgent(), GridSimulator(), tmp_path, max_steps=0)
    with pytest.raises(ValueError, match="limit"):
        run(episodes, RandomAgent(), GridSimulator(), tmp_path, limit=0)
    assert load_results(tmp_path / "nothing.jsonl") == {}


def test_oracle_does_not_keep_pushing_into_a_wall(episodes):
    """Given a path straight through a wall (a wrong map), the oracle gives up pushing after two blocked moves."""
    ep = read_episodes(episodes)[0]
    sim = GridSimulator(episodes.parent / "scenes")
    obs = sim.reset(ep)
    # the nearest wall face: walk forward until blocked, then aim the path through it
    for _ in range(80):
        obs = sim.step("MOVE_FORWARD")
        if sim.collided and np.allclose(obs.position, sim.step("MOVE_FORWARD").position):
            break
    pos, h = sim.position, sim.heading
    beyond = pos + 3.0 * np.array([-np.sin(h), 0.0, -np.cos(h)])
    agent = OracleAgent(path_fn=lambda p, g: [np.asarray(p, float), beyond])
    agent.reset(ep)
    agent._goal = beyond
    streak, worst, turns = 0, 0, 0
    for _ in range(20):
        before = sim.position
        action = agent.act(sim._observe())
        sim.step(action)
        if action == "MOVE_FORWARD" and np.allclose(before, sim.position, atol=0.02):
            streak += 1
            worst = max(worst, streak)
        elif action != "MOVE_FORWARD":
            streak = 0
            turns += 1
    assert worst <= 2 and turns >= 3


@pytest.mark.timeout(300)
def test_janus_agent_through_the_cli(episodes, tmp_path, capsys):
    """`nav make-tiny DIR`, then `--agent janus --model DIR` on it: random weights generate text that is not an
    action, so each episode ends early with counted unparseable outputs. `--device cpu --dtype bf16` runs the
    same path in bf16 (issue 13); a bad --dtype/--device fails in argument parsing, before any load."""
    model = tmp_path / "tiny-janus"
    assert main(["nav", "make-tiny", str(model)]) == 0
    assert "wrote a tiny JanusVLN checkpoint" in capsys.readouterr().out
    for dtype in ("auto", "bf16"):
        out = tmp_path / f"janus-{dtype}"
        assert main(["nav", "--episodes", str(episodes), "--agent", "janus", "--model", str(model), "--out", str(out),
                     "--limit", "1", "--max-steps", "3", "--no-plots", "--device", "cpu", "--dtype", dtype,
                     *SMALL]) == 0
        (rec,) = results(out)
        assert rec["agent"] == "janus" and 1 <= rec["steps"] <= 3
        summary = json.loads((out / "summary.json").read_text())
        assert summary["unparseable"] == rec["unparseable"] and summary["episodes"] == 1
        ident = json.loads((out / "run.json").read_text())  # auto is fp32 on the CPU
        assert ident["agent"]["dtype"] == {"auto": "torch.float32", "bf16": "torch.bfloat16"}[dtype]
    capsys.readouterr()
    for bad in (["--dtype", "fp8"], ["--device", "tpu"], ["--device", "cuda:7"], ["--attn", "flash_attention_2"]):
        with pytest.raises(SystemExit) as e:
            main(["nav", "--episodes", str(episodes), "--agent", "janus", "--model", str(model), "--out",
                  str(tmp_path / "bad"), *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and bad[0] in err, err
    assert not (tmp_path / "bad").exists()


def test_wrong_checkpoint_kind_through_the_cli(episodes, tiny_dir, tmp_path, capsys):
    """An Omni checkpoint as --model of the janus agent: one line, exit 2, nothing run."""
    assert main(["nav", "--episodes", str(episodes), "--agent", "janus", "--model", str(tiny_dir), "--out",
                 str(tmp_path / "o"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "not a JanusVLN checkpoint" in err and "qwen2_5_omni" in err and len(err.strip().splitlines()) == 1


def test_make_tiny_cli_help(tmp_path):
    """`python -m omnistream.navigation.tiny --help` prints help (it used to create a directory named --help)."""
    import subprocess
    import sys

    for cmd in ([sys.executable, "-m", "omnistream.navigation.tiny", "--help"],
                [sys.executable, "-m", "omnistream.cli", "nav", "make-tiny", "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0 and "usage:" in r.stdout and "--seed" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "omnistream.navigation.tiny"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2 and "dir" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    import os

    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


@pytest.mark.timeout(300)
def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(episodes, tmp_path, monkeypatch):
    """Ctrl-C in a terminal reaches the whole foreground process group: `nav` prints one line and exits 130,
    the MuJoCo render process prints no traceback and is gone, no temporary file or directory is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    args = ["nav", "--episodes", str(episodes), "--agent", "random", "--out", str(out), "--max-steps", "500",
            "--no-plots", *SMALL]
    # the random agent made to never stop: episodes of 500 rendered steps, so Ctrl-C lands mid-episode
    code = ("from omnistream.navigation.agents import RandomAgent; RandomAgent.__init__.__defaults__ = (0, 0.0); "
            f"from omnistream.cli import main; raise SystemExit(main({args!r}))")
    cmd = [sys.executable, "-c", code]
    # Ctrl-C enabled, as a terminal's shell starts a command: where pytest itself runs as a background job
    # (`make test &` in a script), SIGINT is ignored, a child inherits that, and `nav` would rightly not stop
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not _children(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)  # the render process starts with the first episode
        kids = _children(proc.pid)
        assert kids, "the render process never started"
        time.sleep(1.0)  # mid-episode
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    for k in kids:  # the render process ended with its parent
        for _ in range(50):
            try:
                with open(f"/proc/{k}/stat") as f:
                    if f.read().rsplit(") ", 1)[1][0] == "Z":
                        break  # exited, waiting to be reaped
            except FileNotFoundError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"render process {k} outlived nav")
    assert list(tmp.iterdir()) == []  # no temporary directory leaked
    monkeypatch.setattr(RandomAgent.__init__, "__defaults__", (0, 0.0))
    assert main([*args, "--limit", "1"]) == 0  # and the same command resumes (the identity check agrees)
