"""Two ``omnistream serve`` replicas behind a real HAProxy running the shipped ``deploy/haproxy.cfg``
(issue 15): sessions spread over both, a full replica gets none, a killed replica is marked down
within its check interval and new sessions go on, a drained replica finishes its running reply,
tells its idle sessions (1012) and gets no new ones.

The processes are the real ones: ``python -m omnistream serve`` children on loopback ports with the
tiny checkpoint, and ``haproxy`` on the rendered copy of the shipped config (only its addresses,
ports, check intervals and socket path differ: ``benchmarks/scale.py::render_haproxy_cfg``). The
oracles are the replicas' own ``/status`` connection counts and ``/health``, the replies the
clients receive, and HAProxy's own server state from its runtime API. The tests run in file order
on one module-scoped cluster: spread, metric series, full, kill (then the replica is restarted), drain.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_server import Session
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from benchmarks.scale import cluster, haproxy_exe, http_get, text_reply

pytestmark = [pytest.mark.process, pytest.mark.timeout(120),
              pytest.mark.skipif(haproxy_exe() is None,
                                 reason="haproxy is not installed (apt-get install haproxy; tools/system-deps.sh does it)")]
CAP = 4  # --max-sessions of each replica
INTER_MS = 200  # check interval: the shipped 2 s scaled down (fastinter = inter / 4)
FALL = 2  # the shipped `fall`: checks failed before a replica is marked down
GRACE_S = 10  # --drain-grace-s
SLACK_S = 1.5  # a loaded shared CPU: scheduling delay on top of HAProxy's own timing


def serve_args() -> tuple[str, ...]:
    # every test client is 127.0.0.1: no per-address cap
    return ("--max-sessions", str(CAP), "--headroom", "0", "--rate-limit", "0", "--max-new-tokens", "8",
            "--max-speech-s", "2", "--max-sessions-per-ip", "0", "--drain-grace-s", str(GRACE_S))


@pytest.fixture(scope="module")
def lb(tiny_dir, tmp_path_factory):
    """(HAProxy, [replica1, replica2]); the list is updated when a test restarts a replica."""
    with cluster(tiny_dir, tmp_path_factory.mktemp("haproxy"), 2, serve_args(), inter_ms=INTER_MS) as (proxy, reps):
        yield proxy, reps


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def connections(reps) -> list[int]:
    """Each replica's own count of open sessions (its ``/status``)."""
    return [r.status()["connections"] for r in reps]


async def open_sessions(url: str, n: int) -> list:
    """``n`` sessions opened one after another (each answered ``session.created``)."""
    out = []
    for _ in range(n):
        ws = await connect(url, max_size=None)
        s = Session(ws)
        await s.until("session.created", 20)
        out.append(s)
    return out


async def close_all(sessions) -> None:
    await asyncio.gather(*(s.ws.close() for s in sessions))


def wait_connections(reps, want: list[int], timeout: float = 10) -> None:
    """Until every replica counts ``want`` sessions (a close takes a moment to reach the server)."""
    deadline = time.monotonic() + timeout
    while (got := connections(reps)) != want:
        assert time.monotonic() < deadline, (got, want)
        time.sleep(0.05)


async def spoken_reply(s: Session) -> dict:
    """A typed turn on an open session; its ``response.done`` and the audio seconds it carried."""
    await s.send("conversation.item.create",
                 item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})
    n0 = len(s.events)
    await s.send("response.create")
    done = await s.until("response.done", 60)
    audio = sum(len(e["delta"]) for e in s.events[n0:] if e["type"] == "response.output_audio.delta")
    return {"status": done["response"]["status"], "audio_b64_chars": audio}


# ---------------------------------------------------------------------------------- tests
def test_six_sessions_spread_over_both_replicas(lb):
    """Least connections: six sessions opened one by one land three on each replica (counted by the
    replicas themselves), and every one of them gets a spoken reply through the balancer."""
    proxy, reps = lb

    async def body():
        sessions = await open_sessions(proxy.url, 6)
        try:
            assert connections(reps) == [3, 3]
            stats = proxy.server_stats()
            assert [int(stats[s]["scur"]) for s in proxy.servers] == [3, 3]
            replies = await asyncio.gather(*(spoken_reply(s) for s in sessions))
            assert all(r["status"] in ("completed", "incomplete") and r["audio_b64_chars"] > 0 for r in replies), replies
            # least connections, not turns: with replica 1's three closed, the next three all go there
            routes = proxy.routes()
            on_1 = [s for s in sessions if routes[s.ws.local_address[1]] == "replica1"]
            await close_all(on_1)
            sessions = [s for s in sessions if s not in on_1]
            wait_connections(reps, [0, 3])
            sessions += await open_sessions(proxy.url, 3)
            assert connections(reps) == [3, 3]
        finally:
            await close_all(sessions)

    run(body())
    wait_connections(reps, [0, 0])


