"""Planner, simulator kinematics (moves, turns, sliding) and the MuJoCo camera, on hand-built scenes."""

import itertools
import math

import numpy as np
import pytest

from omnistream.navigation.episodes import Episode, Goal, Instruction, heading_to_quat
from omnistream.navigation.planner import Planner, path_length
from omnistream.navigation.scenes import WALL_THICK, Box, Door, Room, Scene
from omnistream.navigation.sim import RENDERER_ENV, GridSimulator, MujocoSimulator, camera_quat, mat_to_quat, vertical_fov

T = WALL_THICK / 2
GREY = (0.8, 0.8, 0.8, 1.0)


def wall(x0, z0, x1, z1):
    return Box("wall", "wall", ((x0 + x1) / 2, 1.3, (z0 + z1) / 2), ((x1 - x0) / 2, 1.3, (z1 - z0) / 2), GREY)


def two_rooms(extra=()):
    """Rooms A = [0,5]x[0,5] and B = [5,10]x[0,5]; the wall x = 5 has a 1 m door at z in [2, 3]."""
    boxes = [wall(-T, -T, 10 + T, T), wall(-T, 5 - T, 10 + T, 5 + T), wall(-T, -T, T, 5 + T),
             wall(10 - T, -T, 10 + T, 5 + T), wall(5 - T, -T, 5 + T, 2.0), wall(5 - T, 3.0, 5 + T, 5 + T), *extra]
    rooms = [Room("office", 0, 0, 5, 5), Room("kitchen", 5, 0, 10, 5)]
    doors = [Door(5.0, 2.5, "z", ("office", "kitchen"))]
    return Scene("test/two_rooms.glb", 0, rooms, doors, boxes, (-T, -T, 10 + T, 5 + T))


def episode(scene, start, heading, goal=(9.0, 0.0, 1.0)):
    return Episode("1", 1, scene.scene_id, np.array(start, float), heading_to_quat(heading), 1.0,
                   [Goal(np.array(goal, float))], [], Instruction("go"))


def grid_sim(scene):
    sim = GridSimulator()
    sim._load = lambda scene_id: None  # the hand-built scene is not on disk
    sim.scene, sim.planner = scene, Planner(scene)
    return sim


def test_geodesic_straight_line_in_open_room():
    p = Planner(two_rooms())
    a, b = np.array([1.0, 0.0, 1.0]), np.array([4.0, 0.0, 4.5])
    assert p.geodesic_distance(a, b) == pytest.approx(np.linalg.norm(b - a), abs=0.01)
    assert len(p.shortest_path(a, b)) == 2  # string-pulled to one segment


def test_geodesic_through_door_hand_computed():
    # A = (2.5, 1) to B = (7.5, 1) must wrap the two door-post corners C1 = (4.94, 2), C2 = (5.06, 2),
    # inflated by the agent radius r = 0.18: tangent from A to the circle around C1 sqrt(d^2 - r^2) with
    # d = |A - C1| = sqrt(2.44^2 + 1), arc 0.457 rad on each circle, 0.12 m across the wall:
    # 2 * 2.6308 + 2 * 0.18 * 0.457 + 0.12 = 5.546 m (straight line: 5.0 m).
    p = Planner(two_rooms())
    d = p.geodesic_distance([2.5, 0, 1.0], [7.5, 0, 1.0])
    assert d == pytest.approx(5.546, abs=0.06)
    path = p.shortest_path([2.5, 0, 1.0], [7.5, 0, 1.0])
    assert all(2.0 < q[2] < 3.0 for q in path[1:-1])  # the waypoints are in the doorway


def test_follower_path_keeps_clear_of_corners():
    p = Planner(two_rooms())
    a, b = [2.5, 0, 1.0], [7.5, 0, 1.0]
    exact, comfy = p.shortest_path(a, b), p.follower_path(a, b)
    # every point of the follower path (ends aside) keeps radius + margin = 0.28 m from the door posts
    pts = [np.asarray(x)[[0, 2]] for x in comfy]
    for u, v in itertools.pairwise(pts):
        for t in np.linspace(0, 1, 50):
            q = u + (v - u) * t
            for corner in ((5 - T, 2.0), (5 + T, 2.0), (5 - T, 3.0), (5 + T, 3.0)):
                assert np.hypot(*(q - corner)) > 0.28 - 0.05
    assert path_length(exact) < path_length(comfy) < 1.03 * path_length(exact)


