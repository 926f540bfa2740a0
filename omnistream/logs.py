"""Log lines an operator can search: timestamps always, optionally one JSON object per line.

A record may carry structured fields (``log.info("turn", extra={"fields": {"session": sid, ...}})``):
the plain format appends them as ``key=value`` pairs, the JSON format as keys of the object, so a
log shipper (journald, Loki, Elasticsearch) indexes a session id or a latency without parsing text.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict:
    f = getattr(record, "fields", None)
    return f if isinstance(f, dict) else {}


def _utc(created: float) -> str:
    """ISO 8601 UTC with milliseconds: sorts as text and compares across hosts."""
    secs, ms = divmod(round(created * 1000), 1000)  # (rounded as the JSON line's "t" is)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


class PlainFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.000Z INFO name: message key=value ...``."""

    def __init__(self):
        super().__init__(PLAIN_FORMAT)

    def formatTime(self, record, datefmt=None) -> str:  # noqa: N802 (logging's name)
        return _utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={_plain(v)}" for k, v in _fields(record).items())
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # fields on the message line, before a traceback
        return f"{head} {extra}{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: t (epoch seconds), time (ISO UTC), level, logger, msg, pid, the
    record's fields (+ exc) -- what log shippers take without a parser."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"t": round(record.created, 3), "time": _utc(record.created), "level": record.levelname,
             "logger": record.name, "msg": record.getMessage(), "pid": record.process}
        for k, v in _fields(record).items():
            d.setdefault(k, v)  # a field never hides the line's own keys
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def _plain(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return json.dumps(s) if (not s or any(c.isspace() or c in "\"=" for c in s)) else s


def setup_logging(json_lines: bool = False, level: int | str = logging.INFO, stream=None) -> None:
    """Replace the root handlers with one writing to ``stream`` (stderr) in the chosen format. In
    JSON mode every line must parse: Python warnings go through logging, progress bars are off."""
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if json_lines:
        logging.captureWarnings(True)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return
        hf_logging.disable_progress_bar()
