"""What a replica reports to its operator: Prometheus metrics (``GET /metrics``) and one log line
per session open/close and per reply.

Each :class:`ServerMetrics` owns its own ``CollectorRegistry`` (no process-global state: tests and
benchmarks run several servers in one process). Two kinds of figures:

- **events** the server sees, counted as they happen: sessions opened / refused (by reason),
  replies (by status) and per-reply histograms measured on the server's clock, as the client
  feels them -- end of the user turn (the commit, or ``response.create``) to the first reply text
  sent and to the first audio sent, the pipeline's real-time factor, and *underruns*: the times a
  client that plays audio as it arrives would have run dry (the pacer sends ~100 ms ahead, so an
  underrun is a gap the user hears);
- **pipeline state**, read from ``Client.status()`` at scrape time (a custom collector, so a
  scrape costs nothing between scrapes): stage up / restarts / hang detections, batched calls and
  their rows and time per stage and worker kind, scheduler ticks and busy time, queue depths, and
  the KV cache bytes the sessions hold.

Metric names are listed in :data:`METRIC_NAMES` (the Grafana dashboard and the tests use them).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from omnistream.apps.realtime_config import SAMPLE_RATE

log = logging.getLogger("omnistream.server")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0)
UNDERRUN_BUCKETS = (0, 1, 2, 5, 10, 20, 50)
REFUSALS = ("full", "busy", "draining", "per_ip")  # why a session was refused (the `reason` label)

METRIC_NAMES = (
    "omnistream_sessions_active", "omnistream_sessions_opened_total", "omnistream_sessions_refused_total",
    "omnistream_draining", "omnistream_replies_total", "omnistream_turn_first_token_seconds",
    "omnistream_turn_first_audio_seconds", "omnistream_turn_rtf", "omnistream_turn_underruns",
    "omnistream_stage_up", "omnistream_stage_restarts_total", "omnistream_stage_hangs_total",
    "omnistream_stage_busy_fraction", "omnistream_batch_calls_total", "omnistream_batch_rows_total",
    "omnistream_batch_seconds_total", "omnistream_batch_size_max", "omnistream_scheduler_ticks_total",
    "omnistream_scheduler_busy_seconds_total", "omnistream_worker_backlog", "omnistream_queue_depth",
    "omnistream_kv_bytes",
)


@dataclass
class _ReplyClock:
    """One reply's times (monotonic) and its simulated client playback."""

    t0: float  # the reply was asked for (end of the user turn)
    first_text: float | None = None
    first_audio: float | None = None
    play_end: float = 0.0  # when a client playing each delta on arrival runs out of audio
    underruns: int = 0


