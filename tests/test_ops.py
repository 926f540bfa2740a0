"""An operable replica: ``/health`` reasons and ``/livez``, the drain (``POST /admin/drain`` and
SIGTERM in a real ``serve`` process), ``/metrics`` in the Prometheus text format, the structured
log lines, and the per-client-address session cap. Real server on loopback, real ``websockets``
clients, the tiny checkpoint behind the in-process client."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import RATE, Session, config, hello24k, speech_turn, url  # noqa: F401 (hello24k: a fixture)
from test_server_http import BusyClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from omnistream.apps.drain import cut_time
from omnistream.apps.metrics import METRIC_NAMES
from omnistream.apps.server import serving
from omnistream.logs import JsonFormatter, PlainFormatter
from omnistream.runtime.client import InProcClient, SessionOptions

pytestmark = pytest.mark.timeout(120)
LONG = SessionOptions(max_new_tokens=64, max_speech_s=20.0, seed=0)  # a ~3 s spoken reply on this machine
LONGER = SessionOptions(max_new_tokens=256, max_speech_s=20.0, seed=0)  # ~6 s


def run(coro, timeout: float = 100):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _request(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


async def request(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return await asyncio.to_thread(_request, port, method, path, headers)


async def scrape(port: int, headers: dict | None = None) -> dict:
    """``/metrics`` through the Prometheus parser: {(sample name, sorted labels): value}."""
    code, h, body = await request(port, "GET", "/metrics", headers)
    assert code == 200 and h["content-type"].startswith("text/plain"), (code, body[:200])
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def text_turn(s: Session) -> None:
    await s.send("conversation.item.create",
                 item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})
    await s.send("response.create")


async def closed_with(s: Session, timeout: float = 30) -> tuple[list[dict], int]:
    """Events until the server closes the connection, and its close code."""
    evs = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                evs.append(await s.recv())
    except ConnectionClosed as e:
        return evs, e.rcvd.code if e.rcvd is not None else None


def underruns(arrivals: list[tuple[float, int]], slack: float) -> int:
    """Underruns of a client that plays each delta on arrival (the oracle the server's figure is
    checked against, from the client's receive times): a delta later than the end of what was
    queued by more than ``slack`` seconds."""
    n, end = 0, None
    for t, samples in arrivals:
        if end is None:
            end = t
        elif t > end + slack:
            n, end = n + 1, t
        end += samples / RATE
    return n


# ---------------------------------------------------------------------------------- metrics + logs
@pytest.mark.slow
def test_metrics_move_after_one_voice_turn(tiny, hello24k, caplog):  # noqa: F811 (the fixture)
    """Every listed metric is exposed; after one voice turn the event figures moved, and the
    per-turn latencies equal what the client measured itself (within the loopback's delays)."""
    import base64

    caplog.set_level(logging.INFO, logger="omnistream.server")

    async def body():
        async with serving(InProcClient(tiny), config(api_key="k")) as server:
            p, auth = server.port, {"Authorization": "Bearer k"}
            assert (await request(p, "GET", "/metrics"))[0] == 401  # the /status rule: the key when one is set
            before = await scrape(p, auth)
            assert value(before, "omnistream_sessions_active") == 0 and value(before, "omnistream_kv_bytes") == 0
            async with connect(url(server), additional_headers=auth) as ws:
                s = Session(ws)
                sid = (await s.until("session.created"))["session"]["id"]
                await s.append(speech_turn(hello24k))
                t_commit = (await s.until("input_audio_buffer.committed"))["_t"]
                t_text = (await s.until("response.output_audio_transcript.delta"))["_t"]
                mid = await scrape(p, auth)  # a reply in flight
                done = (await s.until("response.done"))["response"]
                after = await scrape(p, auth)
            names = {n for n, _ in after}
            for name in METRIC_NAMES:
                assert any(n == name or n.startswith(name + "_") for n in names), name
            assert value(mid, "omnistream_queue_depth", queue="replies_in_flight") >= 1
            assert value(mid, "omnistream_sessions_active") == 1 and value(mid, "omnistream_kv_bytes") > 0
            assert value(after, "omnistream_sessions_opened_total") == 1
            assert value(after, "omnistream_replies_total", status=done["status"]) == 1
            for h in ("first_token_seconds", "first_audio_seconds", "rtf", "underruns"):
                assert value(after, f"omnistream_turn_{h}_count") == 1, h
            w = {"stage": "all", "worker": "thinker"}
            calls = value(after, "omnistream_batch_calls_total", **w, kind="thinker.decode")
            assert calls > value(before, "omnistream_batch_calls_total", **w, kind="thinker.decode")
            assert value(after, "omnistream_batch_rows_total", **w, kind="thinker.decode") >= calls
            assert value(after, "omnistream_batch_seconds_total", **w, kind="thinker.decode") > 0
            assert value(after, "omnistream_batch_size_max", **w, kind="thinker.decode") >= 1
            for worker in ("thinker", "talker", "token2wav"):
                t = {"stage": "all", "worker": worker}
                assert value(after, "omnistream_scheduler_ticks_total", **t) > value(
                    before, "omnistream_scheduler_ticks_total", **t), worker
                assert value(after, "omnistream_scheduler_busy_seconds_total", **t) > 0
            assert value(after, "omnistream_stage_busy_fraction", stage="all") > 0
            assert value(after, "omnistream_stage_up", stage="all") == 1
            assert value(after, "omnistream_stage_restarts_total", stage="all") == 0

            # the oracle: the client's own clock (commit received -> first transcript / audio received)
            deltas = [e for e in s.events if e["type"] == "response.output_audio.delta"]
            first_audio = deltas[0]["_t"] - t_commit
            # (both clocks see the same interval; the slack is the two event loops' delays on a loaded machine)
            assert value(after, "omnistream_turn_first_token_seconds_sum") == pytest.approx(t_text - t_commit, abs=0.3)
            assert value(after, "omnistream_turn_first_audio_seconds_sum") == pytest.approx(first_audio, abs=0.3)
            arrivals = [(e["_t"], len(base64.b64decode(e["delta"])) // 2) for e in deltas]
            assert underruns(arrivals, 0.1) <= value(after, "omnistream_turn_underruns_sum") <= underruns(arrivals, -0.1)
            meta = done["metadata"]
            rtf = float(meta["decode_s"]) / (int(meta["audio_samples"]) / RATE)
            assert value(after, "omnistream_turn_rtf_sum") == pytest.approx(rtf, rel=1e-6)

            # one log line per session open / close and per turn, with the same figures
            recs = [r.fields for r in caplog.records if r.name == "omnistream.server" and hasattr(r, "fields")]
            turn = next(f for f in recs if f["event"] == "turn")
            assert turn["session"] == sid and turn["status"] == done["status"]
            assert turn["first_audio_s"] == pytest.approx(value(after, "omnistream_turn_first_audio_seconds_sum"),
                                                          abs=1e-3)
            assert {"event": "session.open", "session": sid, "ip": "127.0.0.1"}.items() <= next(
                f for f in recs if f["event"] == "session.open").items()
            for _ in range(100):  # the close line is written by the connection's cleanup
                closes = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "session.close"]
                if closes:
                    break
                await asyncio.sleep(0.02)
            assert closes[0]["session"] == sid and closes[0]["replies"] == 1 and closes[0]["duration_s"] > 0
            assert value(await scrape(p, auth), "omnistream_kv_bytes") == 0  # the closed session's cache is freed
    run(body())


def test_log_lines_have_timestamps_and_fields():
    rec = logging.LogRecord("omnistream.server", logging.INFO, __file__, 1, "turn", None, None)
    rec.fields = {"session": "sess_1", "first_audio_s": 0.25, "detail": "two words"}
    line = PlainFormatter().format(rec)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO omnistream\.server: turn session=sess_1 "
                        r'first_audio_s=0\.25 detail="two words"', line), line
    d = json.loads(JsonFormatter().format(rec))
    assert d["msg"] == "turn" and d["session"] == "sess_1" and d["first_audio_s"] == 0.25
    assert d["t"] == pytest.approx(rec.created, abs=1e-3) and d["time"].endswith("Z")


# ---------------------------------------------------------------------------------- health
def test_health_says_why_the_replica_takes_no_session(tiny):
    """/health: 200 while it takes a session; 503 full (admission, the session cap), draining,
    unavailable (the pipeline stopped). /livez stays 200 throughout."""
    async def body():
        client = BusyClient(tiny)
        async with serving(client, config(max_sessions=1, drain_grace_s=5)) as server:
            p = server.port

            async def health():
                code, _, b = await request(p, "GET", "/health")
                assert (await request(p, "GET", "/livez"))[0] == 200
                return code, json.loads(b)

            assert await health() == (200, {"status": "ok", "sessions": 0})
            client.reason = "at capacity: stage thinker spends 40% of its loop per replying session"
            assert await health() == (503, {"status": "full", "reason": client.reason, "sessions": 0})
            client.reason = None
            async with connect(url(server)) as ws:
                s = Session(ws)
                await s.until("session.created")
                code, h = await health()
                assert code == 503 and h["status"] == "full" and h["reason"] == "too many sessions (max 1)"
                with pytest.raises(InvalidStatus) as e:
                    await connect(url(server))
                assert e.value.response.status_code == 503
                code, _, b = await request(p, "POST", "/admin/drain")
                assert code == 202 and json.loads(b)["status"] == "draining"
                code, h = await health()
                assert code == 503 and h["status"] == "draining"
                evs, close = await closed_with(s)
                assert [e["error"]["code"] for e in evs if e["type"] == "error"] == ["session_ending"] and close == 1012
            await asyncio.wait_for(server.drainer.wait(), 5)
            m = await scrape(p)
            assert value(m, "omnistream_draining") == 1
            assert value(m, "omnistream_sessions_refused_total", reason="full") == 1
        async with serving(InProcClient(tiny), config()) as server:
            await server.client.close()  # the pipeline stops
            code, _, b = await request(server.port, "GET", "/health")
            assert code == 503 and json.loads(b)["status"] == "unavailable"
            assert (await request(server.port, "GET", "/livez"))[0] == 200
    run(body())


def test_admin_drain_is_authorised(tiny):
    async def body():
        async with serving(InProcClient(tiny), config(api_key="k")) as server:
            p = server.port
            assert (await request(p, "POST", "/admin/drain"))[0] == 401
            assert not server.draining
            assert (await request(p, "POST", "/admin/drain", {"Authorization": "Bearer k"}))[0] == 202
            assert server.draining
        async with serving(InProcClient(tiny), config()) as server:
            p = server.port
            code, h, _ = await request(p, "GET", "/admin/drain")
            assert code == 405 and h["allow"] == "POST"
            assert (await request(p, "PUT", "/admin/drain"))[0] == 405
            # no key: loopback only, and not passed on by a proxy on this machine
            assert (await request(p, "POST", "/admin/drain", {"X-Forwarded-For": "203.0.113.9"}))[0] == 403
            assert not server.draining
            code, _, b = await request(p, "POST", "/admin/drain", {"Content-Length": "0"})
            assert code == 202 and json.loads(b) == {"status": "draining", "sessions": 0, "grace_s": 30.0,
                                                     "already_draining": False}
            await asyncio.wait_for(server.drainer.wait(), 5)  # no session: drained at once
            assert json.loads((await request(p, "POST", "/admin/drain"))[2])["already_draining"] is True
    run(body())


# ---------------------------------------------------------------------------------- drain
@pytest.mark.slow
def test_drain_lets_the_running_reply_finish_and_closes_idle_sessions(tiny):
    async def body():
        cfg = config(defaults=LONG, server_vad=False, drain_grace_s=30)
        async with serving(InProcClient(tiny), cfg) as server, connect(url(server)) as wa, connect(url(server)) as wb:
            a, b = Session(wa), Session(wb)
            await a.until("session.created")
            await b.until("session.created")
            await text_turn(a)
            await a.until("response.output_audio.delta")
            t0 = time.monotonic()
            assert (await request(server.port, "POST", "/admin/drain"))[0] == 202
            evs, close = await closed_with(b, 10)  # the idle session: told at once
            assert [e["error"]["code"] for e in evs if e["type"] == "error"] == ["session_ending"] and close == 1012
            assert time.monotonic() - t0 < 1.0
            with pytest.raises(InvalidStatus) as e:  # new sessions: 503 at once
                await connect(url(server))
            assert e.value.response.status_code == 503 and b"draining" in e.value.response.body
            evs, close = await closed_with(a, 30)  # the running reply: finished, then told
            done = next(e for e in evs if e["type"] == "response.done")["response"]
            assert done["status"] in ("completed", "incomplete")
            assert (done["status_details"] or {}).get("reason") != "server_shutdown"
            assert any(e["type"] == "response.output_audio.delta" for e in evs)  # audio went on after the drain
            assert evs[-1]["type"] == "error" and evs[-1]["error"]["code"] == "session_ending" and close == 1012
            await asyncio.wait_for(server.drainer.wait(), 5)
            assert time.monotonic() - t0 < cut_time(30)
            assert value(await scrape(server.port), "omnistream_sessions_refused_total", reason="draining") == 1
    run(body())


@pytest.mark.slow
def test_drain_cuts_a_reply_still_running_at_the_end_of_the_grace(tiny):
    async def body():
        grace = 4.0  # the cut at 2 s: the ~6-s reply is running; 2 s for its end and the close on a loaded CPU
        cfg = config(defaults=LONGER, server_vad=False, drain_grace_s=grace)
        async with serving(InProcClient(tiny), cfg) as server, connect(url(server)) as ws:
            s = Session(ws)
            await s.until("session.created")
            await text_turn(s)
            await s.until("response.output_audio.delta")
            t0 = time.monotonic()
            assert (await request(server.port, "POST", "/admin/drain"))[0] == 202
            evs, close = await closed_with(s, 10)
            dt = time.monotonic() - t0
            done = next((e for e in evs if e["type"] == "response.done"), {}).get("response")
            assert done and done["status"] == "incomplete", ([e["type"] for e in evs[-8:]], close, dt)
            assert done["status_details"]["reason"] == "server_shutdown" and close == 1012, (done, close)
            await asyncio.wait_for(server.drainer.wait(), 5)
            assert cut_time(grace) <= dt < grace
    run(body())


@pytest.mark.process
def test_sigterm_drains_and_exits_0_within_the_grace(tiny_dir, tmp_path):
    """A real ``serve`` process: SIGTERM with one reply running and one idle session; JSON log lines."""
    grace = 20
    err = open(tmp_path / "stderr", "w+")  # noqa: SIM115 (read after the process ends)
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnistream", "serve", "--model", str(tiny_dir), "--port", "0", "--no-vad", "--seed", "0",
         "--max-new-tokens", "64", "--max-speech-s", "20", "--drain-grace-s", str(grace), "--log-json"],
        stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = [None]
        reader = threading.Thread(target=lambda: line.__setitem__(0, proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(90)
        m = re.search(r"ws://127\.0\.0\.1:(\d+)/v1/realtime", line[0] or "")
        assert m, (line[0], open(tmp_path / "stderr").read()[-2000:])
        u = f"ws://127.0.0.1:{m.group(1)}/v1/realtime"

        async def body():
            async with connect(u) as wa, connect(u) as wb:
                a, b = Session(wa), Session(wb)
                await a.until("session.created")
                await b.until("session.created")
                await text_turn(a)
                await a.until("response.output_audio.delta")
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                evs, close = await closed_with(b, 10)
                assert evs[-1]["error"]["code"] == "session_ending" and close == 1012
                evs, close = await closed_with(a, grace)
                done = next(e for e in evs if e["type"] == "response.done")["response"]
                assert done["status"] in ("completed", "incomplete") and close == 1012
                return t0

        t0 = run(body())
        assert proc.wait(grace) == 0
        dt = time.monotonic() - t0
        print(f"SIGTERM -> exit 0 in {dt:.2f} s with one reply running and one idle session (grace {grace} s)")
        assert dt < grace
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    err.seek(0)
    lines = [json.loads(x) for x in err.read().splitlines() if x.strip()]  # every line is JSON
    events = [x.get("event") for x in lines]
    for ev in ("session.open", "turn", "session.close", "drain.start", "drain.done"):
        assert ev in events, (ev, events)
    turn = next(x for x in lines if x.get("event") == "turn")
    assert turn["first_token_s"] > 0 and turn["first_audio_s"] >= turn["first_token_s"] and turn["session"]
    err.close()


# ---------------------------------------------------------------------------------- per-IP cap
def test_sessions_per_client_address_are_capped(tiny):
    async def body():
        async with serving(InProcClient(tiny), config(max_sessions_per_ip=2)) as server, \
                connect(url(server)) as w1, connect(url(server)) as w2:
            for w in (w1, w2):
                await Session(w).until("session.created")
            with pytest.raises(InvalidStatus) as e:
                await connect(url(server))
            r = e.value.response
            assert r.status_code == 429 and b"too many sessions from 127.0.0.1 (max 2" in r.body
            assert r.headers["Retry-After"] == "5"
            # behind a trusted proxy (loopback by default) the client is the X-Forwarded-For address
            fwd = {"X-Forwarded-For": "198.51.100.7"}
            async with connect(url(server), additional_headers=fwd) as w3, \
                    connect(url(server), additional_headers={"X-Forwarded-For": "10.1.1.1, 198.51.100.7"}) as w4:
                for w in (w3, w4):
                    await Session(w).until("session.created")
                with pytest.raises(InvalidStatus) as e:
                    await connect(url(server), additional_headers=fwd)
                assert e.value.response.status_code == 429 and b"198.51.100.7" in e.value.response.body
            await w2.close()
            for _ in range(100):  # the slot is given back when the session's cleanup ran
                if len(server.sessions) == 1:
                    break
                await asyncio.sleep(0.02)
            async with connect(url(server)) as w5:
                await Session(w5).until("session.created")
            assert value(await scrape(server.port), "omnistream_sessions_refused_total", reason="per_ip") == 2
        async with serving(InProcClient(tiny), config(max_sessions_per_ip=1, trusted_proxies=())) as server, \
                connect(url(server)) as w1:
            await Session(w1).until("session.created")
            with pytest.raises(InvalidStatus) as e:  # an untrusted peer's X-Forwarded-For is its own word
                await connect(url(server), additional_headers={"X-Forwarded-For": "198.51.100.8"})
            assert e.value.response.status_code == 429
    run(body())


def test_cli_serve_ops_options():
    from omnistream.cli import build_parser

    a = build_parser().parse_args(["serve", "--drain-grace-s", "12.5", "--max-sessions-per-ip", "0", "--log-json",
                                   "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1", "--seed", "3"])
    assert (a.drain_grace_s, a.max_sessions_per_ip, a.log_json, a.trusted_proxy, a.seed) == (
        12.5, 0, True, ["10.0.0.0/8", "::1"], 3)
    d = build_parser().parse_args(["serve"])
    assert (d.drain_grace_s, d.max_sessions_per_ip, d.log_json, d.trusted_proxy) == (30.0, 4, False, None)
    for bad in (["--drain-grace-s", "0"], ["--max-sessions-per-ip", "-1"], ["--trusted-proxy", "10.0.0.0/33"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["serve", *bad])
        assert e.value.code == 2, bad


@pytest.mark.slow
@pytest.mark.process
def test_metrics_of_the_stage_runtime_and_a_stage_restart(tiny_dir):
    """Over ZeroMQ stage processes the per-stage figures come from the stages' pongs; a stage
    killed with SIGKILL is counted in ``omnistream_stage_restarts_total`` once it is back."""
    from omnistream.runtime.procclient import MultiProcClient

    async def body():
        client = MultiProcClient(str(tiny_dir), "all-in-one", max_sessions=2, hang_timeout_s=300, headroom=None,
                                 ping_interval_s=0.2)
        async with serving(client, config(server_vad=False)) as server, connect(url(server)) as ws:
            s = Session(ws)
            await s.until("session.created")
            await text_turn(s)
            await s.until("response.done", 60)
            await asyncio.sleep(0.5)  # a pong after the reply carries the stage's figures
            m = await scrape(server.port)
            (stage,) = [st["name"] for st in client.status()["stages"]]
            assert value(m, "omnistream_stage_up", stage=stage) == 1
            assert value(m, "omnistream_batch_calls_total", stage=stage, worker="thinker", kind="thinker.decode") > 0
            assert value(m, "omnistream_scheduler_ticks_total", stage=stage, worker="talker") > 0
            assert value(m, "omnistream_stage_restarts_total", stage=stage) == 0
            os.kill(client.status()["stages"][0]["pid"], signal.SIGKILL)
            for _ in range(1200):  # restarted (a fresh process loads the model: seconds on a busy CPU)
                m = await scrape(server.port)
                if value(m, "omnistream_stage_restarts_total", stage=stage) == 1 and \
                        value(m, "omnistream_stage_up", stage=stage) == 1:
                    break
                await asyncio.sleep(0.1)
            assert value(m, "omnistream_stage_restarts_total", stage=stage) == 1
            assert value(m, "omnistream_stage_up", stage=stage) == 1
    run(body(), 150)
