"""Per-session state inside a stage: options, epoch, the running task and the ops waiting for it.

Every worker of every stage keeps one :class:`Slot` per session. Three rules make a pipeline of
independent processes behave like one in-process conversation:

* **Order.** A session's ops reach a worker in the order the client sent them (one ordered
  chain of links). While the session has a running *task* -- a generator the stage's scheduler
  advances one model call per tick, batched with the other sessions' (:mod:`omnistream.engine.scheduler`)
  -- newer ops wait in ``backlog`` and run after it.
* **Epochs.** The client bumps a session's epoch on barge-in (broadcast as ``Epoch`` over PUB and
  carried by every later op). :meth:`Slot.see` keeps the largest epoch seen; reply work of an
  older epoch (decode steps, codec codes, PCM) is *stale* and dropped. Conversation state updates
  (prompt rows, the end of a reply) are never dropped: they keep the caches consistent.
* **Isolation.** One slot's failure is reported as that session's error; other slots are untouched.

Options travel as plain dicts (msgpack maps) and are validated here on arrival.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Generator
from typing import Any

from omnistream.engine.scheduler import Running
from omnistream.runtime.client import SessionOptions

_FIELDS = {f.name: f for f in dataclasses.fields(SessionOptions)}
#: Options whose change starts a fresh conversation (the in-process client rebuilds on the same keys).
REBUILD_KEYS = ("voice", "system_prompt", "window", "max_speech_s", "fps")


def options_to_wire(o: SessionOptions) -> dict[str, Any]:
    return dataclasses.asdict(o)


def options_from_wire(d: Any) -> SessionOptions:
    """Validate a wire options map; ValueError names the bad field."""
    if not isinstance(d, dict):
        raise TypeError(f"session options must be a map, got {type(d).__name__}")
    unknown = set(d) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown session option(s) {sorted(unknown)}")
    o = SessionOptions(**d)
    for name in ("voice", "system_prompt", "window"):
        v = getattr(o, name)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"session option {name} must be a string or null, got {v!r}")
    if isinstance(o.max_new_tokens, bool) or not isinstance(o.max_new_tokens, int) or o.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {o.max_new_tokens!r}")
    for name in ("max_speech_s", "temperature", "fps"):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"session option {name} must be a number >= 0, got {v!r}")
    if o.seed is not None and (isinstance(o.seed, bool) or not isinstance(o.seed, int) or o.seed < 0):
        raise ValueError(f"seed must be an int >= 0 or null, got {o.seed!r}")
    if o.fps <= 0:
        raise ValueError(f"fps must be > 0, got {o.fps}")
    return o


def needs_rebuild(old: SessionOptions, new: SessionOptions) -> bool:
    return any(getattr(old, k) != getattr(new, k) for k in REBUILD_KEYS)


class Slot:
    """One session as one worker sees it. ``state`` is the worker's own object (a conversation)."""

    def __init__(self, sid: str, options: SessionOptions, state: Any = None, epoch: int = 0):
        self.sid = sid
        self.options = options
        self.state = state
        self.epoch = epoch
        self.run: Running | None = None  # the running task (see omnistream.engine.scheduler)
        self.task_epoch = 0  # epoch of the reply the task serves
        self.backlog: deque = deque()  # messages waiting for the task to end
        self.pending_open = None  # an OpenSession whose rebuild waits for the next turn (thinker)

    def see(self, epoch: int) -> None:
        """Note an epoch carried by a message or broadcast (epochs only grow)."""
        self.epoch = max(self.epoch, epoch)

    def stale(self, epoch: int) -> bool:
        """Work of ``epoch`` belongs to a reply that was interrupted."""
        return epoch < self.epoch

    def start(self, task: Generator, epoch: int) -> None:
        self.run, self.task_epoch = Running(task), epoch

    @property
    def busy(self) -> bool:
        return self.run is not None or bool(self.backlog)