def test_dashboard_and_autoscaler_query_live_series(lb):
    """Every series the Grafana dashboard and the autoscaler query is in a live scrape: ``haproxy_*``
    from HAProxy's exporter (the config's stats frontend), ``omnistream_*`` from a replica that
    has served replies (both parsed with the Prometheus text parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    proxy, reps = lb
    root = Path(__file__).resolve().parents[1] / "deploy"

    def series(url: str) -> set[str]:
        code, text = http_get(url)
        assert code == 200, (url, code)
        return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}

    live = series(f"http://127.0.0.1:{proxy.stats_port}/metrics") | series(f"http://{reps[0].addr}/metrics")
    exprs = [t["expr"] for p in json.loads((root / "grafana-dashboard.json").read_text())["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(?:omnistream|haproxy)_[a-z_]+", e)}
    hpa = yaml.safe_load((root / "k8s" / "hpa.yaml").read_text())
    used.add(hpa["spec"]["metrics"][0]["pods"]["metric"]["name"])
    assert any(m.startswith("haproxy_") for m in used)
    assert used <= live, sorted(used - live)


def test_a_full_replica_gets_no_new_sessions(lb):
    """Replica 2 filled to its --max-sessions by direct clients answers /health 503 ``full``;
    HAProxy takes it out, so sessions through the balancer all land on replica 1 and none is even
    tried on replica 2 (HAProxy's own session total for it does not move). With both full, a
    client gets 503 from the balancer; when replica 2 empties it is back in the rotation."""
    proxy, reps = lb

    async def body():
        direct = await open_sessions(f"ws://{reps[1].addr}/v1/realtime", CAP)
        routed = []
        try:
            code, health = http_get(f"http://{reps[1].addr}/health")
            assert code == 503 and json.loads(health)["status"] == "full", (code, health)
            took = proxy.wait_status("replica2", "DOWN", 10)
            assert took <= (INTER_MS + (FALL - 1) * INTER_MS / 4) / 1000 + SLACK_S
            tried_before = int(proxy.server_stats()["replica2"]["stot"])
            routed = await open_sessions(proxy.url, CAP)
            assert connections(reps) == [CAP, CAP]
            assert int(proxy.server_stats()["replica2"]["stot"]) == tried_before
            with pytest.raises(InvalidStatus) as refused:  # every replica full: the client is told to come back
                await connect(proxy.url)
            assert refused.value.response.status_code == 503
        finally:
            await close_all(direct + routed)

    run(body())
    wait_connections(reps, [0, 0])
    proxy.wait_status("replica1", "UP", 10)
    proxy.wait_status("replica2", "UP", 10)


def test_a_killed_replica_is_marked_down_and_new_sessions_succeed(lb):
    """SIGKILL replica 2: HAProxy marks it DOWN within its check interval (inter + the fastinter
    checks up to `fall`), every new session succeeds (on replica 1) and gets a reply; restarted on
    its port, replica 2 is back UP after `rise` checks."""
    proxy, reps = lb
    dead = reps[1]
    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(10)
    took = proxy.wait_status("replica2", "DOWN", 10)
    assert took <= (INTER_MS + (FALL - 1) * INTER_MS / 4) / 1000 + SLACK_S, took

    async def body():
        sessions = await open_sessions(proxy.url, 3)
        try:
            assert connections(reps[:1]) == [3]
            reply = await spoken_reply(sessions[-1])
            assert reply["audio_b64_chars"] > 0, reply
        finally:
            await close_all(sessions)

    run(body())
    wait_connections(reps[:1], [0])
    reps[1] = dead.respawn().wait_ready()
    proxy.wait_status("replica2", "UP", 20)


def test_drain_mid_reply(lb):
    """SIGTERM replica 2 while one of its sessions is mid-reply and another is idle: the reply runs
    to its own end (``response.done``, not cut by the drain), the idle session gets an ``error`` event
    and close code 1012, both close with 1012; sessions opened meanwhile all land on replica 1; the
    replica exits 0 within its grace period."""
    proxy, reps = lb
    target = reps[1]

    async def body():
        url = f"ws://{target.addr}/v1/realtime"
        started = asyncio.Event()
        busy = asyncio.create_task(text_reply(url, started, wait_close=True))
        idle_ws = await connect(url, max_size=None)
        idle = Session(idle_ws)
        await idle.until("session.created", 20)
        await asyncio.wait_for(started.wait(), 60)
        t0 = time.monotonic()
        target.proc.send_signal(signal.SIGTERM)
        err = await idle.until("error", 10)
        assert err["error"]["code"] == "session_ending", err
        await idle_ws.wait_closed()
        assert idle_ws.close_code == 1012
        fresh = await open_sessions(proxy.url, 3)  # while replica 2 drains
        try:
            assert connections(reps[:1]) == [3]
        finally:
            await close_all(fresh)
        rc = await asyncio.to_thread(target.proc.wait, GRACE_S + 5)
        reply = await asyncio.wait_for(busy, 10)
        return rc, t0, time.monotonic() - t0, reply

    rc, t_term, took, reply = run(body())
    assert rc == 0 and took <= GRACE_S + SLACK_S, (rc, took)
    # the reply ran to its own end (its speech limit at most), not cut by the drain
    assert reply["status"] in ("completed", "incomplete") and reply["reason"] != "server_shutdown", reply
    after = sum(sec for t, sec in reply["audio_at"] if t > t_term)
    assert after > 0 and reply["close_code"] == 1012, (after, reply)  # mid-reply at the signal, and it went on
