"""VLN-CE episode files: `{split}.json.gz` (episodes) and `{split}_gt.json.gz` (ground-truth trajectories).

The layout is the one VLN-CE (Krantz et al. 2020) ships for R2R-CE and RxR-CE, read by habitat-lab's
`VLNEpisode`:

    {"episodes": [{"episode_id", "trajectory_id", "scene_id", "start_position": [x, y, z],
                   "start_rotation": [x, y, z, w], "info": {"geodesic_distance"},
                   "goals": [{"position": [x, y, z], "radius"}], "reference_path": [[x, y, z], ...],
                   "instruction": {"instruction_text", "instruction_tokens"}}, ...],
     "instruction_vocab": {...}}                           # optional here
    {split}_gt.json.gz: {"<episode_id>": {"locations": [[x, y, z], ...], "actions": [int, ...],
                                         "forward_steps": int}}

Positions are habitat world coordinates (y up); rotations are quaternions (x, y, z, w). A malformed file
raises `EpisodeFormatError` naming the file, the episode and the field, never a bare KeyError.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class EpisodeFormatError(ValueError):
    """An episode file does not follow the VLN-CE format."""


@dataclass
class Goal:
    position: np.ndarray  # (3,)
    radius: float = 3.0


@dataclass
class Instruction:
    instruction_text: str
    instruction_tokens: list[int] = field(default_factory=list)


@dataclass
class GroundTruth:
    locations: list[np.ndarray]  # per-step positions of the reference follower
    actions: list[int]  # habitat action ids: 0 STOP, 1 MOVE_FORWARD, 2 TURN_LEFT, 3 TURN_RIGHT
    forward_steps: int


@dataclass
class Episode:
    episode_id: str
    trajectory_id: int
    scene_id: str
    start_position: np.ndarray  # (3,)
    start_rotation: np.ndarray  # (4,) quaternion x, y, z, w
    geodesic_distance: float  # info.geodesic_distance, metres
    goals: list[Goal]
    reference_path: list[np.ndarray]
    instruction: Instruction
    gt: GroundTruth | None = None

    @property
    def start_heading(self) -> float:
        return quat_to_heading(self.start_rotation)

    def to_dict(self) -> dict:
        return {
            "episode_id": _id_out(self.episode_id), "trajectory_id": self.trajectory_id, "scene_id": self.scene_id,
            "start_position": _floats(self.start_position), "start_rotation": _floats(self.start_rotation),
            "info": {"geodesic_distance": float(self.geodesic_distance)},
            "goals": [{"position": _floats(g.position), "radius": float(g.radius)} for g in self.goals],
            "reference_path": [_floats(p) for p in self.reference_path],
            "instruction": {"instruction_text": self.instruction.instruction_text,
                            "instruction_tokens": [int(t) for t in self.instruction.instruction_tokens]},
        }


def heading_to_quat(heading: float) -> np.ndarray:
    """Yaw about +y (habitat) -> quaternion (x, y, z, w)."""
    return np.array([0.0, math.sin(heading / 2), 0.0, math.cos(heading / 2)])


def quat_to_heading(q) -> float:
    """Quaternion (x, y, z, w) -> yaw about +y: the heading whose forward vector (-sin h, 0, -cos h) is
    the rotated -z axis projected on the floor (as habitat-lab's `heading` measure computes it)."""
    x, y, z, w = (float(v) for v in q)
    # third column of the rotation matrix is R @ e_z; forward = -(R @ e_z)
    fx = -(2 * (x * z + w * y))
    fz = -(1 - 2 * (x * x + y * y))
    return math.atan2(-fx, -fz)


def _floats(v) -> list[float]:
    return [float(x) for x in np.asarray(v, float).ravel()]


def _id_out(eid: str):
    return int(eid) if str(eid).isdigit() else eid


# ---- reading ---------------------------------------------------------------------------------------------------
def _load_json(path: Path):
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EpisodeFormatError(f"{path}: not a valid {'gzipped ' if path.suffix == '.gz' else ''}JSON file ({e})") from e


class _Check:
    """Field accessors that raise EpisodeFormatError naming the file, the episode and the field."""

    def __init__(self, path: Path, where: str) -> None:
        self.path, self.where = path, where

    def fail(self, fld: str, msg: str):
        raise EpisodeFormatError(f"{self.path}: {self.where}: field {fld!r} {msg}")

    def get(self, d: dict, key: str, fld: str | None = None):
        if not isinstance(d, dict) or key not in d:
            self.fail(fld or key, "is missing")
        return d[key]

    def number(self, v, fld: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(fld, f"must be a finite number, got {v!r}")
        return float(v)

    def vec(self, v, n: int, fld: str) -> np.ndarray:
        if not isinstance(v, (list, tuple)) or len(v) != n:
            self.fail(fld, f"must be a list of {n} numbers, got {_short(v)}")
        return np.array([self.number(x, f"{fld}[{i}]") for i, x in enumerate(v)])


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 80 else s[:77] + "..."


def _parse_episode(d: dict, i: int, path: Path) -> Episode:
    eid = d.get("episode_id", f"#{i}") if isinstance(d, dict) else f"#{i}"
    ck = _Check(path, f"episode {eid}")
    if not isinstance(d, dict):
        ck.fail(f"episodes[{i}]", f"must be an object, got {_short(d)}")
    eid = ck.get(d, "episode_id")
    if not isinstance(eid, (int, str)) or isinstance(eid, bool):
        ck.fail("episode_id", f"must be an int or string, got {eid!r}")
    traj = ck.get(d, "trajectory_id")
    if not isinstance(traj, int) or isinstance(traj, bool):
        ck.fail("trajectory_id", f"must be an integer, got {traj!r}")
    scene = ck.get(d, "scene_id")
    if not isinstance(scene, str) or not scene:
        ck.fail("scene_id", f"must be a non-empty string, got {scene!r}")
    start = ck.vec(ck.get(d, "start_position"), 3, "start_position")
    rot = ck.vec(ck.get(d, "start_rotation"), 4, "start_rotation")
    if abs(float(np.linalg.norm(rot)) - 1.0) > 1e-3:
        ck.fail("start_rotation", f"must be a unit quaternion (x, y, z, w), got norm {np.linalg.norm(rot):.4f}")
    info = ck.get(d, "info")
    geo = ck.number(ck.get(info, "geodesic_distance", "info.geodesic_distance"), "info.geodesic_distance")
    goals_raw = ck.get(d, "goals")
    if not isinstance(goals_raw, list) or not goals_raw:
        ck.fail("goals", f"must be a non-empty list, got {_short(goals_raw)}")
    goals = []
    for j, g in enumerate(goals_raw):
        pos = ck.vec(ck.get(g, "position", f"goals[{j}].position"), 3, f"goals[{j}].position")
        radius = ck.number(g.get("radius", 3.0), f"goals[{j}].radius") if isinstance(g, dict) else 3.0
        if radius is not None and radius <= 0:
            ck.fail(f"goals[{j}].radius", f"must be positive, got {radius}")
        goals.append(Goal(pos, radius))
    ref_raw = ck.get(d, "reference_path")
    if not isinstance(ref_raw, list):
        ck.fail("reference_path", f"must be a list of [x, y, z], got {_short(ref_raw)}")
    ref = [ck.vec(p, 3, f"reference_path[{j}]") for j, p in enumerate(ref_raw)]
    ins = ck.get(d, "instruction")
    text = ck.get(ins, "instruction_text", "instruction.instruction_text")
    if not isinstance(text, str):
        ck.fail("instruction.instruction_text", f"must be a string, got {_short(text)}")
    toks = ins.get("instruction_tokens", [])
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        ck.fail("instruction.instruction_tokens", f"must be a list of integers, got {_short(toks)}")
    return Episode(str(eid), traj, scene, start, rot / np.linalg.norm(rot), geo, goals, ref, Instruction(text, toks))


def _parse_gt(d, eid: str, path: Path) -> GroundTruth:
    ck = _Check(path, f"episode {eid}")
    locs = ck.get(d, "locations")
    if not isinstance(locs, list):
        ck.fail("locations", f"must be a list of [x, y, z], got {_short(locs)}")
    locations = [ck.vec(p, 3, f"locations[{j}]") for j, p in enumerate(locs)]
    acts = ck.get(d, "actions")
    if not isinstance(acts, list) or not all(isinstance(a, int) and 0 <= a <= 3 for a in acts):
        ck.fail("actions", f"must be a list of action ids 0..3, got {_short(acts)}")
    fwd = ck.get(d, "forward_steps")
    if not isinstance(fwd, int) or isinstance(fwd, bool):
        ck.fail("forward_steps", f"must be an integer, got {fwd!r}")
    return GroundTruth(locations, acts, fwd)


def gt_path_for(path: str | Path) -> Path:
    """`.../val_unseen.json.gz` -> `.../val_unseen_gt.json.gz`."""
    p = Path(path)
    name = p.name
    for suf in (".json.gz", ".json"):
        if name.endswith(suf):
            return p.with_name(name[: -len(suf)] + "_gt" + suf)
    return p.with_name(name + "_gt")


def read_episodes(path: str | Path, gt: bool = True) -> list[Episode]:
    """Episodes of a VLN-CE split file, with their ground truth attached when `{split}_gt.json.gz` exists."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"episode file {path} does not exist")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("episodes"), list):
        raise EpisodeFormatError(f"{path}: top level must be an object with an 'episodes' list")
    episodes = [_parse_episode(d, i, path) for i, d in enumerate(data["episodes"])]
    seen: set[str] = set()
    for e in episodes:
        if e.episode_id in seen:
            raise EpisodeFormatError(f"{path}: episode {e.episode_id}: field 'episode_id' is duplicated")
        seen.add(e.episode_id)
    gpath = gt_path_for(path)
    if gt and gpath.exists():
        gdata = _load_json(gpath)
        if not isinstance(gdata, dict):
            raise EpisodeFormatError(f"{gpath}: top level must be an object keyed by episode_id")
        for e in episodes:
            if e.episode_id in gdata:
                e.gt = _parse_gt(gdata[e.episode_id], e.episode_id, gpath)
    return episodes


def write_episodes(path: str | Path, episodes: list[Episode], vocab: dict | None = None) -> Path:
    """Write `{split}.json.gz` and, for episodes that carry ground truth, `{split}_gt.json.gz`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict = {"episodes": [e.to_dict() for e in episodes]}
    if vocab is not None:
        doc["instruction_vocab"] = vocab
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(doc, f)
    gts = {e.episode_id: {"locations": [_floats(p) for p in e.gt.locations], "actions": list(e.gt.actions),
                          "forward_steps": int(e.gt.forward_steps)} for e in episodes if e.gt is not None}
    if gts:
        with gzip.open(gt_path_for(path), "wt", encoding="utf-8") as f:
            json.dump(gts, f)
    return path
