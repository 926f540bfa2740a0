"""VLN-CE episode files (read/write/malformed) and generated scenes + episodes."""

import copy
import gzip
import itertools
import json
import math

import numpy as np
import pytest

from omnistream.navigation.episodes import (
    EpisodeFormatError,
    gt_path_for,
    heading_to_quat,
    quat_to_heading,
    read_episodes,
    write_episodes,
)
from omnistream.navigation.episodes_gen import GOAL_RADIUS, MAX_GEODESIC, MIN_GEODESIC, make_dataset, tokenize
from omnistream.navigation.planner import Planner, path_length
from omnistream.navigation.scenes import generate_scene, load_scene

# One episode laid out as VLN-CE's R2R-CE val_seen.json.gz has it (tokens padded with 0, vocab at top level).
R2R_CE_EPISODE = {
    "episode_id": 5, "trajectory_id": 3447, "scene_id": "mp3d/8WUmhLawc2A/8WUmhLawc2A.glb",
    "start_position": [-10.1, 0.17, 4.3], "start_rotation": [0, 0.9659258, 0, 0.258819],
    "info": {"geodesic_distance": 9.64},
    "goals": [{"position": [-3.3, 0.17, 1.2], "radius": 3.0}],
    "reference_path": [[-10.1, 0.17, 4.3], [-7.0, 0.17, 2.9], [-3.3, 0.17, 1.2]],
    "instruction": {"instruction_text": "Walk out of the bedroom and stop at the top of the stairs.",
                    "instruction_tokens": [2384, 1581, 1540, 2202, 0, 0, 0]},
}


def write_raw(path, episodes, gt=None):
    with gzip.open(path, "wt") as f:
        json.dump({"episodes": episodes, "instruction_vocab": {"word_list": []}}, f)
    if gt is not None:
        with gzip.open(gt_path_for(path), "wt") as f:
            json.dump(gt, f)
    return path


def test_reads_vln_ce_layout(tmp_path):
    gt = {"5": {"locations": [[-10.1, 0.17, 4.3], [-9.9, 0.17, 4.2]], "actions": [1, 0], "forward_steps": 1}}
    eps = read_episodes(write_raw(tmp_path / "val_seen.json.gz", [R2R_CE_EPISODE], gt))
    (e,) = eps
    assert e.episode_id == "5" and e.trajectory_id == 3447 and e.scene_id.endswith("8WUmhLawc2A.glb")
    assert e.geodesic_distance == pytest.approx(9.64)
    assert e.goals[0].radius == 3.0 and np.allclose(e.goals[0].position, [-3.3, 0.17, 1.2])
    assert len(e.reference_path) == 3
    assert e.instruction.instruction_tokens[:4] == [2384, 1581, 1540, 2202]
    assert e.gt.forward_steps == 1 and e.gt.actions == [1, 0] and len(e.gt.locations) == 2
    # yaw of (0, sin(h/2), 0, cos(h/2)) with sin(h/2) = 0.9659 -> h = 150 degrees
    assert math.degrees(e.start_heading) == pytest.approx(150.0, abs=1e-3)


def test_roundtrip(tmp_path):
    eps = read_episodes(write_raw(tmp_path / "a.json.gz", [R2R_CE_EPISODE]))
    assert eps[0].gt is None
    out = write_episodes(tmp_path / "b.json.gz", eps)
    again = read_episodes(out)
    assert again[0].to_dict() == eps[0].to_dict()
    with gzip.open(out, "rt") as f:
        assert json.load(f)["episodes"][0]["episode_id"] == 5  # ids stay ints


def test_heading_quaternion():
    for h in np.linspace(-3.1, 3.1, 13):
        assert quat_to_heading(heading_to_quat(h)) == pytest.approx(h)
    q = heading_to_quat(math.pi / 2)  # a quarter turn left: forward (-sin h, 0, -cos h) = -x
    assert np.allclose(q, [0, math.sqrt(0.5), 0, math.sqrt(0.5)])


def _mutate(path, value):
    """A copy of the R2R-CE episode with the field at `path` (dotted, list indices as ints) replaced/deleted."""
    ep = copy.deepcopy(R2R_CE_EPISODE)
    *head, last = path
    d = ep
    for k in head:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return ep


@pytest.mark.parametrize(("path", "value", "field"), [
    (["goals"], KeyError, "goals"),
    (["goals"], [], "goals"),
    (["goals", 0, "position"], "here", "goals[0].position"),
    (["start_rotation"], [0, 1, 0], "start_rotation"),
    (["start_rotation"], [0, 2, 0, 0], "start_rotation"),
    (["start_position", 1], None, "start_position[1]"),
    (["info"], {}, "info.geodesic_distance"),
    (["info", "geodesic_distance"], float("nan"), "info.geodesic_distance"),
    (["instruction", "instruction_text"], KeyError, "instruction.instruction_text"),
    (["instruction", "instruction_tokens"], ["walk"], "instruction.instruction_tokens"),
    (["reference_path", 1], [1, 2], "reference_path[1]"),
    (["scene_id"], "", "scene_id"),
    (["trajectory_id"], "x", "trajectory_id"),
])
def test_malformed_episode_names_episode_and_field(tmp_path, path, value, field):
    f = write_raw(tmp_path / "bad.json.gz", [R2R_CE_EPISODE | {"episode_id": 4}, _mutate(path, value)])
    with pytest.raises(EpisodeFormatError) as ei:
        read_episodes(f)
    msg = str(ei.value)
    assert "episode 5" in msg and repr(field) in msg and "bad.json.gz" in msg


