"""The GL-free camera (omnistream/navigation/raycast.py) against MuJoCo's own GL renderer, and the
simulator's fall-back to it where no GL context can be made."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from omnistream.navigation.planner import Planner
from omnistream.navigation.scenes import generate_scene
from omnistream.navigation.sim import RENDERER_ENV, MujocoSimulator

# Both renderers on the same poses, in a child process: Mesa's GL and Triton must not share one (sim.py).
COMPARE = r"""
import json, sys
import numpy as np
try:
    import mujoco
except Exception as e:  # MUJOCO_GL=egl without Mesa's EGL fails at import
    print(json.dumps({"skip": f"no GL renderer here: {type(e).__name__}: {e}"[:200]}))
    sys.exit(0)
from omnistream.navigation.raycast import RaycastRenderer
from omnistream.navigation.scenes import generate_scene
from omnistream.navigation.sim import camera_quat, vertical_fov

W, H = 160, 120
out = []
for seed in (0, 1):
    scene = generate_scene(seed)
    m = mujoco.MjModel.from_xml_string(scene.to_mjcf(W, H))
    d = mujoco.MjData(m)
    cam = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, "agent")
    m.cam_fovy[cam] = vertical_fov(79.0, W, H)
    try:
        gl = mujoco.Renderer(m, H, W)
    except Exception as e:
        print(json.dumps({"skip": f"no GL renderer here: {type(e).__name__}: {e}"[:200]}))
        sys.exit(0)
    seg = mujoco.Renderer(m, H, W)
    seg.enable_segmentation_rendering()
    rc = RaycastRenderer(m, H, W)
    for room in scene.rooms[:3]:
        cx, cz = room.center
        for heading in (0.0, 1.6, 3.1, 4.7):
            m.cam_pos[cam], m.cam_quat[cam] = (cx, -cz, 1.25), camera_quat(heading)
            mujoco.mj_kinematics(m, d)
            mujoco.mj_camlight(m, d)
            for r in (gl, seg, rc):
                r.update_scene(d, camera=cam)
            a, b, s = gl.render(), rc.render(), seg.render()
            ids = np.where(s[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM), s[..., 0], -1)
            out.append({"same_geom": float((ids == rc.segmentation()).mean()),
                        "rgb_mean_abs": float(np.abs(a.astype(int) - b).mean()),
                        "geoms": int(len(np.unique(ids)))})
print(json.dumps({"poses": out}))
"""


def test_raycast_sees_what_mujocos_gl_renderer_sees():
    """The oracle is MuJoCo's GL renderer on the same model and pose: its segmentation mode says which
    geom each pixel shows, its colour image how the scene is lit."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", RENDERER_ENV)} | {"MUJOCO_GL": "egl"}
    res = subprocess.run([sys.executable, "-c", COMPARE], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in r:
        pytest.skip(r["skip"])
    poses = r["poses"]
    assert len(poses) >= 12 and sum(p["geoms"] >= 3 for p in poses) >= len(poses) // 2  # most see several objects
    for p in poses:
        assert p["same_geom"] >= 0.98, p  # the same object at every pixel but the edges
        assert p["rgb_mean_abs"] <= 3.0, p  # lit alike (of 255)


def _small_sim():
    scene = generate_scene(0)
    sim = MujocoSimulator(width=64, height=48)
    sim._load = lambda scene_id: None
    sim.scene, sim.planner = scene, Planner(scene)
    return sim


@pytest.mark.skipif(bool(ctypes.util.find_library("OSMesa")), reason="OSMesa is installed: MUJOCO_GL=osmesa works here")
def test_simulator_ray_casts_where_gl_cannot_load(monkeypatch, caplog):
    """MUJOCO_GL=osmesa without libOSMesa is a GL backend that cannot load (as egl without Mesa's EGL on a
    fresh machine): the camera still works, by ray casting, and says so once, with what to install."""
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.delenv(RENDERER_ENV, raising=False)
    sim = _small_sim()
    try:
        with caplog.at_level("WARNING", logger="omnistream.navigation.sim"):
            sim._on_scene_loaded()
            sim._on_scene_loaded()  # (a second scene: no second warning)
        assert sim.renderer == "raycast"
        warned = [r.getMessage() for r in caplog.records if "ray-casts" in r.getMessage()]
        assert len(warned) == 1 and "osmesa" in warned[0] and "apt-get install" in warned[0]
        img = sim._render()
        assert img.shape == (48, 64, 3) and img.std() > 0  # a picture, not a blank
    finally:
        sim.close()


@pytest.mark.skipif(bool(ctypes.util.find_library("OSMesa")), reason="OSMesa is installed: MUJOCO_GL=osmesa works here")
def test_gl_forced_where_it_cannot_load_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setenv(RENDERER_ENV, "gl")
    sim = _small_sim()
    try:
        with pytest.raises(RuntimeError, match="MUJOCO_GL=osmesa.*libegl1") as e:
            sim._on_scene_loaded()
        assert "\n" not in str(e.value)
    finally:
        sim.close()


def test_unknown_renderer_choice_is_refused_before_any_process(monkeypatch):
    monkeypatch.setenv(RENDERER_ENV, "vulkan")
    with pytest.raises(ValueError, match="OMNISTREAM_RENDERER must be gl or raycast.*'vulkan'"):
        MujocoSimulator(width=64, height=48)
