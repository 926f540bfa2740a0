"""Run navigation episodes: one agent, one simulator, per-episode results as they finish.

`OUT/results.jsonl` gets one line per finished episode (metrics, steps, collisions, unparseable outputs,
the trajectory), flushed at once, so an interrupted run (Ctrl-C: exit 130) loses at most the episode in
progress and a rerun with the same OUT skips what is done. A rerun resumes only the *same* run: the
first run writes its identity to `OUT/run.json` (the episode files' content hash, split, simulator,
agent settings, step limit, code version) and a rerun whose identity differs is refused with the
difference named (or starts over with `overwrite=True` / `--overwrite`), so results of two datasets or
two agents never end up in one summary. At the end the means over all finished episodes go to
`OUT/summary.json` and a table on stdout, and `OUT/plots/<episode_id>.png` shows each episode from above:
free space, reference path, agent path, start, goal and its success radius.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from omnistream.navigation.agents import ACTIONS, Agent, OracleAgent, RandomAgent
from omnistream.navigation.episodes import Episode, gt_path_for, read_episodes
from omnistream.navigation.metrics import METRIC_KEYS, episode_metrics, summarize
from omnistream.navigation.sim import Simulator
from omnistream.navigation.simulators import make_simulator

log = logging.getLogger(__name__)

MAX_STEPS = 500  # VLN-CE / JanusVLN evaluation limit


def make_agent(kind: str, model: str | None = None, seed: int = 0, *, device: str = "cpu", dtype="auto",
               attn: str = "sdpa") -> Agent:
    """oracle | random | janus (JanusVLN from a checkpoint directory, imported only when asked for; ``device``,
    ``dtype`` (auto: bf16 on CUDA, fp32 on CPU) and ``attn`` are its)."""
    if kind == "oracle":
        return OracleAgent()
    if kind == "random":
        return RandomAgent(seed)
    if kind == "janus":
        if not model:
            raise ValueError("--agent janus needs --model DIR (a JanusVLN checkpoint directory)")
        from omnistream.navigation.janus import JanusAgent, JanusError

        try:
            return JanusAgent.from_pretrained(model, device=device, dtype=dtype, attn_implementation=attn)
        except JanusError as e:  # a checkpoint problem: one clear line from the CLI, not a traceback
            raise ValueError(str(e)) from e
    raise ValueError(f"unknown agent {kind!r}; expected oracle, random or janus")


def run_episode(agent: Agent, sim: Simulator, episode: Episode, max_steps: int = MAX_STEPS) -> dict:
    """Drive one episode to STOP or max_steps; returns its result record (metrics + trajectory)."""
    if isinstance(agent, OracleAgent) and agent.path_fn is None:
        agent.path_fn = sim.follower_path  # the oracle plans on the simulator's own navigation map
    t0 = time.perf_counter()
    unparseable0 = agent.unparseable
    obs = sim.reset(episode)
    agent.reset(episode)
    positions = [sim.position]
    actions: list[str] = []
    collisions = 0
    called_stop = False
    for _ in range(max_steps):
        action = agent.act(obs)
        if action not in ACTIONS:
            log.warning("episode %s: agent returned %r, not an action: STOP", episode.episode_id, action)
            agent.unparseable += 1
            action = "STOP"
        actions.append(action)
        if action == "STOP":
            called_stop = True
            break
        obs = sim.step(action)
        collisions += int(sim.collided)
        positions.append(sim.position)
    goal = episode.goals[0]
    reference = episode.gt.locations if episode.gt and episode.gt.locations else episode.reference_path
    m = episode_metrics(positions, goal.position, episode.geodesic_distance, reference, called_stop,
                        distance_to_goal=lambda p: sim.geodesic_distance(p, goal.position),
                        success_distance=goal.radius)
    return {
        "episode_id": episode.episode_id, "scene_id": episode.scene_id, "agent": agent.name, **m,
        "steps": len(actions), "called_stop": called_stop, "collisions": collisions,
        "unparseable": agent.unparseable - unparseable0, "seconds": round(time.perf_counter() - t0, 3),
        "instruction": episode.instruction.instruction_text,
        "actions": "".join("SFLR"[ACTIONS.index(a)] for a in actions),
        "trajectory": [[round(float(v), 4) for v in p] for p in positions],
    }


def load_results(path: Path) -> dict[str, dict]:
    """Finished episodes of an earlier run; a line cut short by a crash is dropped (and the file repaired)."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    good, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            done[str(rec["episode_id"])] = rec
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
    if bad:
        log.warning("%s: dropped %d unreadable line(s) (an interrupted write); those episodes will rerun", path, bad)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        os.replace(tmp, path)
    return done


