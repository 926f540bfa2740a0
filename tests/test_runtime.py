"""Stage runtime: layouts, the stage process and the supervisor, with real processes and sockets.

Supervisor mechanics run on ``echo`` stages (no model: a start costs an interpreter, not a
checkpoint); the kill -9 test runs the real pipeline (tiny checkpoint, ``split`` layout).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from omnistream.runtime import layout as L
from omnistream.runtime import wire
from omnistream.runtime.supervisor import Supervisor

PCM = np.linspace(-1, 1, 960, dtype=np.float32)  # 40 ms at 24 kHz


# ---------------------------------------------------------------------------------- /proc helpers
def children(pid: int) -> set[int]:
    """Live child pids of ``pid`` whose command line is a multiprocessing spawn (a stage)."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z" and b"spawn_main" in cmd:
            out.add(int(d))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------- layouts
def test_builtin_layouts():
    a = L.load("all-in-one")
    assert [s.workers for s in a.stages] == [L.PIPELINE]
    s = L.load("split", device="cuda:1")
    assert [st.workers for st in s.stages] == [(w,) for w in L.PIPELINE]
    assert {st.device for st in s.stages} == {"cuda:1"}
    r = s.resolved("/tmp/x")
    assert r.stage_of("talker").address == "ipc:///tmp/x/stage-talker" and r.control == "ipc:///tmp/x/control"


def test_yaml_and_cli_layouts(tmp_path):
    p = tmp_path / "l.yaml"
    p.write_text(textwrap.dedent("""\
        stages:
          - {name: front, workers: [encoders, thinker], device: "cuda:0"}
          - {name: speech, workers: [talker, token2wav], device: cpu, address: "tcp://127.0.0.1:5601", threads: 2}
        control: tcp://127.0.0.1:5600
    """))
    lay = L.load(p)
    assert lay.stage_of("thinker").name == "front" and lay.stage_of("token2wav").address == "tcp://127.0.0.1:5601"
    assert lay.stage_of("talker").threads == 2 and lay.control == "tcp://127.0.0.1:5600"
    cli = L.load("encoders+thinker@cuda:0,talker+token2wav=tcp://127.0.0.1:5601")
    assert [(s.workers, s.device, s.address) for s in cli.stages] == [
        (("encoders", "thinker"), "cuda:0", None), (("talker", "token2wav"), "cpu", "tcp://127.0.0.1:5601")]


