"""The simulator interface and the embedded MuJoCo backend.

`Simulator` is what the runner and the oracle see: reset(episode) -> Observation, step(action) ->
Observation, the agent's position/heading, whether the last move collided, and geodesic distances /
shortest paths for the metrics. Two backends implement it: `MujocoSimulator` here (the default,
on the generated scenes) and `omnistream.navigation.habitat_sim.HabitatSimulator`, which builds on this
module (this one never imports it back); `omnistream.navigation.simulators.make_simulator` picks one.

The agent moves kinematically, as in habitat-sim (whose agents move on the navmesh, not by physics):
MOVE_FORWARD 0.25 m, TURN_LEFT/RIGHT 15 degrees. A move into an obstacle slides along it: it is split
into sub-steps and a blocked sub-step keeps its component along the free axis (walls and furniture are
axis-aligned boxes, so this is exactly the projection onto the wall). `collided` reports it.
MuJoCo only renders: a 1.25 m high camera with HFOV 79 degrees (VLN-CE's settings), on the CPU through
`MUJOCO_GL=egl` (Mesa's software renderer) unless MUJOCO_GL is already set (e.g. `osmesa`); where no GL
context can be made (no Mesa libraries), by ray casting (`omnistream.navigation.raycast`, with a warning;
`OMNISTREAM_RENDERER=gl|raycast` forces one).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from omnistream.navigation.agents import ACTIONS, FORWARD_STEP_M, TURN_ANGLE_DEG, Observation
from omnistream.navigation.episodes import Episode
from omnistream.navigation.planner import Planner
from omnistream.navigation.scenes import Scene, load_scene

log = logging.getLogger(__name__)
CAMERA_HEIGHT = 1.25
HFOV_DEG = 79.0
# MuJoCo picks its GL backend when first imported: headless EGL unless the user chose (e.g. osmesa)
os.environ.setdefault("MUJOCO_GL", "egl")


def wrap_angle(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi



def slide_move(free, x: float, z: float, dx: float, dz: float, substeps: int) -> tuple[float, float, int]:
    """Move by ``(dx, dz)`` per sub-step for ``substeps``; a blocked sub-step keeps its free axis
    component (sliding along walls, as habitat-sim's ``allow_sliding``). ``free(x, z)`` says whether
    a point is navigable. Returns the end point and the number of blocked sub-steps."""
    blocked = 0
    for _ in range(substeps):
        if free(x + dx, z + dz):
            x, z = x + dx, z + dz
            continue
        blocked += 1
        if abs(dx) > 1e-9 and free(x + dx, z):
            x += dx
        elif abs(dz) > 1e-9 and free(x, z + dz):
            z += dz
        else:
            break
    return x, z, blocked

class Simulator(ABC):
    """One embodied agent in one scene at a time."""

    width: int
    height: int

    @abstractmethod
    def reset(self, episode: Episode) -> Observation:
        """Load the episode's scene if needed and place the agent at its start pose."""

    @abstractmethod
    def step(self, action: str) -> Observation:
        """Apply one of ACTIONS (STOP leaves the pose unchanged) and observe."""

    @property
    @abstractmethod
    def position(self) -> np.ndarray:
        """(3,) habitat world position of the agent's base."""

    @property
    @abstractmethod
    def heading(self) -> float:
        """Yaw about +y in radians (0 faces -z)."""

    @property
    @abstractmethod
    def collided(self) -> bool:
        """Whether the last step hit an obstacle (and slid or stopped)."""

    @abstractmethod
    def geodesic_distance(self, a, b) -> float:
        """Shortest navigable distance (m) between two points of the current scene."""

    @abstractmethod
    def shortest_path(self, a, b) -> list[np.ndarray] | None:
        """Waypoints of the shortest navigable path a -> b (None if unreachable)."""

    def follower_path(self, a, b) -> list[np.ndarray] | None:
        """The path a shortest-path follower (the oracle) should drive; by default the shortest path."""
        return self.shortest_path(a, b)

    def top_down_map(self) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
        """(free-space grid (rows=z, cols=x) bool, extent (x0, x1, z0, z1)) for plots, if the backend has one."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GridSimulator(Simulator):
    """Kinematics and planning on a generated scene's occupancy grid, without rendering (rgb is (0, 0, 3)).

    Used to record ground-truth trajectories when generating episodes; `MujocoSimulator` adds the camera.
    """

    def __init__(self, scenes_dir: str | Path | None = None, width: int = 0, height: int = 0,
                 forward_step: float = FORWARD_STEP_M, turn_angle_deg: float = TURN_ANGLE_DEG, substeps: int = 5):
        self.scenes_dir = scenes_dir
        self.width, self.height = width, height
        self.forward_step = forward_step
        self.turn = math.radians(turn_angle_deg)
        self.substeps = substeps
        self.scene: Scene | None = None
        self.planner: Planner | None = None
        self._pos = np.zeros(3)
        self._heading = 0.0
        self._collided = False
        self._step = 0

    # -- scene ----------------------------------------------------------------------------------------------
    def _load(self, scene_id: str) -> None:
        if self.scene is None or self.scene.scene_id != scene_id:
            self.scene = load_scene(scene_id, self.scenes_dir)
            self.planner = Planner(self.scene)
            self._on_scene_loaded()

    def _on_scene_loaded(self) -> None:
        pass

    def set_pose(self, position, heading: float) -> None:
        self._pos = np.asarray(position, float).copy()
        self._heading = wrap_angle(float(heading))

    def reset(self, episode: Episode) -> Observation:
        self._load(episode.scene_id)
        self.set_pose(episode.start_position, episode.start_heading)
        self._collided = False
        self._step = 0
        return self._observe()

    def step(self, action: str) -> Observation:
        if self.scene is None:
            raise RuntimeError("Simulator.step called before reset(episode)")
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
        self._collided = False
        if action == "MOVE_FORWARD":
            self._forward()
        elif action == "TURN_LEFT":
            self._heading = wrap_angle(self._heading + self.turn)
        elif action == "TURN_RIGHT":
            self._heading = wrap_angle(self._heading - self.turn)
        self._step += 1
        return self._observe()

    def _forward(self) -> None:
        """Move forward with sliding: blocked sub-steps keep their free axis component."""
        x, y, z = self._pos
        dx = -math.sin(self._heading) * self.forward_step / self.substeps
        dz = -math.cos(self._heading) * self.forward_step / self.substeps
        x, z, blocked = slide_move(self.scene.is_navigable, x, z, dx, dz, self.substeps)
        if blocked:
            self._collided = True
        self._pos = np.array([x, y, z])

    def _render(self) -> np.ndarray:
        return np.zeros((0, 0, 3), np.uint8)

    def _observe(self) -> Observation:
        return Observation(rgb=self._render(), step=self._step, position=self._pos.copy(), heading=self._heading)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def position(self) -> np.ndarray:
        return self._pos.copy()

    @property
    def heading(self) -> float:
        return self._heading

    @property
    def collided(self) -> bool:
        return self._collided

    def geodesic_distance(self, a, b) -> float:
        return self.planner.geodesic_distance(a, b)

    def shortest_path(self, a, b):
        return self.planner.shortest_path(a, b)

    def follower_path(self, a, b):
        return self.planner.follower_path(a, b)

    def top_down_map(self):
        x0, z0, _, _ = self.scene.bounds
        rows, cols = self.scene.grid_shape
        res = self.scene.resolution
        return self.scene.occupancy(), (x0, x0 + cols * res, z0, z0 + rows * res)


def vertical_fov(hfov_deg: float, width: int, height: int) -> float:
    """MuJoCo's fovy (degrees) for a horizontal FOV on a width x height image (square pixels)."""
    return math.degrees(2 * math.atan(math.tan(math.radians(hfov_deg) / 2) * height / width))


def mat_to_quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) -> unit quaternion (w, x, y, z), MuJoCo's order (Shepperd's method)."""
    t = np.trace(m)
    if t > 0:
        s = 2.0 * math.sqrt(1.0 + t)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0] * 4
        q[0] = (m[k, j] - m[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + k] = (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def camera_quat(heading: float) -> np.ndarray:
    """MuJoCo camera orientation (w, x, y, z) for a habitat heading; MuJoCo world = (x, -z, y) of habitat.

    A MuJoCo camera looks along its -z axis with +y up; habitat's forward (-sin h, 0, -cos h) is
    (-sin h, cos h, 0) in MuJoCo, so the camera axes are right = (cos h, sin h, 0), up = (0, 0, 1),
    back = (sin h, -cos h, 0).
    """
    c, s = math.cos(heading), math.sin(heading)
    return mat_to_quat(np.array([[c, 0.0, s], [s, 0.0, -c], [0.0, 1.0, 0.0]]))  # columns: right, up, back


RENDERER_ENV = "OMNISTREAM_RENDERER"  # gl | raycast | unset: GL, else ray casting where GL cannot load


def _mujoco_renderer(model, height: int, width: int, gl_off: str | None = None):
    """The renderer process's renderer for ``model``: MuJoCo's GL ``Renderer``, or where its GL backend
    cannot load (no libEGL / OSMesa: a missing system library; ``gl_off`` says why, if the import
    already knew) :class:`~omnistream.navigation.raycast.RaycastRenderer`. Returns (renderer, None
    for GL or why it is ray casting)."""
    import mujoco

    from omnistream.navigation.raycast import RaycastRenderer

    choice = os.environ.get(RENDERER_ENV, "")
    if choice == "raycast":
        return RaycastRenderer(model, height, width), f"{RENDERER_ENV}=raycast"
    if gl_off:
        return RaycastRenderer(model, height, width), gl_off
    try:
        return mujoco.Renderer(model, height, width), None
    except Exception as e:  # noqa: BLE001 - any GL failure: the ray caster needs none of it
        if choice == "gl":
            raise
        return RaycastRenderer(model, height, width), f"{type(e).__name__}: {e}"


@functools.cache
def _import_mujoco() -> str | None:
    """Import mujoco in the renderer process; where its GL backend fails at import (MUJOCO_GL=egl with
    no libEGL raises AttributeError inside PyOpenGL), import it again with GL off. Returns why GL is
    off, or None (once per process: every later scene load gets the first answer, not a GL retry)."""
    try:
        import mujoco  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001 - the compiled core is loaded; only the GL modules failed
        if os.environ.get(RENDERER_ENV) == "gl":
            raise
        why = f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {type(e).__name__}: {e}"
        os.environ["MUJOCO_GL"] = "disable"
        import mujoco  # noqa: F401
        return why


def render_worker_main() -> None:
    """The renderer process (`python -c` entry): pickled requests on stdin, pickled replies on stdout.

    Requests: ("load", mjcf, width, height, fovy) | ("render", cam_pos, cam_quat) | ("close",).
    Replies: ("ok", value) | ("error", message); a load's value is None (GL) or why the camera ray-casts.
    Stray prints go to stderr so they cannot corrupt replies.
    """
    import pickle
    import signal
    import sys

    # Ctrl-C is the parent's to handle (it closes this process through stdin); a terminal's SIGINT
    # reaching this child too would print a KeyboardInterrupt traceback over the parent's message
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    logging.getLogger("OpenGL").setLevel(logging.WARNING)
    model = data = renderer = None
    cam = 0

    def send(reply) -> None:
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    while True:
        try:
            msg = pickle.load(inp)
        except (EOFError, OSError, pickle.UnpicklingError):  # the simulator went away
            break
        try:
            if msg[0] == "close":
                break
            if msg[0] == "load":
                gl_off = _import_mujoco()
                import mujoco

                _, mjcf, width, height, fovy = msg
                if renderer is not None:
                    renderer.close()
                model = mujoco.MjModel.from_xml_string(mjcf)
                data = mujoco.MjData(model)
                cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "agent")
                model.cam_fovy[cam] = fovy
                renderer, why = _mujoco_renderer(model, height, width, gl_off)
                send(("ok", why))
            elif msg[0] == "render":
                import mujoco

                model.cam_pos[cam], model.cam_quat[cam] = msg[1], msg[2]
                mujoco.mj_kinematics(model, data)
                mujoco.mj_camlight(model, data)
                renderer.update_scene(data, camera=cam)
                send(("ok", renderer.render().copy()))  # (H, W, 3) uint8
        except Exception as e:  # noqa: BLE001 - reported to the simulator, which raises it there
            send(("error", f"{type(e).__name__}: {e}"))
    if renderer is not None:
        renderer.close()


class MujocoSimulator(GridSimulator):
    """The default backend: generated scenes rendered by MuJoCo on the CPU.

    MuJoCo and its GL context live in a child process. Mesa's software GL (llvmpipe) and Triton each
    load their own LLVM; once Mesa's is in a process, importing Triton (which torch does lazily, e.g.
    with torch._dynamo) segfaults. A child renderer keeps the agent's process, model and all, free of GL;
    a frame costs one pipe round trip (~1 ms for 640x480).
    """

    def __init__(self, scenes_dir: str | Path | None = None, width: int = 640, height: int = 480,
                 hfov_deg: float = HFOV_DEG, camera_height: float = CAMERA_HEIGHT, timeout_s: float = 120.0, **kw):
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if os.environ.get(RENDERER_ENV, "") not in ("", "gl", "raycast"):
            raise ValueError(f"{RENDERER_ENV} must be gl or raycast (or unset: GL where it loads), "
                             f"not {os.environ[RENDERER_ENV]!r}")
        super().__init__(scenes_dir, width, height, **kw)
        self.hfov_deg = hfov_deg
        self.camera_height = camera_height
        self.timeout_s = timeout_s
        self._proc = None  # the renderer subprocess, started on the first scene
        self.renderer: str | None = None  # "gl" or "raycast" (no GL context could be made), once a scene loaded

    def _call(self, *msg):
        import pickle
        import select
        import subprocess
        import sys

        if self._proc is None or self._proc.poll() is not None:
            # a fresh interpreter (not multiprocessing: no re-import of the caller's __main__)
            # its own session: a terminal's Ctrl-C goes to the parent only, even while the child is still
            # starting (before it ignores SIGINT itself); the child ends when its stdin closes
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from omnistream.navigation.sim import render_worker_main as m; m()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ}, start_new_session=True)
        try:
            pickle.dump(msg, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
            ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout_s)
            if not ready:
                raise TimeoutError(f"no answer within {self.timeout_s:.0f} s")
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, OSError, TimeoutError, pickle.UnpicklingError) as e:
            code = self._proc.poll()
            self.close()
            raise RuntimeError(f"the MuJoCo renderer process failed ({type(e).__name__}: {e}; exit code {code})") from e
        if status == "error":
            raise RuntimeError(
                f"MuJoCo rendering failed with MUJOCO_GL={os.environ['MUJOCO_GL']}: {value}; without a GPU install "
                "libegl1 libegl-mesa0 libgl1-mesa-dri (EGL) or libosmesa6 and set MUJOCO_GL=osmesa "
                f"(or unset {RENDERER_ENV}: the camera then ray-casts where GL cannot load)")
        return value

    def _on_scene_loaded(self) -> None:
        why = self._call("load", self.scene.to_mjcf(self.width, self.height), self.width, self.height,
                         vertical_fov(self.hfov_deg, self.width, self.height))
        renderer = "gl" if why is None else "raycast"
        if renderer != self.renderer and renderer == "raycast" and os.environ.get(RENDERER_ENV) != "raycast":
            log.warning("MuJoCo's GL renderer is unavailable (%s): the camera ray-casts instead (same scene and "
                        "colours, simpler shading). For GL: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri",
                        why)
        self.renderer = renderer

    def _render(self) -> np.ndarray:
        x, y, z = self._pos
        return self._call("render", (x, -z, y + self.camera_height), camera_quat(self._heading))

    def close(self) -> None:
        if self._proc is not None:
            import subprocess

            try:
                self._proc.stdin.close()  # EOF: the worker's loop ends
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait(5)
            self._proc.stdout.close()
            self._proc = None
        self.scene = None  # a later reset reloads the scene into a new renderer