class ServerMetrics:
    """The server's metrics and its session / turn log lines (see the module doc)."""

    def __init__(self, server):
        self.server = server
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.opened = Counter("omnistream_sessions_opened", "Realtime sessions opened", registry=r)
        self.refused = Counter("omnistream_sessions_refused", "Sessions refused at connect, by reason "
                               "(full: --max-sessions; busy: admission control; draining; per_ip)",
                               ["reason"], registry=r)
        for why in REFUSALS:
            self.refused.labels(why)
        self.replies = Counter("omnistream_replies", "Replies ended, by response.done status", ["status"], registry=r)
        self.first_token = Histogram("omnistream_turn_first_token_seconds", "End of the user turn to the first reply "
                                     "text sent", buckets=LATENCY_BUCKETS, registry=r)
        self.first_audio = Histogram("omnistream_turn_first_audio_seconds", "End of the user turn to the first "
                                     "reply audio sent", buckets=LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram("omnistream_turn_rtf", "Reply compute time per second of speech (< 1: faster than "
                             "real time)", buckets=RTF_BUCKETS, registry=r)
        self.underruns = Histogram("omnistream_turn_underruns", "Times per spoken reply a client playing the audio "
                                   "as it arrives would have run dry", buckets=UNDERRUN_BUCKETS, registry=r)
        Gauge("omnistream_sessions_active", "Realtime sessions connected", registry=r).set_function(
            lambda: len(server.sessions))
        Gauge("omnistream_draining", "1 while the replica drains (takes no sessions)", registry=r).set_function(
            lambda: float(server.draining))
        r.register(_PipelineCollector(server))
        self._clocks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Reply -> _ReplyClock

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (``GET /metrics``)."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ sessions
    def session_refused(self, reason: str, peer: str | None, why: str) -> None:
        self.refused.labels(reason).inc()
        log.info("session refused", extra={"fields": {"event": "session.refused", "reason": reason, "ip": peer,
                                                      "detail": why}})

    def session_opened(self, conn) -> None:
        conn.opened_t = time.monotonic()
        self.opened.inc()
        log.info("session open", extra={"fields": {"event": "session.open", "session": conn.sid,
                                                   "ip": getattr(conn, "peer", None)}})

    def session_closed(self, conn) -> None:
        if conn.sid is None:  # refused inside the session (busy, the pipeline failed): nothing was opened
            return
        ws = conn.ws
        dur = time.monotonic() - getattr(conn, "opened_t", time.monotonic())
        log.info("session close", extra={"fields": {"event": "session.close", "session": conn.sid,
                                                    "ip": getattr(conn, "peer", None), "duration_s": round(dur, 3),
                                                    "close_code": ws.close_code, "replies": getattr(conn, "replies", 0)}})

    # ------------------------------------------------------------------ replies (hooks in realtime_reply.Reply)
    def reply_started(self, reply) -> None:
        self._clocks[reply] = _ReplyClock(time.monotonic())

    def text_out(self, reply) -> None:
        c = self._clocks.get(reply)
        if c is not None and c.first_text is None:
            c.first_text = time.monotonic()

    def audio_out(self, reply, samples: int) -> None:
        """A delta of ``samples`` left: a client playing it on arrival plays it from now (or from
        the end of what it holds); arriving after that end is an underrun."""
        c = self._clocks.get(reply)
        if c is None:
            return
        now = time.monotonic()
        if c.first_audio is None:
            c.first_audio = c.play_end = now
        elif now > c.play_end:
            c.underruns += 1
            c.play_end = now
        c.play_end += samples / SAMPLE_RATE

    def reply_done(self, reply, status: str, done) -> None:
        """The reply's ``response.done`` is leaving: observe its figures, log its line."""
        c = self._clocks.pop(reply, None)
        conn = reply.conn
        conn.replies = getattr(conn, "replies", 0) + 1
        self.replies.labels(status).inc()
        fields = {"event": "turn", "session": conn.sid, "response": reply.id, "status": status}
        if c is not None:
            if c.first_text is not None:
                fields["first_token_s"] = round(c.first_text - c.t0, 4)
                self.first_token.observe(c.first_text - c.t0)
            if c.first_audio is not None:
                fields["first_audio_s"] = round(c.first_audio - c.t0, 4)
                fields["underruns"] = c.underruns
                self.first_audio.observe(c.first_audio - c.t0)
                self.underruns.observe(c.underruns)
        stats = getattr(done, "stats", None) or {}
        audio_s = reply.sent / SAMPLE_RATE
        made_s = getattr(done, "audio_samples", 0) / SAMPLE_RATE  # the pipeline's speech (a cut reply: not whole)
        if stats.get("decode_s") and made_s > 0 and not done.cancelled:
            rtf = float(stats["decode_s"]) / made_s
            fields["rtf"] = round(rtf, 4)
            self.rtf.observe(rtf)
        fields.update(tokens=getattr(done, "reply_tokens", 0), audio_s=round(audio_s, 3))
        log.info("turn", extra={"fields": fields})


class _PipelineCollector:
    """The pipeline's state from ``Client.status()``, read at scrape time."""

    def __init__(self, server):
        self.server = server

    def describe(self):
        return []  # labels depend on the layout: nothing to check at registration

    def collect(self):
        try:
            st = self.server.client.status()
        except Exception:  # noqa: BLE001 -- a scrape must not fail because the pipeline does
            log.debug("status() failed during a scrape", exc_info=True)
            return
        fam = {n: (CounterMetricFamily if kind == "c" else GaugeMetricFamily)(n, doc, labels=labels) for n, kind, doc,
               labels in _FAMILIES}
        kv = 0
        for stage in st.get("stages") or []:
            name = str(stage.get("name"))
            fam["omnistream_stage_up"].add_metric([name], float(bool(stage.get("alive"))))
            fam["omnistream_stage_restarts"].add_metric([name], float(stage.get("restarts", 0)))
            fam["omnistream_stage_hangs"].add_metric([name], float(stage.get("hangs", 0)))
            load = stage.get("load") or (st.get("load") if name == "all" else None) or {}
            if load.get("busy_fraction") is not None:
                fam["omnistream_stage_busy_fraction"].add_metric([name], float(load["busy_fraction"]))
            workers = stage.get("workers")
            if not isinstance(workers, dict):  # before the first pong it lists names only
                workers = st.get("scheduler", {}) if name == "all" else {}
            for worker, ws in workers.items():
                kv += _add_worker(fam, name, worker, ws)
        for q, n in (st.get("queues") or {}).items():
            if isinstance(n, int | float):
                fam["omnistream_queue_depth"].add_metric([str(q)], float(n))
        fam["omnistream_kv_bytes"].add_metric([], float(kv))
        yield from fam.values()


_FAMILIES = (
    ("omnistream_stage_up", "g", "1 while the stage process serves", ["stage"]),
    ("omnistream_stage_restarts", "c", "Stage restarts (died or hung)", ["stage"]),
    ("omnistream_stage_hangs", "c", "Hung-stage detections (no pong within --hang-s)", ["stage"]),
    ("omnistream_stage_busy_fraction", "g", "Fraction of the stage loop spent in model calls", ["stage"]),
    ("omnistream_batch_calls", "c", "Batched model calls", ["stage", "worker", "kind"]),
    ("omnistream_batch_rows", "c", "Rows (sessions) over all batched calls: rows/calls is the mean batch size",
     ["stage", "worker", "kind"]),
    ("omnistream_batch_seconds", "c", "Time in batched model calls", ["stage", "worker", "kind"]),
    ("omnistream_batch_size_max", "g", "Largest batch so far", ["stage", "worker", "kind"]),
    ("omnistream_scheduler_ticks", "c", "Scheduler ticks that did work", ["stage", "worker"]),
    ("omnistream_scheduler_busy_seconds", "c", "Time in those ticks: busy/ticks is the mean tick time",
     ["stage", "worker"]),
    ("omnistream_worker_backlog", "g", "Operations queued behind running work", ["stage", "worker"]),
    ("omnistream_queue_depth", "g", "Client-side queues (replies in flight, pending acks, inbox)", ["queue"]),
    ("omnistream_kv_bytes", "g", "KV cache bytes the sessions hold (Thinker)", []),
)


def _add_worker(fam: dict, stage: str, worker: str, ws: dict) -> int:
    """One worker's scheduler figures (``Worker.status()``); returns its ``kv_bytes`` if it reports them."""
    labels = [stage, str(worker)]
    if "ticks" in ws:
        fam["omnistream_scheduler_ticks"].add_metric(labels, float(ws["ticks"]))
        fam["omnistream_scheduler_busy_seconds"].add_metric(labels, float(ws.get("busy_s", 0.0)))
    if "backlog" in ws:
        fam["omnistream_worker_backlog"].add_metric(labels, float(ws["backlog"]))
    for kind, k in ws.items():
        if isinstance(k, dict) and "calls" in k:  # a KindStats.as_dict()
            calls = float(k["calls"])
            fam["omnistream_batch_calls"].add_metric([*labels, kind], calls)
            fam["omnistream_batch_rows"].add_metric([*labels, kind], round(calls * float(k.get("mean_batch", 0))))
            fam["omnistream_batch_seconds"].add_metric([*labels, kind], calls * float(k.get("ms_per_call", 0)) / 1000)
            fam["omnistream_batch_size_max"].add_metric([*labels, kind], float(k.get("max_batch", 0)))
    return int(ws.get("kv_bytes") or 0)
