"""The per-stage batching scheduler: every session's work of a tick in one forward per model.

A worker's per-session work is a *task*: a generator that runs one session's part of a reply and
yields a :class:`Need` whenever it needs a model call (the Thinker step that appends its next
token, a Talker codec step, a Token2Wav window); the scheduler answers with ``task.send(result)``.
A task may also yield ``None``: one bounded piece of work done, nothing needed.

Each :meth:`Scheduler.tick`:

1. runs every task that is not waiting up to its next yield;
2. groups the waiting Needs by kind and answers each group with ONE batched call (its
   :data:`Batcher`), the most urgent sessions first (``priority``: e.g. the seconds of audio a
   session has queued ahead of real time, so a session about to run dry goes first) and at most
   ``max_batch`` rows; the rest wait for the next tick;
3. resumes each answered task up to its next yield (its next Need is answered next tick).

Sessions join and leave the batch at any tick: a task that ends, fails or is cancelled is simply
not there next time, and the other rows never notice. Why generators: the per-session
logic stays straight-line code (the same code a solo run executes), while the batching lives
here once, for every model of every stage.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("omnistream.scheduler")

Batcher = Callable[[list[Any]], list[Any]]
"""Answers a list of Need args with a list of results, in order, in one batched model call."""


@dataclass
class Need:
    """A model call a task waits for: ``kind`` names the batcher, ``arg`` is this row's input."""

    kind: str
    arg: Any


@dataclass
class KindStats:
    """Running figures of one kind of batched call (``/status`` shows them)."""

    calls: int = 0
    rows: int = 0
    busy_s: float = 0.0
    last_batch: int = 0
    max_batch: int = 0

    def add(self, rows: int, dt: float) -> None:
        self.calls += 1
        self.rows += rows
        self.busy_s += dt
        self.last_batch = rows
        self.max_batch = max(self.max_batch, rows)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "mean_batch": round(self.rows / self.calls, 2) if self.calls else 0.0,
                "last_batch": self.last_batch, "max_batch": self.max_batch,
                "ms_per_call": round(1000 * self.busy_s / self.calls, 3) if self.calls else 0.0}


@dataclass
class Running:
    """One session's task as the scheduler drives it."""

    gen: Generator | None
    need: Need | None = None  # the model call it waits for


class Scheduler:
    """Drives the tasks of one worker; ``batchers`` maps a Need kind to its batched call."""

    def __init__(self, batchers: dict[str, Batcher], max_batch: int = 64):
        self.batchers = batchers
        self.max_batch = max_batch
        self.stats: dict[str, KindStats] = defaultdict(KindStats)
        self.ticks = 0
        self.busy_s = 0.0  # time spent in ticks that did work

    def tick(self, items: Iterable[tuple[Any, Running]], on_end: Callable[[Any, BaseException | None], None],
             priority: Callable[[Any], float] | None = None) -> bool:
        """One tick over ``(key, running)`` pairs; ``on_end(key, error)`` when a task ends (error None
        when it returned). True if any task is still running afterwards."""
        t0 = time.perf_counter()
        waiting: dict[str, list] = defaultdict(list)
        alive = []
        for key, run in items:
            if run.need is None and not self._resume(key, run, None, on_end):
                continue
            alive.append((key, run))
            if run.need is not None:
                waiting[run.need.kind].append((key, run))
        for kind, group in waiting.items():
            if priority is not None:
                group.sort(key=lambda kr: priority(kr[0]))
            rows = group[: self.max_batch]
            ts = time.perf_counter()
            results = self._call(kind, rows)
            self.stats[kind].add(len(rows), time.perf_counter() - ts)
            for (key, run), (ok, res) in zip(rows, results):
                run.need = None
                if ok:
                    self._resume(key, run, res, on_end)
                else:
                    self._throw(key, run, res, on_end)
        if alive:
            self.ticks += 1
            self.busy_s += time.perf_counter() - t0
        return any(run.gen is not None for _, run in alive)

    def _call(self, kind: str, rows: list) -> list[tuple[bool, Any]]:
        """The batched call, as ``(ok, result or exception)`` per row. A batch that raises fails each
        of its rows' tasks (never retried: a forward that failed half-way may have advanced some rows,
        and running them again would append twice); batchers validate their rows before any advances."""
        args = [run.need.arg for _, run in rows]
        try:
            out = self.batchers[kind](args)
            if len(out) != len(args):
                raise RuntimeError(f"batcher {kind} returned {len(out)} results for {len(args)} rows")
        except Exception as e:  # noqa: BLE001 -- the sessions get an error, the stage goes on
            log.error("batched %s over %d rows failed: %s", kind, len(args), e)
            return [(False, e)] * len(args)
        return [(True, r) for r in out]

    @staticmethod
    def _resume(key, run: Running, value, on_end) -> bool:
        """Run the task to its next yield; False once it has ended."""
        try:
            y = run.gen.send(value)  # (a fresh generator takes None: it starts)
        except StopIteration:
            run.gen = None
            on_end(key, None)
            return False
        except Exception as e:  # noqa: BLE001 -- the session's failure stays its own
            run.gen = None
            on_end(key, e)
            return False
        run.need = y if isinstance(y, Need) else None
        return True

    @staticmethod
    def _throw(key, run: Running, exc: BaseException, on_end) -> None:
        """The task's model call failed: raise it inside the task (its cleanup runs), then end it."""
        try:
            run.gen.throw(exc)
        except StopIteration:
            on_end(key, None)
        except Exception as e:  # noqa: BLE001
            on_end(key, e)
        else:
            run.gen.close()
            on_end(key, exc)
        run.gen = None

    def status(self) -> dict:
        return {"ticks": self.ticks, "busy_s": round(self.busy_s, 3),
                **{kind: st.as_dict() for kind, st in self.stats.items()}}


def run_alone(gen: Generator, batchers: dict[str, Batcher]):
    """Drive one task to its end with batches of one (the solo path of the same code). Returns
    the task's return value."""
    value = None
    try:
        while True:
            y = gen.send(value)
            value = batchers[y.kind]([y.arg])[0] if isinstance(y, Need) else None
    except StopIteration as stop:
        return stop.value
