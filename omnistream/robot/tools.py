"""The robot's agent interface as function tools offered to the conversation: ``navigate(instruction)``,
``stop()``, ``status()``.

Talk mode (omnistream/robot/talk.py) offers these to every reply in Qwen's tool format
(omnistream/engine/tools.py); a call the model makes is carried out here and its output goes back to the
conversation as the function's output, after which the model answers (spoken). Why tools and not a
convention in the reply text: a call is cut out of what is spoken, its arguments are JSON that is checked
against a schema, and a forced ``tool_choice`` makes even an untrained model's call valid.

Every call goes through the control socket's own command path (``ControlServer.execute``: the
``instruction``, ``cancel`` and ``status`` commands, validated by the same decoder), so the safety rules are
the same ones: ``stop`` always stops the base (and ends the task); no tool can release an e-stop (there is
no ``resume`` tool), and a ``navigate`` call while one is latched only records the task, which waits for
``resume`` + ``continue`` on the control socket like any other.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import msgspec

from omnistream.apps.robot_control import CONTROL_DECODER
from omnistream.engine.tools import ToolCall, check_tools

log = logging.getLogger("omnistream.robot.tools")

INSTRUCTION_CHARS = 300  # a route instruction (R2R's run ~180 characters); bounds a forced call's length
# no quote, backslash or control character: with minLength/maxLength xgrammar's string grammar lets raw control
# characters through (invalid JSON, so the call would not parse); a pattern compiles to a JSON-aware regex
_INSTRUCTION_RE = f'^[^"\\\\\\x00-\\x1f]{{1,{INSTRUCTION_CHARS}}}$'
CALL_MAX_TOKENS = 2 * INSTRUCTION_CHARS  # a forced reply's token budget: any call the grammar allows fits

_DEFINITIONS = {
    "navigate": {
        "name": "navigate",
        "description": "Drive the robot somewhere: start a navigation task with a natural-language instruction "
                       "(e.g. 'go to the kitchen'). It replaces the task running now.",
        "parameters": {"type": "object", "properties": {"instruction": {
            "type": "string", "description": "Where to go, in words.", "pattern": _INSTRUCTION_RE}},
            "required": ["instruction"], "additionalProperties": False},
    },
    "stop": {"name": "stop", "description": "Stop the robot now and end its navigation task.",
             "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
    "status": {"name": "status", "description": "The robot's state: where it is, whether it moves, its task, "
                                                "whether an emergency stop is latched.",
               "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
NAMES = tuple(_DEFINITIONS)


@lru_cache(maxsize=4)
def robot_tools(navigate: bool = True) -> tuple[dict, ...]:
    """The tools' definitions, checked as every session's tools are (``check_tools``); ``navigate=False``
    (the app runs without navigate mode): stop and status only."""
    return tuple(check_tools([d for n, d in _DEFINITIONS.items() if navigate or n != "navigate"]))


def _state(status: dict) -> dict:
    """What the model needs of the app's status (the full one holds trajectories and counters)."""
    robot, task = status.get("robot") or {}, status.get("task")
    return {
        "moving": status.get("moving"), "estop": status.get("estop"), "held": status.get("held"),
        "paused": status.get("pause_reason"),
        "position": {k: robot.get(k) for k in ("x", "z", "heading", "room")} if robot else None,
        "task": None if task is None else {k: task.get(k) for k in ("id", "instruction", "state", "steps", "target",
                                                                     "error")},
    }


class RobotTools:
    """Carries out the conversation's calls on a running :class:`~omnistream.apps.robot.RobotApp`."""

    def __init__(self, app):
        self.app = app
        self.counts = {"tool_calls": 0, "tool_errors": 0}

    def definitions(self) -> list[dict]:
        return list(robot_tools("navigate" in self.app.cfg.modes))

    def execute(self, call: ToolCall) -> str:
        """Run one call; its output (JSON text) for the conversation. A bad call is an ``{"ok": false,
        "error"}`` output, never an exception: the model reads it and answers."""
        self.counts["tool_calls"] += 1
        try:
            out = self._run(call)
        except Exception as e:  # noqa: BLE001 -- e.g. the robot link failing mid-call: the talk loop must go on
            log.exception("tool %s failed", call.name)
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if not out["ok"]:
            self.counts["tool_errors"] += 1
            log.warning("tool %s(%s) refused: %s", call.name, call.arguments[:200], out["error"])
        else:
            log.info("tool %s(%s)", call.name, call.arguments[:200])
        return json.dumps(out, ensure_ascii=False)

    def _run(self, call: ToolCall) -> dict:
        if call.name not in NAMES:
            return {"ok": False, "error": f"no tool {call.name!r}; the tools are {', '.join(NAMES)}"}
        try:
            args = json.loads(call.arguments or "{}")
        except ValueError:
            return {"ok": False, "error": "the arguments are not JSON"}
        if not isinstance(args, dict):
            return {"ok": False, "error": "the arguments must be a JSON object"}
        allowed = set(_DEFINITIONS[call.name]["parameters"]["properties"])
        if set(args) - allowed:
            return {"ok": False, "error": f"unknown argument(s) {sorted(set(args) - allowed)}"}
        command = {"navigate": {"type": "instruction", "text": args.get("instruction")},
                   "stop": {"type": "cancel"}, "status": {"type": "status"}}[call.name]
        try:  # the control socket's decoder: the same limits (instruction length, ...) as a control message
            cmd = CONTROL_DECODER.decode(json.dumps(command).encode())
        except msgspec.DecodeError as e:
            return {"ok": False, "error": str(e).replace("`$.text`", "instruction")}
        reply = self.app.control.execute(cmd, "voice")
        if not reply["ok"]:
            return reply
        state = _state(self.app.status())  # after the command: a stop shows the base stopping
        if call.name == "navigate":
            return {"ok": True, "task": reply["task"], "instruction": command["text"],
                    **({"note": "an emergency stop is latched: the robot will not move until it is released"}
                       if state["estop"] else {})}
        return {"ok": True, **({"stopped": True} if call.name == "stop" else {}), **state}
