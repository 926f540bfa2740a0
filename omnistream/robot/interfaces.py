"""Small LeRobot-style hardware interfaces: a `Robot` (the base) and a `Camera`.

Like LeRobot's `robots/robot.py` and `cameras/camera.py`, hardware hides behind two small ABCs that
declare their features (name -> type/unit), connect and disconnect, and exchange plain dicts. The app
only ever sees these, so a real robot is attached by implementing `Robot` (or, more simply, by running
`omnistream.robot.bridge` in its own process and using the built-in `ZmqRobot`).

`send_action` returns the action that was actually applied (clipped to the limits), never the request:
a caller that logs it sees what the motors were told.

The base is a differential drive commanded in velocity: `x.vel` (m/s, forward) and `theta.vel` (rad/s,
counter-clockwise), LeRobot LeKiwi's names for the same quantities.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

BASE_ACTION_FEATURES = {"x.vel": float, "theta.vel": float}


class RobotError(RuntimeError):
    """The robot link failed (not connected, robot process gone, rejected command)."""


class CameraError(RuntimeError):
    """A camera could not be opened or delivered no frame."""


@dataclass(frozen=True)
class Limits:
    """Velocity limits of the base; commands beyond them are clipped, absurd ones rejected."""

    max_x_vel: float = 0.5  # m/s
    max_theta_vel: float = 1.5  # rad/s
    reject_factor: float = 10.0  # |value| > reject_factor * limit (or not finite): a bad command, rejected

    def check(self, x_vel, theta_vel) -> str | None:
        """Why a command cannot be applied at all, or None if it can (after clipping)."""
        for name, v, lim in (("x.vel", x_vel, self.max_x_vel), ("theta.vel", theta_vel, self.max_theta_vel)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"{name} must be a number, got {type(v).__name__}"
            if not math.isfinite(v):
                return f"{name} is not finite ({v})"
            if abs(v) > self.reject_factor * lim:
                return f"{name}={v:g} is out of range (limit {lim:g}, rejected beyond {self.reject_factor * lim:g})"
        return None

    def clip(self, x_vel: float, theta_vel: float) -> tuple[float, float]:
        return (float(np.clip(x_vel, -self.max_x_vel, self.max_x_vel)),
                float(np.clip(theta_vel, -self.max_theta_vel, self.max_theta_vel)))


class Robot(ABC):
    """A robot base (and whatever else it reports), LeRobot style."""

    name: str = "robot"

    @property
    @abstractmethod
    def observation_features(self) -> dict:
        """Names and types of what `get_observation` returns."""

    @property
    def action_features(self) -> dict:
        return dict(BASE_ACTION_FEATURES)

    @property
    @abstractmethod
    def is_connected(self) -> bool: ...

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def disconnect(self) -> None:
        """Stop the base and release the link."""

    @abstractmethod
    def get_observation(self) -> dict:
        """The latest state (pose, velocities, safety flags); never blocks for long."""

    @abstractmethod
    def send_action(self, action: dict) -> dict:
        """Command the base; returns the action as applied (clipped)."""

    def stop(self) -> dict:
        return self.send_action({"x.vel": 0.0, "theta.vel": 0.0})

    @abstractmethod
    def emergency_stop(self) -> None:
        """Latch the robot stopped until `resume`."""

    @abstractmethod
    def resume(self) -> None: ...

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()


class Camera(ABC):
    """A camera read latest-only: `read_latest` returns the newest frame or None if it is too old."""

    width: int
    height: int

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def disconnect(self) -> None: ...

    @abstractmethod
    def read_latest(self, max_age_s: float | None = None) -> tuple[np.ndarray, float] | None:
        """(frame (H, W, 3) uint8 RGB, capture time on time.monotonic()) or None when there is no frame
        younger than `max_age_s` (stream lost, reconnecting)."""

    @property
    def connected(self) -> bool:
        return True

    def stats(self) -> dict:
        return {}

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()
