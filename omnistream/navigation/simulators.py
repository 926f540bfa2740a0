"""Choose a simulator backend by name: the one module that knows every backend.

The layers point one way: ``sim`` (the `Simulator` interface, the grid and MuJoCo backends) knows no
other backend; ``habitat_sim`` builds on ``sim``; this factory sits above both, so nothing below it
imports back up (``sim`` used to import ``habitat_sim`` inside its factory while ``habitat_sim``
imported ``sim``: a circle). habitat-sim itself is imported only when that backend is asked for.
"""

from __future__ import annotations

from omnistream.navigation.sim import GridSimulator, MujocoSimulator, Simulator

SIMULATORS = ("mujoco", "habitat", "grid")


def make_simulator(kind: str, scenes_dir=None, width: int = 640, height: int = 480) -> Simulator:
    """'mujoco' (default, generated scenes rendered on the CPU), 'habitat' (needs habitat-sim installed) or
    'grid' (the generated scene's kinematics without a camera)."""
    if kind == "mujoco":
        return MujocoSimulator(scenes_dir, width, height)
    if kind == "habitat":
        from omnistream.navigation.habitat_sim import HabitatSimulator

        return HabitatSimulator(scenes_dir, width, height)
    if kind == "grid":
        return GridSimulator(scenes_dir, width, height)
    raise ValueError(f"unknown simulator {kind!r}; expected {', '.join(SIMULATORS)}")