RUN_FILE = "run.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(episodes_file: str | Path, agent: Agent, sim: Simulator, max_steps: int) -> dict:
    """What makes two runs the same run: a rerun resumes only if this equals the first run's ``run.json``.
    ``--limit`` is not part of it (a rerun without it completes the run); the device is not either."""
    import omnistream

    path = Path(episodes_file)
    gt = gt_path_for(path)
    name = path.name.removesuffix(".gz").removesuffix(".json")
    return {
        "episodes_sha256": _sha256(path),
        "ground_truth_sha256": _sha256(gt) if gt.exists() else None,
        "split": name,
        "simulator": {"backend": type(sim).__name__, "width": sim.width, "height": sim.height},
        "agent": agent.settings(),
        "max_steps": max_steps,
        "code_version": omnistream.__version__,
    }


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse to resume into ``out`` a run other than the one it holds (one line naming the difference);
    with ``overwrite`` remove that run's files (only those this runner writes) and start over."""
    run_file, results = out / RUN_FILE, out / "results.jsonl"
    if overwrite:
        for f in (run_file, results, out / "summary.json"):
            f.unlink(missing_ok=True)
        shutil.rmtree(out / "plots", ignore_errors=True)
    elif run_file.exists():
        try:
            held = json.loads(run_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{run_file} is unreadable ({e}): use --overwrite to start over or another --out") from e
        diff = [k for k in sorted(set(identity) | set(held)) if identity.get(k) != held.get(k)]
        if diff:
            k = diff[0]
            more = f" (and {', '.join(diff[1:])})" if diff[1:] else ""
            raise ValueError(f"{out} holds another run: {k} was {_short(held.get(k))}, now {_short(identity.get(k))}"
                             f"{more}; rerun with the same settings to resume, or use --overwrite or another --out")
        return
    elif results.exists() and results.stat().st_size:
        raise ValueError(f"{results} holds results without a {RUN_FILE} (an older run), so it cannot be checked "
                         "to be this run: use --overwrite to start over or another --out")
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, run_file)


