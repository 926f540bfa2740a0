"""Factories: a source string or a pair of addresses in, a connected-ready `Camera` / `Robot` out.

They sit above the implementations (cameras.py, zmq_robot.py) so that the implementations never import
each other to choose one: `interfaces` <- `bridge` (wire format) <- `cameras` <- `zmq_robot` <- `devices`
<- the app. Nothing here connects: the caller connects and owns what it gets (and closes it on every
exit path).
"""

from __future__ import annotations

import zmq

from omnistream.robot.cameras import AvCamera
from omnistream.robot.interfaces import Camera, Limits, Robot
from omnistream.robot.zmq_robot import ZmqCamera, ZmqRobot


def open_camera(source: str, *, ctx: zmq.Context | None = None, **kw) -> Camera:
    """`zmq:ADDR` (a robot process's camera, on `ctx`) or anything AvCamera reads (kw: its options)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"camera source must be a non-empty string, got {source!r}")
    if source.startswith("zmq:"):
        return ZmqCamera(source[4:], ctx=ctx)
    return AvCamera(source, **kw)


def open_robot(cmd_addr: str, obs_addr: str, *, limits: Limits | None = None,
               ctx: zmq.Context | None = None) -> Robot:
    """The built-in robot link: a robot process running `omnistream.robot.bridge` at these addresses."""
    return ZmqRobot(cmd_addr, obs_addr, limits=limits, ctx=ctx)
