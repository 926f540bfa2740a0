"""Generate VLN-CE episodes on procedurally generated scenes (`omnistream nav make-episodes`).

Each episode starts in one room and ends next to a named piece of furniture or at a doorway, usually in
another room. The planner gives the reference path and `info.geodesic_distance`; the ground truth
(`{split}_gt.json.gz`) is the trajectory the oracle follower actually drives in the grid simulator, with
the same kinematics as the rendered one. Instructions are templated from what the reference path passes:

    "Walk past the red sofa and stop at the door on your left."

Goals carry VLN-CE's 3 m success radius.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from pathlib import Path

import numpy as np

from omnistream.navigation.agents import ACTIONS, OracleAgent
from omnistream.navigation.episodes import Episode, Goal, GroundTruth, Instruction, heading_to_quat, write_episodes
from omnistream.navigation.planner import Planner
from omnistream.navigation.scenes import Box, Door, Scene, generate_scene
from omnistream.navigation.sim import GridSimulator

log = logging.getLogger(__name__)

GOAL_RADIUS = 3.0
MIN_GEODESIC = 4.0  # > the success radius, so stopping at the start never succeeds
MAX_GEODESIC = 16.0


def _rect_distance(box: Box, x: float, z: float) -> float:
    dx = max(abs(x - box.center[0]) - box.half[0], 0.0)
    dz = max(abs(z - box.center[2]) - box.half[2], 0.0)
    return math.hypot(dx, dz)


def _approach_point(planner: Planner, box: Box) -> np.ndarray | None:
    """The navigable cell nearest to the furniture's footprint (within 0.8 m of it)."""
    r, c = np.nonzero(planner.nav)
    xs, zs = planner.scene.cell_center(r, c)
    dx = np.maximum(np.abs(xs - box.center[0]) - box.half[0], 0.0)
    dz = np.maximum(np.abs(zs - box.center[2]) - box.half[2], 0.0)
    d = np.hypot(dx, dz)
    # prefer cells facing the middle of a side (not a corner): distance to the centre breaks ties
    score = d + 0.2 * np.hypot(xs - box.center[0], zs - box.center[2])
    ok = d < 0.8
    if not ok.any():
        return None
    i = int(np.argmin(np.where(ok, score, np.inf)))
    return np.array([float(xs[i]), 0.0, float(zs[i])])


def _door_point(planner: Planner, door: Door, side: int) -> np.ndarray | None:
    off = 0.7 * side
    x, z = (door.x, door.z + off) if door.axis == "x" else (door.x + off, door.z)
    p = np.array([x, 0.0, z])
    return p if planner.scene.is_navigable(x, z) else None


def _side(path: list[np.ndarray], target_xz: tuple[float, float]) -> str:
    """'left' / 'right' / 'ahead' of the target seen along the last leg of the path."""
    a, b = path[-2] if len(path) > 1 else path[-1], path[-1]
    fx, fz = b[0] - a[0], b[2] - a[2]
    n = math.hypot(fx, fz)
    if n < 1e-6:
        return "ahead"
    fx, fz = fx / n, fz / n
    vx, vz = target_xz[0] - b[0], target_xz[1] - b[2]
    left = (fz, -fx)  # forward rotated +90 degrees about +y (habitat: heading + pi/2)
    lat = vx * left[0] + vz * left[1]
    ahead = vx * fx + vz * fz
    if abs(lat) < 0.5 * abs(ahead) and ahead > 0:
        return "ahead"
    return "left" if lat > 0 else "right"


def _landmarks(scene: Scene, path: list[np.ndarray], exclude: str) -> list[str]:
    """Furniture within 1.2 m of the path, in the order the path passes them."""
    pts = np.array([p for p in _densify(path)])
    found: list[tuple[int, str]] = []
    for b in scene.furniture:
        if b.name == exclude:
            continue
        d = [_rect_distance(b, p[0], p[2]) for p in pts]
        i = int(np.argmin(d))
        if d[i] < 1.2 and i < len(pts) - 4:  # passed, not at the very end
            found.append((i, b.name))
    return [n for _, n in sorted(found)]


def _densify(path: list[np.ndarray], step: float = 0.25) -> list[np.ndarray]:
    out = [path[0]]
    for a, b in itertools.pairwise(path):
        n = max(1, int(np.linalg.norm(b - a) / step))
        out += [a + (b - a) * (k / n) for k in range(1, n + 1)]
    return out