def test_follower_path_avoids_a_slot_it_barely_fits():
    # the wall x = 5 has a wide door at z in [3.5, 4.5] and a 0.45 m slot at z in [0.6, 1.05] (2 cells of
    # navigable width for a 0.18 m radius): the shortest path threads the slot, the follower takes the door
    boxes = [wall(-T, -T, 10 + T, T), wall(-T, 5 - T, 10 + T, 5 + T), wall(-T, -T, T, 5 + T),
             wall(10 - T, -T, 10 + T, 5 + T), wall(5 - T, -T, 5 + T, 0.6), wall(5 - T, 1.05, 5 + T, 3.5),
             wall(5 - T, 4.5, 5 + T, 5 + T)]
    doors = [Door(5.0, 4.0, "z", ("office", "kitchen")), Door(5.0, 0.825, "z", ("office", "kitchen"), 0.45)]
    scene = Scene("test/slot.glb", 0, [Room("office", 0, 0, 5, 5), Room("kitchen", 5, 0, 10, 5)], doors, boxes,
                  (-T, -T, 10 + T, 5 + T))
    p = Planner(scene)
    a, b = [2.5, 0, 0.8], [7.5, 0, 0.8]
    assert p.geodesic_distance(a, b) == pytest.approx(5.0, abs=0.05)  # straight through the slot
    comfy = p.follower_path(a, b)
    assert max(q[2] for q in comfy) > 3.5  # via the door
    assert path_length(comfy) == pytest.approx(2 * math.hypot(2.5, 3.2), rel=0.05)


def test_unreachable_and_snapping():
    closed = two_rooms([wall(5 - T, 2.0, 5 + T, 3.0)])  # door bricked up
    p = Planner(closed)
    assert p.shortest_path([2.5, 0, 1.0], [7.5, 0, 1.0]) is None
    assert p.geodesic_distance([2.5, 0, 1.0], [7.5, 0, 1.0]) == math.inf
    # a goal inside the wall (nearer its room-A face) snaps to the nearest free cell, at radius from the face
    assert Planner(two_rooms()).geodesic_distance([2.5, 0, 1.0], [4.97, 0, 1.0]) == pytest.approx(
        5 - T - 0.18 - 2.5, abs=0.06)


def test_forward_and_turns():
    scene = two_rooms()
    sim = grid_sim(scene)
    obs = sim.reset(episode(scene, [2.5, 0, 2.5], 0.0))
    assert obs.step == 0 and obs.heading == 0.0
    for _ in range(4):
        obs = sim.step("MOVE_FORWARD")
    assert np.allclose(sim.position, [2.5, 0, 1.5]) and not sim.collided  # heading 0 faces -z
    for _ in range(6):
        sim.step("TURN_LEFT")
    assert sim.heading == pytest.approx(math.pi / 2)
    sim.step("MOVE_FORWARD")
    assert np.allclose(sim.position, [2.25, 0, 1.5])  # left of -z is -x
    for _ in range(24):
        sim.step("TURN_RIGHT")
    assert sim.heading == pytest.approx(math.pi / 2)
    sim.step("STOP")
    assert np.allclose(sim.position, [2.25, 0, 1.5]) and sim.step("STOP").step == 37
    with pytest.raises(ValueError, match="unknown action"):
        sim.step("JUMP")


def test_collision_and_sliding():
    scene = two_rooms()
    sim = grid_sim(scene)
    # head-on into the wall z = 0: stops at the agent radius from its face, collided
    sim.reset(episode(scene, [2.5, 0, 1.0], 0.0))
    for _ in range(8):
        sim.step("MOVE_FORWARD")
    assert sim.collided
    assert 0.0 < sim.position[2] - (T + scene.agent_radius) < 0.06 and sim.position[0] == pytest.approx(2.5)
    # 45 degrees into the same wall: slides along it (x keeps changing by 0.25 * sin 45 per step)
    sim.reset(episode(scene, [2.5, 0, 1.0], math.pi / 4))
    xs = []
    for _ in range(8):
        sim.step("MOVE_FORWARD")
        xs.append(sim.position[0])
        assert scene.is_navigable(sim.position[0], sim.position[2])
    assert sim.collided
    assert xs[-1] - xs[-2] == pytest.approx(-0.25 * math.sin(math.pi / 4), abs=1e-6)
    assert xs[-1] == pytest.approx(2.5 - 8 * 0.25 * math.sin(math.pi / 4), abs=1e-6)


def test_step_before_reset():
    with pytest.raises(RuntimeError, match="before reset"):
        GridSimulator().step("MOVE_FORWARD")


def test_vertical_fov_and_camera_axes():
    assert vertical_fov(79.0, 640, 480) == pytest.approx(63.45, abs=0.01)  # 2 atan(tan(39.5 deg) * 3/4)
    from scipy.spatial.transform import Rotation

    for h in (-2.5, 0.0, 0.3, math.pi):
        w, x, y, z = camera_quat(h)
        mat = Rotation.from_quat([x, y, z, w]).as_matrix()  # scipy: (x, y, z, w)
        forward_mj = -mat[:, 2]  # a MuJoCo camera looks along -z; habitat (x, y, z) -> MuJoCo (x, -z, y)
        assert np.allclose(forward_mj, [-math.sin(h), math.cos(h), 0.0])
        assert np.allclose(mat[:, 1], [0, 0, 1])  # image up = world up
    for r in Rotation.random(20, random_state=0):  # every branch of Shepperd's method
        q = mat_to_quat(r.as_matrix())
        assert np.allclose(Rotation.from_quat([*q[1:], q[0]]).as_matrix(), r.as_matrix())


