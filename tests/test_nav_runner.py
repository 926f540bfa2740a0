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
    with pytest.raises(ValueError, match="holds results of agent 'random'"):
        run(episodes, OracleAgent(), GridSimulator(episodes.parent / "scenes"), out)


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
def test_janus_agent_through_the_cli(episodes, tmp_path):
    """`--agent janus --model DIR` on the tiny random JanusVLN checkpoint: random weights generate text that is
    not an action, so each episode ends at its first step with one counted unparseable output."""
    from omnistream.navigation.tiny import make_tiny_janus

    model = make_tiny_janus(tmp_path / "tiny-janus")
    out = tmp_path / "janus"
    assert main(["nav", "--episodes", str(episodes), "--agent", "janus", "--model", str(model), "--out", str(out),
                 "--limit", "1", "--max-steps", "3", "--no-plots", *SMALL]) == 0
    (rec,) = results(out)
    assert rec["agent"] == "janus" and 1 <= rec["steps"] <= 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unparseable"] == rec["unparseable"] and summary["episodes"] == 1