def test_malformed_files(tmp_path):
    p = tmp_path / "x.json.gz"
    p.write_bytes(b"not gzip")
    with pytest.raises(EpisodeFormatError, match="not a valid gzipped JSON"):
        read_episodes(p)
    with gzip.open(p, "wt") as f:
        json.dump({"data": []}, f)
    with pytest.raises(EpisodeFormatError, match="'episodes' list"):
        read_episodes(p)
    write_raw(p, [R2R_CE_EPISODE, R2R_CE_EPISODE])
    with pytest.raises(EpisodeFormatError, match="episode 5: field 'episode_id' is duplicated"):
        read_episodes(p)
    write_raw(p, [R2R_CE_EPISODE], {"5": {"locations": [[0, 0, 0]], "actions": [7], "forward_steps": 0}})
    with pytest.raises(EpisodeFormatError, match=r"x_gt.json.gz: episode 5: field 'actions'"):
        read_episodes(p)
    with pytest.raises(FileNotFoundError):
        read_episodes(tmp_path / "missing.json.gz")


# ---- generated scenes and episodes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("navds")
    return out, make_dataset(out, n_scenes=2, episodes_per_scene=3, seed=1)


def test_generated_episodes_are_consistent(dataset):
    out, path = dataset
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    vocab = doc["instruction_vocab"]["word_list"]
    eps = read_episodes(path)
    assert len(eps) == 6
    planners = {}
    for e in eps:
        scene = load_scene(e.scene_id, out / "scenes")
        planner = planners.setdefault(e.scene_id, Planner(scene))
        start, goal = e.start_position, e.goals[0].position
        assert e.goals[0].radius == GOAL_RADIUS
        assert MIN_GEODESIC <= e.geodesic_distance <= MAX_GEODESIC
        # reference path: from start to goal through free space, keeping clear of corners, so a little
        # longer than the geodesic distance (the taut shortest path)
        assert np.allclose(e.reference_path[0], start) and np.allclose(e.reference_path[-1], goal)
        ref_len = path_length(e.reference_path)
        assert e.geodesic_distance - 1e-6 <= ref_len <= 1.1 * e.geodesic_distance
        for a, b in itertools.pairwise(e.reference_path):
            assert planner.line_of_sight((a[0], a[2]), (b[0], b[2]))
        # geodesic >= straight line, and the planner agrees when asked again
        assert e.geodesic_distance >= np.linalg.norm(goal - start) - 1e-6
        assert planner.geodesic_distance(start, goal) == pytest.approx(e.geodesic_distance, rel=1e-6)
        # ground truth: starts at the start, one location per move, ends within the success radius
        assert np.allclose(e.gt.locations[0], start) and e.gt.actions[-1] == 0
        assert len(e.gt.locations) == len(e.gt.actions)
        assert e.gt.forward_steps == e.gt.actions.count(1)
        assert planner.geodesic_distance(e.gt.locations[-1], goal) < GOAL_RADIUS
        # instruction tokens decode back to the text
        assert [vocab[t] for t in e.instruction.instruction_tokens] == tokenize(e.instruction.instruction_text)
        assert e.instruction.instruction_text.endswith(".")


def test_scene_files_written(dataset):
    out, path = dataset
    e = read_episodes(path)[0]
    glb = out / "scenes" / e.scene_id
    head = glb.read_bytes()[:12]
    assert head[:4] == b"glTF" and int.from_bytes(head[4:8], "little") == 2  # binary glTF 2.0
    assert "<mujoco" in glb.with_suffix(".xml").read_text()
    import trimesh

    mesh = trimesh.load(glb, force="mesh")  # y up: floor just below 0, ceiling at the wall height
    assert mesh.bounds[0][1] == pytest.approx(-0.05) and mesh.bounds[1][1] == pytest.approx(2.65)
    saved = load_scene(e.scene_id, out / "scenes")
    assert saved.to_dict() == load_scene(e.scene_id).to_dict()  # JSON == regenerated from the seed


def test_generated_scene_is_connected_and_furnished():
    from scipy import ndimage

    for seed in range(4):
        s = generate_scene(seed)
        assert len(s.rooms) >= 2 and len(s.doors) >= len(s.rooms) - 1
        labels, _ = ndimage.label(s.navigable())
        sizes = np.bincount(labels.ravel())[1:]
        assert sizes.max() > 0.95 * s.navigable().sum()  # one free-space component (slivers aside)
        for d in s.doors:
            assert s.is_navigable(d.x, d.z)
        names = [b.name for b in s.furniture]
        assert len(names) >= len(s.rooms) and len(set(names)) == len(names)
        colour_words = {n.split()[0] for n in names}
        assert len(colour_words) >= 2


def test_load_scene_unknown_id():
    with pytest.raises(FileNotFoundError, match="not a generated omnistream scene"):
        load_scene("mp3d/abc/abc.glb")