def plot_episode(path: Path, result: dict, episode: Episode, sim: Simulator) -> None:
    """Top-down PNG: free space (grey), reference path (green), agent path (blue), goal radius (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    try:
        top = sim.top_down_map()
        if top is not None:
            grid, (x0, x1, z0, z1) = top
            ax.imshow(np.where(grid, 0.95, 0.35), cmap="gray", vmin=0, vmax=1, origin="lower",
                      extent=(x0, x1, z0, z1), interpolation="nearest")
        ref = np.asarray(episode.reference_path, float).reshape(-1, 3)
        if len(ref):
            ax.plot(ref[:, 0], ref[:, 2], "-", color="tab:green", lw=2, label="reference path")
        traj = np.asarray(result["trajectory"], float).reshape(-1, 3)
        ax.plot(traj[:, 0], traj[:, 2], "-", color="tab:blue", lw=1.5, label="agent path")
        ax.plot(traj[0, 0], traj[0, 2], "o", color="tab:blue", ms=7, label="start")
        ax.plot(traj[-1, 0], traj[-1, 2], "x" if result["called_stop"] else "s", color="tab:blue", ms=8,
                label="agent stop" if result["called_stop"] else "agent end (no STOP)")
        goal = episode.goals[0]
        ax.add_patch(plt.Circle((goal.position[0], goal.position[2]), goal.radius, color="tab:red", fill=False,
                                ls="--", lw=1.5, label=f"goal radius {goal.radius:g} m"))
        ax.plot(goal.position[0], goal.position[2], "*", color="tab:red", ms=12, label="goal")
        ax.set_aspect("equal")
        ax.invert_yaxis()  # -z (the heading-0 direction) points up
        ax.set_xlabel("x (m)")
        ax.set_ylabel("z (m)")
        text = episode.instruction.instruction_text
        ax.set_title(f"episode {episode.episode_id}: SR {result['SR']:.0f}  NE {result['NE']:.2f} m  "
                     f"nDTW {result['nDTW']:.2f}\n{text[:90]}", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides the map
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)


def format_summary(s: dict) -> str:
    head = ["episodes", *METRIC_KEYS, "steps", "unparseable"]
    vals = [f"{int(s['episodes'])}"] + [f"{s[k]:.3f}" for k in METRIC_KEYS] + [f"{s['steps']:.1f}",
                                                                            f"{int(s['unparseable'])}"]
    w = [max(len(h), len(v)) for h, v in zip(head, vals)]
    return ("  ".join(h.rjust(n) for h, n in zip(head, w)) + "\n" + "  ".join(v.rjust(n) for v, n in zip(vals, w)))


def run(episodes_file: str | Path, agent: Agent, sim: Simulator, out_dir: str | Path, max_steps: int = MAX_STEPS,
        limit: int | None = None, plots: bool = True, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or resume) all episodes of a file; returns the summary written to OUT/summary.json.
    A rerun into the same OUT resumes only the same run (:func:`check_resume`)."""
    from tqdm import tqdm

    if max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    episodes = read_episodes(episodes_file)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        episodes = episodes[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(out, run_identity(episodes_file, agent, sim, max_steps), overwrite)
    results_path = out / "results.jsonl"
    done = load_results(results_path)
    todo = [e for e in episodes if e.episode_id not in done]
    if done:
        log.info("resuming: %d of %d episodes already in %s", len(episodes) - len(todo), len(episodes), results_path)
    bar = tqdm(todo, desc=f"nav {agent.name}", unit="ep", disable=not progress, dynamic_ncols=True)
    with open(results_path, "a", encoding="utf-8") as f:
        for ep in bar:
            rec = run_episode(agent, sim, ep, max_steps)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[ep.episode_id] = rec
            if plots:
                try:
                    plot_episode(out / "plots" / f"{ep.episode_id}.png", rec, ep, sim)
                except Exception as e:  # noqa: BLE001 - a plot must never lose a run
                    log.warning("episode %s: plot failed: %s", ep.episode_id, e)
            srs = [done[e.episode_id]["SR"] for e in episodes if e.episode_id in done]
            bar.set_postfix(SR=f"{np.mean(srs):.2f}", steps=rec["steps"])
    bar.close()
    results = [done[e.episode_id] for e in episodes if e.episode_id in done]
    summary = summarize(results)
    summary.update({"agent": agent.name, "episodes_file": str(episodes_file), "max_steps": max_steps})
    tmp = out / "summary.json.tmp"  # replaced whole: an interrupted write never leaves half a summary
    tmp.write_text(json.dumps({k: _nan_safe(v) for k, v in summary.items()}, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary


def _nan_safe(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def run_cli(args) -> int:
    """`omnistream nav --episodes FILE --sim ... --agent ... --out DIR`; Ctrl-C: one line, exit 130."""
    episodes_file = Path(args.episodes)
    scenes_dir = Path(args.scenes_dir) if args.scenes_dir else episodes_file.parent / "scenes"
    try:
        agent = make_agent(args.agent, args.model, args.seed, device=getattr(args, "device", "cpu"),
                           dtype=getattr(args, "dtype", "auto"), attn=getattr(args, "attn", "sdpa"))
        with make_simulator(args.sim, scenes_dir, args.width, args.height) as sim:
            summary = run(episodes_file, agent, sim, args.out, args.max_steps, args.limit,
                          plots=not args.no_plots, progress=not args.no_progress,
                          overwrite=getattr(args, "overwrite", False))
    except KeyboardInterrupt:  # the simulator (and its render process) is closed by now
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(f"results: {Path(args.out) / 'results.jsonl'}  summary: {Path(args.out) / 'summary.json'}"
          + ("" if args.no_plots else f"  plots: {Path(args.out) / 'plots'}"))
    return 0