def red_fraction(img):
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return float(((r > 120) & (g < 80) & (b < 80)).mean())


@pytest.mark.parametrize("renderer", ["default", "raycast"])
def test_mujoco_camera_sees_what_is_ahead_and_to_the_side(renderer, monkeypatch):
    if renderer == "raycast":  # (the GL-free camera, tests/test_raycast.py)
        monkeypatch.setenv(RENDERER_ENV, "raycast")
    red = Box("red sofa", "furniture", (2.5, 0.5, 0.8), (0.6, 0.5, 0.3), (0.9, 0.05, 0.05, 1.0), "office")
    scene = two_rooms([red])
    sim = MujocoSimulator(width=64, height=48)
    sim._load = lambda scene_id: None
    sim.scene, sim.planner = scene, Planner(scene)
    sim._on_scene_loaded()
    try:
        assert renderer == "default" or sim.renderer == "raycast"
        obs = sim.reset(episode(scene, [2.5, 0, 3.0], 0.0))  # facing -z, the sofa 2 m ahead
        assert obs.rgb.shape == (48, 64, 3) and obs.rgb.dtype == np.uint8
        assert red_fraction(obs.rgb[:, 24:40]) > 0.2  # in the middle of the image
        for _ in range(12):
            obs = sim.step("TURN_LEFT")  # facing +z: the sofa is behind
        assert red_fraction(obs.rgb) == 0.0
        for _ in range(9):
            obs = sim.step("TURN_RIGHT")  # 45 degrees left of the sofa's bearing -> it is on the right
        assert red_fraction(obs.rgb[:, 32:]) > red_fraction(obs.rgb[:, :32])
        for _ in range(6):
            obs = sim.step("TURN_RIGHT")  # now 45 degrees to the right of it -> on the left
        assert red_fraction(obs.rgb[:, :32]) > red_fraction(obs.rgb[:, 32:])
    finally:
        sim.close()


def test_habitat_backend_reports_missing_install():
    try:
        import habitat_sim  # noqa: F401
    except ImportError:
        from omnistream.navigation.habitat_sim import HabitatSimulator

        with pytest.raises(ImportError, match="habitat-sim is not installed"):
            HabitatSimulator()
    else:
        pytest.skip("habitat-sim is installed; see test_habitat_backend_settings")


def test_habitat_backend_settings(tmp_path):
    pytest.importorskip("habitat_sim", reason="habitat-sim is not installed (not on PyPI; cannot be installed here)")
    from omnistream.navigation.habitat_sim import HabitatSimulator
    from omnistream.navigation.scenes import generate_scene

    scene = generate_scene(0)
    scene.save(tmp_path)
    sim = HabitatSimulator(tmp_path, 64, 48)
    cfg = sim._config(tmp_path / scene.scene_id)
    spec = cfg.agents[0].sensor_specifications[0]
    assert list(spec.resolution) == [48, 64] and float(spec.hfov) == pytest.approx(79.0)
    assert cfg.sim_cfg.allow_sliding
    assert cfg.agents[0].action_space["move_forward"].actuation.amount == 0.25
    assert cfg.agents[0].action_space["turn_left"].actuation.amount == 15.0


def _imports(module) -> set[str]:
    """Every module a source file imports, at the top or inside a function."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(module.__file__).read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_simulator_layers_point_one_way():
    """sim <- habitat_sim <- simulators: the interface module never imports a backend built on it (it used to
    import habitat_sim inside its factory while habitat_sim imported it: a circle)."""
    import omnistream.navigation.habitat_sim as habitat_mod
    import omnistream.navigation.sim as sim_mod
    import omnistream.navigation.simulators as factory
    from omnistream.navigation.simulators import make_simulator

    assert not {m for m in _imports(sim_mod) if m.startswith("omnistream.navigation.")} & {
        "omnistream.navigation.habitat_sim", "omnistream.navigation.simulators"}
    assert "omnistream.navigation.simulators" not in _imports(habitat_mod)
    assert {"omnistream.navigation.sim", "omnistream.navigation.habitat_sim"} <= _imports(factory)
    assert isinstance(make_simulator("grid"), GridSimulator)
    with pytest.raises(ValueError, match="unknown simulator 'unity'"):
        make_simulator("unity")
