"""habitat-sim backend: the settings JanusVLN and StreamVLN evaluate VLN-CE with.

640x480 RGB, HFOV 79 degrees, camera 1.25 m above the agent's base, MOVE_FORWARD 0.25 m, turns 15
degrees, sliding along walls on, success radius 3 m (the episodes' goal radius), 500 steps (the
runner's default). Rendering goes to `gpu_device_id` (-1 asks for no CUDA device, for builds that can
render on the CPU). Scenes are `scenes_dir / episode.scene_id` (.glb, e.g. MP3D's or the ones
`omnistream nav make-episodes` exports); without a .navmesh next to it the navmesh is computed for the
agent's radius/height.

Written against habitat-sim's documented Python API (`habitat_sim.SimulatorConfiguration`,
`agent.AgentConfiguration`, `CameraSensorSpec`, `ActionSpec/ActuationSpec`, `pathfinder.find_path`).
habitat-sim is not installable from PyPI (conda or a source build only), so this module imports it
lazily and says so when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from omnistream.navigation.agents import FORWARD_STEP_M, TURN_ANGLE_DEG, Observation
from omnistream.navigation.episodes import Episode, quat_to_heading
from omnistream.navigation.scenes import AGENT_RADIUS
from omnistream.navigation.sim import CAMERA_HEIGHT, HFOV_DEG, Simulator

AGENT_HEIGHT = 1.5
_ACTIONS = {"MOVE_FORWARD": "move_forward", "TURN_LEFT": "turn_left", "TURN_RIGHT": "turn_right"}


def import_habitat_sim():
    try:
        import habitat_sim
    except ImportError as e:
        raise ImportError(
            "habitat-sim is not installed (it is not on PyPI: `conda install habitat-sim -c conda-forge -c aihabitat` "
            "or build it from source); use --sim mujoco for the embedded simulator") from e
    return habitat_sim


class HabitatSimulator(Simulator):
    """A thin wrapper over one habitat_sim.Simulator, re-created when the episode's scene changes."""

    def __init__(self, scenes_dir: str | Path | None = None, width: int = 640, height: int = 480,
                 hfov_deg: float = HFOV_DEG, camera_height: float = CAMERA_HEIGHT, gpu_device_id: int = -1,
                 agent_radius: float = AGENT_RADIUS, agent_height: float = AGENT_HEIGHT):
        self.hs = import_habitat_sim()
        self.scenes_dir = Path(scenes_dir) if scenes_dir else Path(".")
        self.width, self.height = width, height
        self.hfov_deg, self.camera_height = hfov_deg, camera_height
        self.gpu_device_id = gpu_device_id
        self.agent_radius, self.agent_height = agent_radius, agent_height
        self._sim = None
        self._scene_id: str | None = None
        self._step = 0
        self._collided = False

    def _config(self, scene_path: Path):
        hs = self.hs
        backend = hs.SimulatorConfiguration()
        backend.scene_id = str(scene_path)
        backend.allow_sliding = True
        backend.enable_physics = False
        if hasattr(backend, "gpu_device_id"):
            backend.gpu_device_id = self.gpu_device_id
        rgb = hs.CameraSensorSpec()
        rgb.uuid = "rgb"
        rgb.sensor_type = hs.SensorType.COLOR
        rgb.resolution = [self.height, self.width]
        rgb.position = [0.0, self.camera_height, 0.0]
        rgb.hfov = self.hfov_deg
        agent = hs.agent.AgentConfiguration()
        agent.height, agent.radius = self.agent_height, self.agent_radius
        agent.sensor_specifications = [rgb]
        agent.action_space = {
            "move_forward": hs.agent.ActionSpec("move_forward", hs.agent.ActuationSpec(amount=FORWARD_STEP_M)),
            "turn_left": hs.agent.ActionSpec("turn_left", hs.agent.ActuationSpec(amount=TURN_ANGLE_DEG)),
            "turn_right": hs.agent.ActionSpec("turn_right", hs.agent.ActuationSpec(amount=TURN_ANGLE_DEG)),
        }
        return hs.Configuration(backend, [agent])

    def _load(self, scene_id: str) -> None:
        if self._sim is not None and self._scene_id == scene_id:
            return
        path = self.scenes_dir / scene_id
        if not path.exists():
            raise FileNotFoundError(f"scene {path} does not exist (scene_id {scene_id!r} under {self.scenes_dir})")
        self.close()
        self._sim = self.hs.Simulator(self._config(path))
        if not self._sim.pathfinder.is_loaded:  # no .navmesh shipped with the scene: build one for this agent
            settings = self.hs.NavMeshSettings()
            settings.set_defaults()
            settings.agent_radius, settings.agent_height = self.agent_radius, self.agent_height
            self._sim.recompute_navmesh(self._sim.pathfinder, settings)
        self._scene_id = scene_id

    def reset(self, episode: Episode) -> Observation:
        from habitat_sim.utils.common import quat_from_coeffs

        self._load(episode.scene_id)
        state = self.hs.AgentState()
        state.position = np.asarray(episode.start_position, np.float32)
        state.rotation = quat_from_coeffs(np.asarray(episode.start_rotation, float))  # (x, y, z, w)
        self._sim.get_agent(0).set_state(state)
        self._step = 0
        self._collided = False
        return self._observe(self._sim.get_sensor_observations())

    def step(self, action: str) -> Observation:
        if self._sim is None:
            raise RuntimeError("Simulator.step called before reset(episode)")
        if action == "STOP":
            self._collided = False
            obs = self._sim.get_sensor_observations()
        elif action in _ACTIONS:
            obs = self._sim.step(_ACTIONS[action])
            self._collided = bool(self._sim.previous_step_collided)
        else:
            raise ValueError(f"unknown action {action!r}")
        self._step += 1
        return self._observe(obs)

    def _observe(self, obs: dict) -> Observation:
        rgb = np.asarray(obs["rgb"])[..., :3].astype(np.uint8)  # RGBA -> (H, W, 3)
        return Observation(rgb=rgb, step=self._step, position=self.position, heading=self.heading)

    @property
    def position(self) -> np.ndarray:
        return np.asarray(self._sim.get_agent(0).get_state().position, float)

    @property
    def heading(self) -> float:
        from habitat_sim.utils.common import quat_to_coeffs

        return quat_to_heading(quat_to_coeffs(self._sim.get_agent(0).get_state().rotation))

    @property
    def collided(self) -> bool:
        return self._collided

    def _path(self, a, b):
        path = self.hs.ShortestPath()
        path.requested_start = np.asarray(a, np.float32)
        path.requested_end = np.asarray(b, np.float32)
        found = self._sim.pathfinder.find_path(path)
        return found, path

    def geodesic_distance(self, a, b) -> float:
        found, path = self._path(a, b)
        return float(path.geodesic_distance) if found else float("inf")

    def shortest_path(self, a, b):
        found, path = self._path(a, b)
        return [np.asarray(p, float) for p in path.points] if found else None

    def top_down_map(self):
        lower, _upper = self._sim.pathfinder.get_bounds()
        mpp = 0.05
        grid = np.asarray(self._sim.pathfinder.get_topdown_view(mpp, float(self.position[1])), bool)  # (z, x)
        return grid, (float(lower[0]), float(lower[0]) + grid.shape[1] * mpp,
                      float(lower[2]), float(lower[2]) + grid.shape[0] * mpp)

    def close(self) -> None:
        if self._sim is not None:
            self._sim.close()
            self._sim = None
            self._scene_id = None