def _instruction(rng, scene: Scene, path, target: str, target_xz, start_room: str, goal_room: str) -> str:
    side = _side(path, target_xz)
    where = "in front of you" if side == "ahead" else f"on your {side}"
    lms = _landmarks(scene, path, target)
    other = goal_room != start_room
    options = []
    if lms:
        options.append(f"Walk past the {lms[0]} and stop at the {target} {where}.")
        if other:
            options.append(f"Leave the {start_room}, walk past the {lms[0]} and stop by the {target} in the {goal_room}.")
    if len(lms) > 1:
        options.append(f"Go past the {lms[0]}, then the {lms[1]}, and wait next to the {target} {where}.")
    if other:
        options.append(f"Exit the {start_room} and go into the {goal_room}. Stop at the {target} {where}.")
    options.append(f"Head to the {target} {where} and stop there.")
    return options[int(rng.integers(len(options)))]


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[.,]", text.lower())


def record_ground_truth(sim: GridSimulator, episode: Episode, max_steps: int = 500) -> GroundTruth:
    """Drive the oracle follower in the grid simulator; the locations/actions it produces."""
    agent = OracleAgent()
    agent.path_fn = sim.follower_path
    obs = sim.reset(episode)
    agent.reset(episode)
    locations, actions = [sim.position], []
    for _ in range(max_steps):
        a = agent.act(obs)
        actions.append(ACTIONS.index(a))
        if a == "STOP":
            break
        obs = sim.step(a)
        locations.append(sim.position)
    return GroundTruth(locations, actions, sum(1 for a in actions if a == 1))


def scene_episodes(scene: Scene, n: int, rng: np.random.Generator, first_id: int) -> list[Episode]:
    """Up to n episodes on one scene (fewer if the scene is too small for the distance range)."""
    planner = Planner(scene)
    sim = GridSimulator()
    sim.scene, sim.planner = scene, planner
    eps: list[Episode] = []
    tries = 0
    while len(eps) < n and tries < 50 * n:
        tries += 1
        if rng.random() < 0.3 and scene.doors:
            door = scene.doors[int(rng.integers(len(scene.doors)))]
            goal = _door_point(planner, door, 1 if rng.random() < 0.5 else -1)
            target, target_xz = "door", (door.x, door.z)
        else:
            box = scene.furniture[int(rng.integers(len(scene.furniture)))]
            goal = _approach_point(planner, box)
            target, target_xz = box.name, (box.center[0], box.center[2])
        if goal is None:
            continue
        goal_room = scene.room_at(goal[0], goal[2])
        start = planner.random_navigable_point(rng)
        start_room = scene.room_at(start[0], start[2])
        path = planner.follower_path(start, goal)  # the reference path: what a careful walker takes
        if path is None:
            continue
        geo = planner.geodesic_distance(start, goal)  # info.geodesic_distance: the true shortest distance
        if not MIN_GEODESIC <= geo <= MAX_GEODESIC:
            continue
        text = _instruction(rng, scene, path, target, target_xz, start_room or "room", goal_room or "room")
        heading = float(rng.uniform(-math.pi, math.pi))
        eid = first_id + len(eps)
        ep = Episode(str(eid), eid, scene.scene_id, start, heading_to_quat(heading), geo,
                     [Goal(goal, GOAL_RADIUS)], path, Instruction(text, []))
        ep.gt = record_ground_truth(sim, ep)
        final = ep.gt.locations[-1]
        if planner.geodesic_distance(final, goal) >= GOAL_RADIUS:
            log.warning("episode %s: the oracle follower ended %.2f m from the goal", eid,
                        planner.geodesic_distance(final, goal))
        eps.append(ep)
    return eps


def make_vocab(episodes: list[Episode]) -> dict:
    """A VLN-CE style `instruction_vocab` (PAD 0, UNK 1) and the episodes' instruction_tokens."""
    words = sorted({w for e in episodes for w in tokenize(e.instruction.instruction_text)})
    word_list = ["<PAD>", "<UNK>"] + words
    w2i = {w: i for i, w in enumerate(word_list)}
    for e in episodes:
        e.instruction.instruction_tokens = [w2i.get(w, 1) for w in tokenize(e.instruction.instruction_text)]
    return {"word_list": word_list, "word2idx_dict": w2i, "num_vocab": len(word_list), "UNK_INDEX": 1, "PAD_INDEX": 0}


def make_dataset(out_dir: str | Path, n_scenes: int, episodes_per_scene: int = 5, split: str = "val",
                 seed: int = 0, glb: bool = True) -> Path:
    """Write <out>/scenes/omnistream/scene_XXXX/* and <out>/<split>.json.gz (+ _gt); returns the split file."""
    if n_scenes < 1 or episodes_per_scene < 1:
        raise ValueError("need at least one scene and one episode per scene")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    episodes: list[Episode] = []
    for i in range(n_scenes):
        scene = generate_scene(seed * 1000 + i)
        scene.save(out / "scenes", glb=glb)
        episodes += scene_episodes(scene, episodes_per_scene, rng, first_id=len(episodes) + 1)
    vocab = make_vocab(episodes)
    return write_episodes(out / f"{split}.json.gz", episodes, vocab)