@pytest.mark.parametrize("text, match", [
    ("stages: [", "not valid YAML"),
    ("- a\n- b", "expected a mapping"),
    ("stages: []", "non-empty list"),
    ("stages:\n  - workers: [encoders, thinker, talker]", "no stage hosts token2wav"),
    ("stages:\n  - workers: [encoders, thinker, talker, token2wav, thinker]", "listed twice"),
    ("stages:\n  - workers: [encoders, thinker]\n  - workers: [thinker, talker, token2wav]", "more than one stage"),
    ("stages:\n  - workers: [encoders, thinker, talker, tokenwav]", "unknown worker 'tokenwav'"),
    ("stages:\n  - {workers: [echo], device: gpu0}", "bad device 'gpu0'"),
    ("stages:\n  - {workers: [echo], address: 'tcp://host'}", "bad address"),
    ("stages:\n  - {workers: [echo], threads: 0}", "'threads' must be an int"),
    ("stages:\n  - {workers: [echo], gpu: 1}", "unknown key"),
    ("stages:\n  - {name: 'a b', workers: [echo]}", "names are"),
    ("stages:\n  - {workers: [echo]}\nport: 1", "unknown key"),
    ("stages:\n  - {workers: [echo], address: 'tcp://h:1', remote: true}", "needs tcp:// addresses everywhere"),
    ("stages:\n  - {workers: [echo], remote: 1}", "'remote' must be true or false"),
])
def test_bad_yaml_layouts_name_the_problem(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(L.LayoutError, match=match) as e:
        L.load(p)
    assert "bad.yaml" in str(e.value)


def test_bad_layout_names():
    with pytest.raises(L.LayoutError, match="unknown layout 'all-in-two'"):
        L.load("all-in-two")
    with pytest.raises(L.LayoutError, match="unknown worker 'vocoder'"):
        L.load("encoders+thinker,talker+vocoder")
    with pytest.raises(L.LayoutError, match="cannot read layout"):
        L.load("/nonexistent/layout.yaml")


def test_hwm_is_sized_in_time_and_bounded():
    from omnistream.runtime.stage import BUFFER_S, CHUNK_S, link_hwm

    assert link_hwm(1) == round(BUFFER_S / CHUNK_S) == 50  # 2 s of 40 ms chunks
    assert link_hwm(8) == 8 * 50 and link_hwm(0) == 50  # never 0 (= unlimited in ZeroMQ)


# ---------------------------------------------------------------------------------- supervisor
class Echo:
    """A supervisor over one echo stage, plus a data link to it (events PULL, input PUSH)."""

    def __init__(self, tmp_path, **kw):
        self.lost: list = []
        self.layout = L.from_cli("echo").resolved(tmp_path)
        self.sv = Supervisor(self.layout, None, on_lost=lambda n, r: self.lost.append((n, r)), **kw)

    async def __aenter__(self):
        await self.sv.start(60)
        self.pull = self.sv.ctx.socket(zmq.PULL)
        self.pull.bind(self.layout.events)
        self.push = self.sv.ctx.socket(zmq.PUSH)
        self.push.connect(self.layout.stages[0].address)
        return self

    async def __aexit__(self, *exc):
        self.pull.close(0)
        self.push.close(0)
        await self.sv.shutdown()

    @property
    def pid(self) -> int:
        return self.sv.stages["echo"].pid

    async def echo(self, seq: int, timeout: float = 10.0) -> int:
        msg = wire.AudioChunk(session="s", epoch=0, seq=seq, sample_rate=24000, pcm=PCM)
        await self.push.send_multipart(wire.encode(msg))
        back = wire.decode(await asyncio.wait_for(self.pull.recv_multipart(), timeout))
        np.testing.assert_array_equal(back.pcm, PCM)
        return back.seq

    async def wait_lost(self, n: int, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while len(self.lost) < n:
            assert time.monotonic() < end, f"no loss detected in {timeout}s: {self.sv.status()}"
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_handshake_ping_and_death_restart(tmp_path):
    async def main():
        async with Echo(tmp_path, ping_interval_s=0.1, hang_timeout_s=5.0) as e:
            st = e.sv.status()[0]
            assert st["state"] == "ready" and st["alive"] and st["pid"] in children(os.getpid())
            assert await e.echo(1) == 1
            await asyncio.sleep(0.5)
            assert e.sv.status()[0]["last_heartbeat_s"] < 0.5  # pongs keep arriving
            old = e.pid
            os.kill(old, signal.SIGKILL)
            await e.wait_lost(1)
            assert e.lost[0][0] == "echo" and "died (exit code -9)" in e.lost[0][1]
            await e.sv.wait_ready(60)
            assert e.pid != old and not alive(old) and e.sv.stages["echo"].restarts == 1
            assert await e.echo(2) == 2  # the data links reconnected to the new incarnation
        assert children(os.getpid()) == set()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_warm_spare_takes_over_a_killed_stage(tmp_path):
    async def main():
        async with Echo(tmp_path, ping_interval_s=0.1, spares=True) as e:
            while not e.sv.status()[0]["spare_ready"]:  # the spare loaded and said Hello; it is not serving
                await asyncio.sleep(0.05)
            old, spare = e.pid, e.sv.status()[0]["spare_pid"]
            assert spare in children(os.getpid()) and await e.echo(1) == 1
            os.kill(old, signal.SIGKILL)
            await e.wait_lost(1)
            await e.sv.wait_ready(60)
            assert e.pid == spare and await e.echo(2) == 2  # the spare serves at the same address
            while e.sv.status()[0]["spare_pid"] in (None, spare):  # and a new spare stands by
                await asyncio.sleep(0.05)
            assert children(os.getpid()) == {spare, e.sv.status()[0]["spare_pid"]}
        assert children(os.getpid()) == set()  # spares are stopped with the rest

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_hung_stage_is_detected_killed_and_restarted(tmp_path):
    async def main():
        async with Echo(tmp_path, ping_interval_s=0.1, hang_timeout_s=1.0) as e:
            old = e.pid
            os.kill(old, signal.SIGSTOP)  # alive but its main loop no longer runs: a hang, not a death
            t = time.monotonic()
            await e.wait_lost(1)
            assert "hung (no pong" in e.lost[0][1] and time.monotonic() - t < 5.0
            await e.sv.wait_ready(60)
            assert not alive(old) and e.pid != old
            assert await e.echo(3) == 3
            st = e.sv.status()[0]
            assert st["hangs"] == 1 and st["restarts"] == 1  # what /metrics exports (stage_hangs_total)

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_sigterm_to_a_stage_drains_it_and_it_exits_cleanly(tmp_path):
    async def main():
        async with Echo(tmp_path, ping_interval_s=0.1) as e:
            os.kill(e.pid, signal.SIGTERM)
            await e.wait_lost(1)
            assert "exit code 0" in e.lost[0][1]  # drained and exited; the supervisor restarts it
            await e.sv.wait_ready(60)
            assert await e.echo(4) == 4

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_handshake_rejects_other_protocols_both_ways(tmp_path):
    from omnistream.runtime.stage import Stage

    async def main():
        async with Echo(tmp_path) as e:
            ghost = e.sv.ctx.socket(zmq.DEALER)
            ghost.setsockopt(zmq.IDENTITY, b"ghost#1")
            ghost.connect(e.layout.control)
            await ghost.send_multipart(wire.encode(wire.Hello(stage="ghost", pid=1, protocol=wire.PROTOCOL_VERSION + 1)))
            await ghost.send_multipart(wire.encode(wire.Hello(stage="ghost", pid=1)))
            await ghost.send_multipart([b"\xc1garbage"])
            for _ in range(100):
                if len(e.sv.rejected) == 3:
                    break
                await asyncio.sleep(0.05)
            r = e.sv.rejected
            assert len(r) == 3 and f"speaks protocol {wire.PROTOCOL_VERSION + 1}" in r[0]
            assert "unknown stage" in r[1] and "bad message" in r[2]
            assert not await ghost.poll(200)  # no Ready for a stranger
            ghost.close(0)
            assert e.sv.status()[0]["state"] == "ready" and await e.echo(5) == 5  # the real stage is untouched

    asyncio.run(main())

    # the stage side: a supervisor answering with another protocol version is refused at once
    lay = L.from_cli("echo").resolved(tmp_path / "b")
    os.makedirs(tmp_path / "b")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(lay.control)
    stage = Stage(lay.stages[0], lay, None)
    try:
        stage.load()
        stage.hello()
        ident, *frames = router.recv_multipart()
        assert isinstance(wire.decode(frames), wire.Hello)
        router.send_multipart([ident, *wire.encode(wire.Ready(stage="supervisor", pid=1, protocol=99))])
        with pytest.raises(wire.WireError, match="protocol 99"):
            stage.wait_ready(timeout_s=5)
    finally:
        stage.close()
        router.close(0)
        ctx.term()


HARNESS = """
import asyncio, os, signal, sys
from omnistream.runtime.layout import from_cli
from omnistream.runtime.supervisor import Supervisor

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sv = Supervisor(from_cli("echo").resolved(sys.argv[1]), None)
    await sv.start(60)
    print(sv.stages["echo"].pid, flush=True)
    await stop.wait()
    await sv.shutdown()
    print("drained", flush=True)

if __name__ == "__main__":
    asyncio.run(main())
"""


def _harness(tmp_path) -> tuple[subprocess.Popen, int]:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


@pytest.mark.timeout(120)
def test_stages_die_with_a_killed_supervisor(tmp_path):
    p, stage = _harness(tmp_path)
    assert alive(stage)
    p.kill()  # SIGKILL: no cleanup code runs in the supervisor
    p.wait(10)
    end = time.monotonic() + 10
    while alive(stage) and time.monotonic() < end:
        time.sleep(0.05)
    assert not alive(stage), "PR_SET_PDEATHSIG should have killed the orphaned stage"


@pytest.mark.timeout(120)
def test_sigterm_to_the_supervisor_drains_and_exits(tmp_path):
    p, stage = _harness(tmp_path)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert p.stdout.read().strip() == "drained"
    assert not alive(stage)


# ---------------------------------------------------------------------------------- kill -9, real pipeline
@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("layout", ["all-in-one", "split"])
def test_kill_9_each_stage_during_live_sessions(tiny_dir, layout):
    """Every stage is killed mid-reply with two sessions talking: each session gets its reply or a
    ``stage_lost`` error, a new turn then works, and no process is left behind."""
    from omnistream.runtime.client import AudioDelta, ResponseDone, SessionError, SessionOptions, TextDelta
    from omnistream.runtime.procclient import MultiProcClient

    opts = SessionOptions(voice="Chelsie", max_new_tokens=24, max_speech_s=1.0)
    recovery, restart = {}, {}

    async def collect(c, sid, first: asyncio.Event):
        events = []
        async for ev in c.respond(sid):
            events.append(ev)
            first.set()
        return events

    async def main():
        c = MultiProcClient(tiny_dir, layout, hang_timeout_s=300, ping_interval_s=0.2, spares=True)
        await c.start()
        try:
            sids = [await c.open_session(opts) for _ in range(2)]
            for stage in [s["name"] for s in c.status()["stages"]]:
                while not all(s["spare_ready"] for s in c.status()["stages"]):  # warm spares loaded
                    await asyncio.sleep(0.1)
                for sid in sids:
                    await c.commit(sid, "please talk for a while")
                firsts = [asyncio.Event() for _ in sids]
                tasks = [asyncio.create_task(collect(c, sid, f)) for sid, f in zip(sids, firsts)]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 300)  # both replies are live
                pid = next(s["pid"] for s in c.status()["stages"] if s["name"] == stage)
                os.kill(pid, signal.SIGKILL)
                t_kill = time.monotonic()

                async def back(stage=stage, pid=pid, t_kill=t_kill):  # kill -> a new process serves the stage
                    while True:
                        st = next(s for s in c.status()["stages"] if s["name"] == stage)
                        if st["pid"] != pid and st["state"] == "ready":
                            break
                        await asyncio.sleep(0.01)
                    restart[stage] = round(time.monotonic() - t_kill, 2)

                watcher = asyncio.create_task(back())
                for events in await asyncio.wait_for(asyncio.gather(*tasks), 300):
                    last = events[-1]
                    assert isinstance(last, (ResponseDone, SessionError)), events
                    if isinstance(last, SessionError):
                        assert last.code == "stage_lost" and stage in last.message
                    assert all(isinstance(e, (TextDelta, AudioDelta)) for e in events[:-1])
                await asyncio.wait_for(watcher, 300)
                for sid in sids:  # a new turn works once the stage is back
                    c.take_errors(sid)
                    await c.commit(sid, "are you back?")
                    events = []
                    async for ev in c.respond(sid):
                        if not events:
                            recovery.setdefault(stage, round(time.monotonic() - t_kill, 1))  # kill -> first reply event
                        events.append(ev)
                    assert isinstance(events[-1], ResponseDone) and not events[-1].cancelled, events[-1]
                    assert any(isinstance(e, AudioDelta) for e in events)
                st = {s["name"]: s for s in c.status()["stages"]}
                assert st[stage]["pid"] != pid and st[stage]["restarts"] == 1 and not alive(pid)
                assert all(s["alive"] for s in st.values())
        finally:
            await c.close()
        assert children(os.getpid()) == set()

    asyncio.run(main())
    print(f"{layout}: kill -9 -> stage serving again {restart}, -> first event of the next turn {recovery} (s)")


# ---------------------------------------------------------------------------------- workers, in memory
def _worker(cls, tiny):
    sent = []
    return cls(tiny, lambda dest, msg, *t: sent.append((dest, msg, t))), sent


def test_token2wav_drops_codes_of_an_older_epoch(tiny):
    from omnistream.runtime.workers import Token2WavWorker

    w, sent = _worker(Token2WavWorker, tiny)
    opts = {"voice": "Chelsie", "max_new_tokens": 8, "max_speech_s": 1.0}
    w.deliver(wire.OpenSession(session="a", epoch=0, options=opts, req=7))
    assert [(d, type(m).__name__, m.req) for d, m, _ in sent] == [("client", "Result", 7)]
    sent.clear()
    w.deliver(wire.Respond(session="a", epoch=0))
    w.deliver(wire.Codes(session="a", epoch=0, codes=list(range(100, 150))))
    while w.tick():
        pass
    chunks = [m for _, m, _ in sent if isinstance(m, wire.AudioChunk)]
    assert chunks and all(m.epoch == 0 for m in chunks)  # 50 codes: the first chunks are out
    sent.clear()
    w.deliver(wire.Epoch(session="a", epoch=1))  # barge-in
    w.deliver(wire.Codes(session="a", epoch=0, codes=list(range(150, 200))))
    w.deliver(wire.EndReply(session="a", epoch=0, cancelled=False))
    while w.tick():
        pass
    assert [type(m).__name__ for _, m, _ in sent] == ["Done"] and sent[0][1].cancelled  # no PCM of epoch 0


def test_thinker_stops_a_reply_of_an_older_epoch_between_tokens(tiny):
    from omnistream.runtime.workers import ThinkerWorker

    w, sent = _worker(ThinkerWorker, tiny)
    w.deliver(wire.OpenSession(session="a", epoch=0, options={"max_new_tokens": 40}))
    w.deliver(wire.Commit(session="a", epoch=0, text="hello", req=1))
    w.deliver(wire.Respond(session="a", epoch=0))
    w.deliver(wire.Commit(session="a", epoch=0, text="queued behind the reply", req=2))
    assert w.tick() and w.tick()  # two tokens decoded, the reply goes on
    w.deliver(wire.Epoch(session="a", epoch=1))
    while w.tick():
        pass
    kinds = [type(m).__name__ for d, m, _ in sent if d == "client"]
    done = next(m for _, m, _ in sent if isinstance(m, wire.Done))
    assert done.cancelled and done.reply_tokens == 2 and done.epoch == 0  # no token after the barge-in
    assert kinds.index("Done") < kinds.index("Result", kinds.index("Result") + 1)  # the op waited for the reply
    assert not [m for _, m, _ in sent if isinstance(m, (wire.Step, wire.PromptRows))]  # text only: no talker


@pytest.mark.timeout(60)
def test_stage_links_work_over_tcp(tmp_path):
    import socket

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"

    async def main():
        lay = L.validate(L.Layout((L.StageSpec("echo", ("echo",), address=port()),), port(), port(), port(), "tcp"))
        sv = Supervisor(lay.resolved(tmp_path), None)
        await sv.start(60)
        ctx = sv.ctx
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind(lay.events)
        push.connect(lay.stages[0].address)
        try:
            msg = wire.AudioChunk(session="s", epoch=0, seq=9, sample_rate=24000, pcm=PCM)
            await push.send_multipart(wire.encode(msg))
            back = wire.decode(await asyncio.wait_for(pull.recv_multipart(), 10))
            assert back.seq == 9 and np.array_equal(back.pcm, PCM)
        finally:
            pull.close(0)
            push.close(0)
            await sv.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_remote_stage_connects_by_tcp_and_is_waited_for_after_a_loss(tmp_path):
    """A ``remote: true`` stage is started by hand (as on another host) and connects back; when it goes
    silent the supervisor reports the loss and waits for it to reconnect."""
    import socket

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"

    p = tmp_path / "remote.yaml"
    p.write_text(f"stages:\n  - {{name: far, workers: [echo], address: '{port()}', remote: true}}\n"
                 f"control: '{port()}'\nevents: '{port()}'\nepochs: '{port()}'\n")
    lay = L.load(p)
    cmd = [sys.executable, "-m", "omnistream.runtime.stage", "--layout", str(p), "--stage", "far"]

    async def main():
        lost = []
        sv = Supervisor(lay, None, ping_interval_s=0.1, hang_timeout_s=1.0, on_lost=lambda n, r: lost.append(r))
        starting = asyncio.create_task(sv.start(60))
        first = subprocess.Popen(cmd)  # noqa: ASYNC220
        await starting
        ctx = sv.ctx
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind(lay.events)
        push.connect(lay.stages[0].address)

        async def echo(seq):
            msg = wire.AudioChunk(session="s", epoch=0, seq=seq, sample_rate=24000, pcm=PCM)
            await push.send_multipart(wire.encode(msg))
            return wire.decode(await asyncio.wait_for(pull.recv_multipart(), 10)).seq

        try:
            assert sv.status()[0]["pid"] == first.pid and await echo(1) == 1
            first.kill()
            first.wait(10)
            while not lost:
                await asyncio.sleep(0.05)
            assert "silent" in lost[0] and not sv.ready and sv.status()[0]["state"] == "waiting"
            second = subprocess.Popen(cmd)  # noqa: ASYNC220 -- its host restarts it
            await sv.wait_ready(60)
            assert sv.status()[0]["pid"] == second.pid and await echo(2) == 2
        finally:
            pull.close(0)
            push.close(0)
            await sv.shutdown()
        assert second.wait(30) == 0  # Shutdown reached it over tcp: it drained and exited

    asyncio.run(main())
