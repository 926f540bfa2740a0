"""The robot app's configuration: one dataclass, loaded from YAML with every field also a CLI flag.

Unknown keys and wrong types are errors that name the key (a typo in a robot's config must not be
silently ignored: `watchdg_s: 0.2` would leave the default in force).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from omnistream.robot.interfaces import Limits

MODES = ("navigate", "talk")


@dataclass
class RobotConfig:
    """Every field is a YAML key of `--config` and a CLI flag (`--forward-speed 0.5`)."""

    mode: str = "navigate"  # comma-separated: navigate, talk
    sim: bool = False  # run the simulated robot process (MuJoCo diff-drive in a generated scene)
    instruction: str | None = None  # a task to start with (also: control socket, voice)
    # robot link (a robot process running omnistream.robot.bridge); --sim fills these in
    robot_cmd: str = "tcp://127.0.0.1:5610"
    robot_obs: str = "tcp://127.0.0.1:5611"
    camera: str = "zmq:tcp://127.0.0.1:5612"  # zmq:ADDR (the robot's camera), /dev/videoN, rtsp://, http://, a file
    max_frame_age_s: float = 0.5
    robot_timeout_s: float = 60.0  # start-up: how long to wait for the robot process's first observation
    # simulated robot
    scene_seed: int = 1
    start_room: str | None = None
    camera_width: int = 160
    camera_height: int = 120
    camera_fps: float = 10.0
    # agent
    agent: str = "oracle"  # oracle | random | janus
    model: str | None = None  # JanusVLN checkpoint directory (agent janus)
    agent_timeout_s: float = 60.0  # a step slower than this is a hung stage: killed and restarted
    agent_load_timeout_s: float = 180.0
    agent_threads: int = 0
    max_steps: int = 500
    # motion
    forward_step_m: float = 0.25
    turn_deg: float = 15.0
    forward_speed: float = 0.25  # m/s
    turn_speed: float = 0.5  # rad/s
    command_period_s: float = 0.1
    max_x_vel: float = 0.5
    max_theta_vel: float = 1.5
    watchdog_s: float = 0.5
    # interfaces
    control: str = "tcp://127.0.0.1:5620"  # ZeroMQ ROUTER for JSON commands
    http_host: str = "127.0.0.1"
    http_port: int = 8080  # /health and /status; 0: any free port; -1: off
    log_json: bool = False
    log_level: str = "INFO"
    run_dir: str | None = None  # sockets, trajectory; default: a temporary directory
    # talk mode
    talk_model: str | None = None  # Thinker-Talker checkpoint directory
    talk_layout: str | None = None  # None: in this process (InProcClient); all-in-one | split | YAML: stages
    mic: str | None = None  # sounddevice name/index, or file:PATH (a WAV/FLAC replayed in real time)
    speaker: str | None = None  # sounddevice name/index, or file:PATH (a WAV written)
    voice: str | None = None
    talk_max_new_tokens: int = 64
    talk_max_speech_s: float = 30.0
    voice_instructions: bool = True  # offer the tools navigate(instruction), stop(), status() to the conversation
    talk_tool_choice: str = "auto"  # auto (the model decides) | none | required | navigate | stop | status (forced)
    talk_seed: int | None = None  # seeds the conversation's sampling and speech (reproducible replies)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.mode.split(",") if m.strip())

    @property
    def limits(self) -> Limits:
        return Limits(self.max_x_vel, self.max_theta_vel)

    def validate(self) -> RobotConfig:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"mode must be a comma-separated list of {MODES}, got {self.mode!r}")
        if self.agent not in ("oracle", "random", "janus"):
            raise ValueError(f"agent must be oracle, random or janus, got {self.agent!r}")
        if self.agent == "janus" and not self.model:
            raise ValueError("agent janus needs model: a JanusVLN checkpoint directory")
        if self.agent == "oracle" and not self.sim and "navigate" in self.modes:
            raise ValueError("the oracle agent needs the simulator's map: use --sim, or agent random/janus")
        for name in ("forward_speed", "turn_speed", "forward_step_m", "turn_deg", "command_period_s",
                     "max_frame_age_s", "watchdog_s", "camera_fps", "robot_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.forward_speed > self.max_x_vel or self.turn_speed > self.max_theta_vel:
            raise ValueError("forward_speed/turn_speed exceed max_x_vel/max_theta_vel (they would be clipped)")
        if self.command_period_s >= self.watchdog_s:
            raise ValueError("command_period_s must be shorter than watchdog_s, or the watchdog stops every move")
        choices = ("auto", "none", "required", "stop", "status") + (("navigate",) if "navigate" in self.modes else ())
        if self.talk_tool_choice not in choices:
            raise ValueError(f"talk_tool_choice must be one of {', '.join(choices)}, got {self.talk_tool_choice!r}")
        if "talk" in self.modes and not self.talk_model:
            raise ValueError("talk mode needs talk_model: a Thinker-Talker checkpoint directory")
        return self


def _field_type(f: dataclasses.Field):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.startswith("bool"):
        return bool
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> RobotConfig:
    """YAML file (optional) then overrides (CLI); unknown keys and wrong types are errors naming the key."""
    import yaml

    data: dict = {}
    if path:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read robot config {p}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{p}: the robot config must be a mapping of settings")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(RobotConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown robot config key(s) {unknown}; known: {', '.join(fields)}")
    for k, v in data.items():
        typ = _field_type(fields[k])
        if v is None:
            continue
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            data[k] = float(v)
        elif typ is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            data[k] = str(v)
        elif not isinstance(data[k], typ) or (typ is int and isinstance(v, bool)):
            raise ValueError(f"robot config {k}: expected {typ.__name__}, got {v!r}")
    return RobotConfig(**data).validate()


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` plus one flag per RobotConfig field (a CLI value overrides the file)."""
    p.add_argument("--config", help="robot YAML config (see robot.example.yaml); flags override it")
    for f in dataclasses.fields(RobotConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(f)
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {f.default})")
        else:
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default {f.default})")


def config_from_args(args) -> RobotConfig:
    names = [f.name for f in dataclasses.fields(RobotConfig)]
    return load_config(args.config, {n: getattr(args, n, None) for n in names})
