"""Navigation agents: the interface every agent implements, and two baselines.

The runner talks to agents only through `Agent.reset(episode)` and `Agent.act(obs) -> action`, so a
model-backed agent (JanusVLN, `omnistream.navigation.janus`) and the baselines are interchangeable.

- `OracleAgent` follows the planner's shortest path from its privileged position/heading. It must
  reach every generated goal (SR = 1.0): that validates scenes, planner, simulator and metrics
  together, so a failing oracle points at one of those, never at a model.
- `RandomAgent` picks uniformly among the movement actions and stops with a small probability; it
  gives the floor any learned agent has to beat.

`parse_action` turns generated text into one of `ACTIONS`; anything it cannot read becomes STOP, with
a warning, and the caller counts it (`Agent.unparseable`) so the results show how often it happened.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from omnistream.navigation.episodes import Episode

log = logging.getLogger(__name__)

ACTIONS = ("STOP", "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")

# The simulator step sizes (VLN-CE / JanusVLN / StreamVLN settings); the oracle plans with them.
FORWARD_STEP_M = 0.25
TURN_ANGLE_DEG = 15.0

# Coordinates follow habitat / VLN-CE: y is up, the floor is the x-z plane, an agent with heading 0
# faces -z and its forward vector at heading h is (-sin h, 0, -cos h).


@dataclass
class Observation:
    """What the simulator hands the agent after each step."""

    rgb: np.ndarray  # (H, W, 3) uint8 camera image
    step: int  # 0-based step index in the episode
    position: np.ndarray  # (3,) float world position (only privileged agents such as the oracle may use it)
    heading: float  # radians (privileged, as position): yaw about +y, 0 = facing -z, + = turned left


class Agent(ABC):
    """One navigation policy. `reset` is called before each episode, `act` once per step."""

    name: str = "agent"

    def __init__(self) -> None:
        self.unparseable = 0  # model outputs that could not be parsed (became STOP), over the agent's life

    def reset(self, episode: Episode) -> None:
        """Start a new episode; its instruction is `episode.instruction.instruction_text`."""

    @abstractmethod
    def act(self, obs: Observation) -> str:
        """Return one of `ACTIONS`."""

    def settings(self) -> dict:
        """The settings that change this agent's actions: part of a navigation run's identity, so a
        resumed run never mixes results of differently configured agents (subclasses add theirs)."""
        return {"agent": self.name}

    def parse(self, text: str) -> str:
        """`parse_action` that counts unparseable outputs in `self.unparseable` (for model agents)."""
        action, ok = parse_action(text)
        if not ok:
            self.unparseable += 1
        return action


# Words a model may produce for each action, most specific first ("turn left" before "left").
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("STOP", re.compile(r"\bstop\b")),
    ("MOVE_FORWARD", re.compile(r"\bmove[_ ]?forward\b|\bgo forward\b|\bforward\b|\bmove ahead\b|↑")),
    ("TURN_LEFT", re.compile(r"\bturn[_ ]?left\b|\bleft\b|←")),
    ("TURN_RIGHT", re.compile(r"\bturn[_ ]?right\b|\bright\b|→")),
)


def parse_action(text: str) -> tuple[str, bool]:
    """Map generated text to an action: (action, ok). Unparseable text -> ("STOP", False), logged.

    The first action mentioned wins ("turn left, then move forward" -> TURN_LEFT), which matches how
    VLN models emit their next action first. Exact action names (any case) are accepted as they are.
    """
    if not isinstance(text, str):
        log.warning("unparseable action output %r (not text): STOP", text)
        return "STOP", False
    t = text.strip()
    if t.upper() in ACTIONS:
        return t.upper(), True
    low = t.lower()
    best: tuple[int, str] | None = None
    for action, pat in _PATTERNS:
        m = pat.search(low)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), action)
    if best is None:
        log.warning("unparseable action output %r: STOP", t[:200])
        return "STOP", False
    return best[1], True


def _wrap(a: float) -> float:
    """Angle wrapped to (-pi, pi]."""
    return (a + math.pi) % (2 * math.pi) - math.pi


def carrot(pos: np.ndarray, path, lookahead: float) -> np.ndarray:
    """The point `lookahead` metres along the path polyline from pos (pure pursuit), or the path's end.

    Aiming at a point a little past a close corner, rather than at the corner itself, keeps a 15-degree
    turning agent from wedging itself against the inflated corner when it stands a few cm off the path.
    """
    pts = [np.asarray(pos, float)] + [np.asarray(p, float) for p in path[1:]]
    left = lookahead
    for a, b in itertools.pairwise(pts):
        seg = math.hypot(b[0] - a[0], b[2] - a[2])
        if seg >= left and seg > 0:
            return a + (b - a) * (left / seg)
        left -= seg
    return pts[-1]


class OracleAgent(Agent):
    """Shortest-path follower: privileged position/heading + the simulator's (or scene's) planner.

    Each step it re-plans from where it actually is (so slides along walls never derail it), takes the
    point `lookahead` metres along the follower path (pure pursuit), turns toward it until within half a
    turn step, then moves forward; it stops once within `stop_radius` of the goal (well inside the 3 m
    success radius, so SR is 1.0 on generated episodes). A forward move that goes nowhere makes it aim
    at the path's next vertex itself; a second one starts a left sweep (turn, try forward) until a move
    gets somewhere, so it never pushes into a wall for the rest of the episode.
    """

    name = "oracle"

    def __init__(self, path_fn=None, scene_loader=None, stop_radius: float = 0.5, lookahead: float = 0.5) -> None:
        super().__init__()
        # path_fn(position, goal) -> waypoints | None: the simulator's own path (the runner passes
        # `sim.follower_path`, so the oracle plans on whichever backend runs); without it, the planner of
        # the scene loaded by scene_loader (default: regenerate the generated scene from its id).
        self.path_fn = path_fn
        self._scene_loader = scene_loader
        self.stop_radius = stop_radius
        self.lookahead = lookahead
        self._goal: np.ndarray | None = None
        self._own_planner = False  # path_fn built here from the episode's scene (rebuilt per episode)
        self._last: tuple[str, np.ndarray] | None = None  # (last action, position it was taken from)
        self._blocked = 0  # consecutive MOVE_FORWARDs that went nowhere

    def settings(self) -> dict:
        return {**super().settings(), "stop_radius": self.stop_radius, "lookahead": self.lookahead}

    def reset(self, episode: Episode) -> None:
        self._goal = np.asarray(episode.goals[0].position, dtype=float)
        self._last, self._blocked = None, 0
        if self.path_fn is None or self._own_planner:
            from omnistream.navigation.planner import Planner
            from omnistream.navigation.scenes import load_scene

            self.path_fn = Planner((self._scene_loader or load_scene)(episode.scene_id)).follower_path
            self._own_planner = True

    def act(self, obs: Observation) -> str:
        if self.path_fn is None or self._goal is None:
            raise RuntimeError("OracleAgent.act called before reset(episode)")
        pos = np.asarray(obs.position, dtype=float)
        if np.hypot(pos[0] - self._goal[0], pos[2] - self._goal[2]) <= self.stop_radius:
            return "STOP"
        path = self.path_fn(pos, self._goal)
        if not path:  # no path (should not happen on generated episodes): stop where we are
            log.warning("oracle: no path from %s to %s; stopping", pos.tolist(), self._goal.tolist())
            return "STOP"
        if self._last is not None and self._last[0] == "MOVE_FORWARD":
            moved = np.hypot(pos[0] - self._last[1][0], pos[2] - self._last[1][2])
            self._blocked = self._blocked + 1 if moved < 0.02 else 0
        if self._blocked == 0:
            target = carrot(pos, path, self.lookahead)
        else:  # wedged against a corner: aim at the path's next vertex itself, however close
            target = next((np.asarray(p, float) for p in path[1:]
                           if np.hypot(p[0] - pos[0], p[2] - pos[2]) > 0.02), np.asarray(path[-1], float))
        dx, dz = target[0] - pos[0], target[2] - pos[2]
        err = _wrap(math.atan2(-dx, -dz) - obs.heading)  # heading whose forward vector points at target
        half = math.radians(TURN_ANGLE_DEG) / 2 + 1e-6
        if self._blocked >= 2:  # still stuck: turn left once, try forward, until a forward move gets somewhere
            action = "MOVE_FORWARD" if self._last[0] == "TURN_LEFT" else "TURN_LEFT"
        elif err > half:
            action = "TURN_LEFT"
        elif err < -half:
            action = "TURN_RIGHT"
        else:
            action = "MOVE_FORWARD"
        self._last = (action, pos)
        return action


class RandomAgent(Agent):
    """Uniform over the three movement actions, STOP with probability `p_stop` per step (seeded)."""

    name = "random"

    def __init__(self, seed: int = 0, p_stop: float = 0.02) -> None:
        super().__init__()
        self.seed = seed
        self.p_stop = p_stop
        self._rng = np.random.default_rng(seed)

    def settings(self) -> dict:
        return {**super().settings(), "seed": self.seed, "p_stop": self.p_stop}

    def reset(self, episode: Episode) -> None:
        # Seeded per episode so a resumed run gives each episode the same actions as a fresh run.
        key = sum((i + 1) * ord(c) for i, c in enumerate(str(episode.episode_id)))
        self._rng = np.random.default_rng([self.seed, key])

    def act(self, obs: Observation) -> str:
        if self._rng.random() < self.p_stop:
            return "STOP"
        return ACTIONS[1 + int(self._rng.integers(3))]
