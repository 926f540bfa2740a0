"""Stages on several hosts: the layout's address/bind split, a remote stage's ``--respawn`` keeper and
the supervisor re-attaching it, and a voice turn across two network namespaces joined by a veth pair.

The namespace test makes two "hosts" on this machine (``ip netns``, root only: skipped elsewhere):
host A (10.77.N.1) runs the client, the supervisor and the ``encoders+thinker`` stage it spawns;
host B (10.77.N.2) runs the ``talker+token2wav`` stage, started there by hand as an operator would
(``ip netns exec B python -m omnistream.runtime.stage --respawn ...``). Everything between them is
real TCP over the veth link. Oracles: the reply (text and audio) equals the in-process client's
with the same seed and input; after a kill -9 of the remote stage the running turn is reported
``stage_lost``, the keeper starts a new process, the supervisor re-attaches it and the conversation
restarts fresh -- so the same input then gives the in-process reply again.

The rest runs on loopback with ``echo`` stages (no model, no root): a kill -9 is noticed through the
closed connection well before the hang timeout, or at the new process's Hello when that comes first.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from omnistream.runtime import layout as L

ROOT = Path(__file__).resolve().parent.parent
VOICE = dict(voice="Chelsie", max_new_tokens=8, max_speech_s=1.0, seed=7)
LONG = dict(VOICE, max_speech_s=4.0)  # the turn that is killed: long enough to be cut mid-speech


# ---------------------------------------------------------------------------------- layouts: address + bind
def test_layout_says_where_peers_connect_and_where_a_stage_listens(tmp_path):
    p = tmp_path / "two-hosts.yaml"
    p.write_text("stages:\n"
                 "  - {name: front, workers: [encoders, thinker], address: 'tcp://10.0.0.1:5604'}\n"
                 "  - {name: speech, workers: [talker, token2wav], address: 'tcp://hostb.example:5601',\n"
                 "     bind: 'tcp://*:5601', remote: true}\n"
                 "control: tcp://10.0.0.1:5600\nevents: tcp://10.0.0.1:5602\nepochs: tcp://10.0.0.1:5603\n"
                 "bind: {control: 'tcp://0.0.0.0:5600', events: 'tcp://eth1:5602'}\n")
    lay = L.load(p)
    speech, front = lay.stage_of("talker"), lay.stage_of("thinker")
    assert (speech.address, speech.listen) == ("tcp://hostb.example:5601", "tcp://*:5601")
    assert (front.address, front.listen) == ("tcp://10.0.0.1:5604", "tcp://10.0.0.1:5604")  # no bind: the address
    assert [lay.bind_of(k) for k in ("control", "events", "epochs")] == [
        "tcp://0.0.0.0:5600", "tcp://eth1:5602", "tcp://10.0.0.1:5603"]
    assert lay.resolved(tmp_path).stage_of("talker").bind == "tcp://*:5601"  # resolving keeps it


@pytest.mark.parametrize("text, match", [
    ("stages:\n  - {workers: [echo], address: 'tcp://*:5601'}", "wildcard its peers cannot connect to"),
    ("stages:\n  - {workers: [echo], address: 'tcp://0.0.0.0:5601'}", "put this host's address there"),
    ("stages:\n  - {workers: [echo], bind: 'tcp://*:5601'}", "'bind' needs an 'address'"),
    ("stages:\n  - {workers: [echo], address: 'ipc:///tmp/x', bind: 'tcp://*:1'}", "'bind' is for tcp://"),
    ("stages:\n  - {workers: [echo], address: 'tcp://h:1', bind: 'tcp://*'}", "bind: bad address"),
    ("stages:\n  - {workers: [echo], address: 'tcp://h:1', bind: 5}", "'bind' must be a string"),
    ("stages:\n  - {workers: [echo]}\nbind: {ctrl: 'tcp://*:1'}", "'bind' must map some of control"),
    ("stages:\n  - {workers: [echo]}\nbind: {control: 'tcp://*:1'}", "control: 'bind' needs an 'address'"),
    ("stages:\n  - {workers: [echo]}\ncontrol: 'tcp://h:1'\nbind: {control: 7}", "'bind.control' must be"),
])
def test_bad_binds_are_one_line_layout_errors(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(L.LayoutError, match=match) as e:
        L.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.process
def test_stage_command_refuses_a_bad_bind_in_one_line(tmp_path):
    p = tmp_path / "one.yaml"
    p.write_text(f"stages:\n  - {{name: far, workers: [echo], address: 'tcp://127.0.0.1:{free_port()}', remote: true}}\n"
                 + "".join(f"{k}: 'tcp://127.0.0.1:{free_port()}'\n" for k in ("control", "events", "epochs")))
    r = subprocess.run([sys.executable, "-m", "omnistream.runtime.stage", "--layout", str(p), "--stage", "far",
                        "--bind", "ipc:///tmp/nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--bind for stage 'far'" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------- --respawn + re-attach (loopback)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteEcho:
    """A supervisor on loopback and a remote ``echo`` stage started by hand with ``--respawn`` (as on
    another host). ``lost``: (time, reason) of each loss the supervisor reported."""

    def __init__(self, tmp_path: Path, *stage_args: str, port: int | None = None, **supervisor_kw):
        from omnistream.runtime.supervisor import Supervisor

        self.path, self.log = tmp_path / "remote.yaml", tmp_path / "keeper.log"
        self.path.write_text(f"stages:\n  - {{name: far, workers: [echo], address: 'tcp://127.0.0.1:{port or free_port()}', "
                             "remote: true}\n" + "".join(f"{k}: 'tcp://127.0.0.1:{free_port()}'\n"
                                                         for k in ("control", "events", "epochs")))
        self.layout = L.load(self.path)
        self.lost: list = []
        self.sv = Supervisor(self.layout, None, on_lost=lambda n, r: self.lost.append((time.monotonic(), r)),
                             **supervisor_kw)
        self.keeper = self.pull = self.push = None
        self.stage_args = stage_args

    async def __aenter__(self):
        import zmq

        starting = asyncio.create_task(self.sv.start(60))
        self.keeper = subprocess.Popen([sys.executable, "-m", "omnistream.runtime.stage", "--layout",  # noqa: ASYNC220
                                        str(self.path), "--stage", "far", "--respawn", "--log-level", "INFO",
                                        *self.stage_args], stderr=self.log.open("w"))
        try:
            await starting
        except BaseException:
            await self.__aexit__()
            raise
        self.pull, self.push = self.sv.ctx.socket(zmq.PULL), self.sv.ctx.socket(zmq.PUSH)
        self.pull.bind(self.layout.events)
        self.push.connect(self.layout.stages[0].address)
        return self

    async def echo(self, seq: int) -> int:
        from omnistream.runtime import wire

        pcm = np.linspace(-1, 1, 960, dtype=np.float32)
        msg = wire.AudioChunk(session="s", epoch=0, seq=seq, sample_rate=24000, pcm=pcm)
        await self.push.send_multipart(wire.encode(msg))
        return wire.decode(await asyncio.wait_for(self.pull.recv_multipart(), 10)).seq

    async def first_loss(self) -> tuple[float, str]:
        while not self.lost:
            await asyncio.sleep(0.02)
        return self.lost[0]

    async def __aexit__(self, *exc):
        for s in (self.pull, self.push):
            if s is not None:
                s.close(0)
        await self.sv.shutdown()
        try:
            self.rc = self.keeper.wait(30) if self.keeper is not None else None
        finally:
            if self.keeper is not None and self.keeper.poll() is None:
                self.keeper.kill()
                self.keeper.wait()


@pytest.mark.process
@pytest.mark.timeout(120)
@pytest.mark.parametrize("noticed_by", ["disconnect", "hello"])
def test_a_respawned_remote_stage_is_reattached_and_the_loss_reported(tmp_path, noticed_by):
    """kill -9 of a remote stage run with ``--respawn``: the keeper starts a new process and the
    supervisor reports the old one lost -- through its closed connection (``stall_s`` later), or at the
    new process's Hello when that comes first -- never only after the (long) hang timeout; the new
    process then serves. Shutdown reaches the keeper's child, which drains, and the keeper exits 0."""
    stall_s = 0.5 if noticed_by == "disconnect" else 60.0  # "hello": only the new process's Hello can tell

    async def main():
        async with RemoteEcho(tmp_path, ping_interval_s=0.1, hang_timeout_s=60.0, stall_s=stall_s) as r:
            first = r.sv.status()[0]["pid"]
            assert first != r.keeper.pid and await r.echo(1) == 1  # the stage is the keeper's child
            os.kill(first, signal.SIGKILL)
            t_kill = time.monotonic()
            t_lost, reason = await r.first_loss()
            assert t_lost - t_kill < 30, reason  # well before the 60 s hang timeout
            assert ("disconnected" if noticed_by == "disconnect" else "replaced on its host") in reason, reason
            await r.sv.wait_ready(60)
            st = r.sv.status()[0]
            assert st["pid"] not in (first, r.keeper.pid) and st["restarts"] == 1 and len(r.lost) == 1
            assert await r.echo(2) == 2
        log = r.log.read_text()
        assert not os.path.exists(r.sv.layout.run_dir)  # the private run directory it made is gone
        assert r.rc == 0, log  # Shutdown drained the child; the keeper ends with it
        assert "exited with signal 9; starting a new one" in log
        await tcp_still_works(r.sv.ctx)  # the disconnect monitor did not leave the shared I/O thread blocked

    asyncio.run(main())


async def tcp_still_works(ctx) -> None:
    """A tcp round trip in ``ctx`` (a supervisor's, shared by the process): its I/O thread is alive."""
    import zmq

    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        await b.send(b"ping")
        assert await asyncio.wait_for(a.recv(), 10) == b"ping"
    finally:
        a.close(0)
        b.close(0)


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_remote_stage_given_up_for_lost_that_answers_again_is_reattached(tmp_path):
    """A stopped remote process (or a link down) is lost after the hang timeout; when it answers pings
    again the supervisor attaches it again -- the same process, no respawn -- and it serves."""

    async def main():
        async with RemoteEcho(tmp_path, ping_interval_s=0.1, hang_timeout_s=1.0) as r:
            pid = r.sv.status()[0]["pid"]
            os.kill(pid, signal.SIGSTOP)
            try:
                _, reason = await r.first_loss()
                assert "silent" in reason and not r.sv.ready
            finally:
                os.kill(pid, signal.SIGCONT)
            await r.sv.wait_ready(30)
            st = r.sv.status()[0]
            assert st["pid"] == pid and st["state"] == "ready" and st["restarts"] == 1
            assert await r.echo(3) == 3
        assert r.rc == 0

    asyncio.run(main())


@pytest.mark.process
@pytest.mark.timeout(120)
def test_the_hosts_bind_override_and_sigterm_to_the_keeper(tmp_path):
    """``--bind`` makes the stage listen on every interface while peers connect to the layout's address;
    SIGTERM to the keeper drains its stage and both exit 0 (a deploy stopping the remote host)."""
    port = free_port()

    async def main():
        async with RemoteEcho(tmp_path, "--bind", f"tcp://0.0.0.0:{port}", port=port, ping_interval_s=0.1) as r:
            assert listening(None, port) == {"0.0.0.0"}  # the layout says 127.0.0.1: the override won
            assert await r.echo(4) == 4  # reached at the layout's address
            child = r.sv.status()[0]["pid"]
            r.keeper.send_signal(signal.SIGTERM)
            assert r.keeper.wait(30) == 0
            assert not os.path.exists(f"/proc/{child}")  # drained, exited and reaped by the keeper

    asyncio.run(main())


# ---------------------------------------------------------------------------------- two hosts: network namespaces
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def hosts():
    """Two network namespaces joined by a veth pair: {"a": (ns, ip), "b": (ns, ip)}. Teardown kills
    what still runs in them (only processes this test started live there) and deletes them."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need Linux, root and iproute2's `ip`")
    tag, net = f"os{os.getpid()}", f"10.77.{os.getpid() % 250 + 1}"
    names = {"a": f"{tag}a", "b": f"{tag}b"}
    made = []
    try:
        for side, ns in names.items():
            r = _ip("netns", "add", ns, check=False)
            if r.returncode != 0:
                pytest.skip(f"`ip netns add` failed: {r.stderr.strip()}")
            made.append(ns)
        _ip("link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b")
        for side, ns in names.items():
            dev, addr = f"v{tag}{side}", f"{net}.{1 if side == 'a' else 2}"
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {"a": (names["a"], f"{net}.1"), "b": (names["b"], f"{net}.2")}
    finally:
        for ns in made:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)  # takes the veth pair with it
        assert not {n for n in names.values() if n in _ip("netns", "list", check=False).stdout}


class Lines:
    """JSON lines from a child's stdout, read on a thread so a hung child cannot hang the test."""

    def __init__(self, proc: subprocess.Popen):
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(line) for line in proc.stdout], daemon=True).start()

    def next(self, timeout: float) -> dict:
        try:
            return json.loads(self.q.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no message from the driver in {timeout:.0f}s") from None


def listening(ns: str | None, port: int) -> set[str]:
    """The local addresses a TCP listener on ``port`` has in namespace ``ns`` (None: this one), from its
    /proc/net/tcp."""
    rows = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/tcp"] if ns else ["cat", "/proc/net/tcp"],
                          capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[1:]
    out = set()
    for row in rows:
        local, state = row.split()[1], row.split()[3]
        host, hport = local.split(":")
        if state == "0A" and int(hport, 16) == port:  # 0A: LISTEN
            out.add(socket.inet_ntoa(bytes.fromhex(host)[::-1]))
    return out


def two_host_layout(path: Path, a: str, b: str, threads: int) -> Path:
    """Host A: the supervisor's sockets and the front stage; host B: the speech stage, listening on every
    interface of B (``bind``) while A connects to B's address. ``threads``: as many as the oracle's."""
    path.write_text(
        "stages:\n"
        f"  - {{name: front, workers: [encoders, thinker], address: 'tcp://{a}:5604', threads: {threads}}}\n"
        f"  - {{name: speech, workers: [talker, token2wav], address: 'tcp://{b}:5601', bind: 'tcp://0.0.0.0:5601',"
        f" threads: {threads}, remote: true}}\n"
        f"control: tcp://{a}:5600\nevents: tcp://{a}:5602\nepochs: tcp://{a}:5603\n"
        "bind: {control: 'tcp://0.0.0.0:5600'}\n")
    return path


async def voice_turn(c, sid, pcm, on_event=None) -> list:
    """Speak ``pcm`` (16 kHz) in 40 ms pieces, commit, and return the reply's events."""
    from test_client import push_speech

    await push_speech(c, sid, pcm)
    await c.commit(sid)
    events = []
    async for ev in c.respond(sid):
        events.append(ev)
        if on_event is not None:
            on_event(ev, events)
    return events


def reply_of(events) -> tuple[str, np.ndarray]:
    from omnistream.runtime.client import AudioDelta, TextDelta

    pcm = [e.pcm for e in events if isinstance(e, AudioDelta)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), np.concatenate(pcm) if pcm else np.zeros(0)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(900)
def test_a_voice_turn_across_two_hosts_and_a_kill_9_of_the_remote_stage(hosts, tiny, tiny_dir, tmp_path):
    from test_client import speech

    from omnistream.runtime.client import InProcClient, SessionOptions

    (ns_a, ip_a), (ns_b, ip_b) = hosts["a"], hosts["b"]
    import torch

    # the oracle's thread count: then the float sums, so the sampled codes and the audio, are bit-identical
    lay = two_host_layout(tmp_path / "two-hosts.yaml", ip_a, ip_b, torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    keeper = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-m", "omnistream.runtime.stage",
                               "--layout", str(lay), "--stage", "speech", "--model", str(tiny_dir), "--respawn"],
                              env=env, stderr=(tmp_path / "keeper.log").open("w"))
    driver = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, __file__, str(lay), str(tiny_dir),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(driver)
        oracle = InProcClient(tiny)  # meanwhile, the same turn in this process: the oracle

        async def reference():
            await oracle.start()
            try:
                return reply_of(await voice_turn(oracle, await oracle.open_session(SessionOptions(**VOICE)), speech(1.5)))
            finally:
                await oracle.close()

        want_text, want_pcm = asyncio.run(reference())
        assert want_text and want_pcm.size

        first = lines.next(600)  # turn 1 across the hosts
        assert first["done"] == "ResponseDone", first
        got_pcm = np.load(tmp_path / "turn1.npy")
        assert first["text"] == want_text and got_pcm.shape == want_pcm.shape
        np.testing.assert_array_equal(got_pcm, want_pcm)
        assert listening(ns_b, 5601) == {"0.0.0.0"} and listening(ns_a, 5600) == {"0.0.0.0"}  # bind, not address
        assert listening(ns_a, 5604) == {ip_a}  # no bind: the stage listens on its address
        assert first["remote_pid"] != keeper.pid  # the keeper's child serves

        live = lines.next(300)  # turn 2 speaks: kill -9 the remote stage process (host B)
        os.kill(live["remote_pid"], signal.SIGKILL)
        lost = lines.next(300)
        assert lost["last"] == "SessionError" and lost["code"] == "stage_lost" and "speech" in lost["message"], lost
        assert lost["lost_after_s"] < 30, lost  # told through the closed connection, not the hang timeout

        back = lines.next(600)  # turn 3: the keeper's new process, re-attached; the conversation restarted fresh
        assert back["done"] == "ResponseDone" and back["remote_pid"] not in (live["remote_pid"], keeper.pid), back
        assert back["restarts"] == 1 and back["text"] == want_text, back
        np.testing.assert_array_equal(np.load(tmp_path / "turn3.npy"), want_pcm)
        print(f"two hosts: reply {want_pcm.size / 24000:.2f} s of audio, equal to the in-process one; "
              f"kill -9 -> turn reported lost {lost['lost_after_s']} s, "
              f"-> remote stage serving again {back['back_after_s']} s")

        assert lines.next(120) == {"closed": True}
        assert driver.wait(60) == 0
        assert keeper.wait(60) == 0  # the supervisor's Shutdown drained the remote stage; its keeper ended
    finally:
        for proc in (driver, keeper):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert left_in(ns_a) == {} and left_in(ns_b) == {}  # nothing orphaned on either host


def left_in(ns: str, settle_s: float = 10.0) -> dict[str, str]:
    """The processes still in namespace ``ns`` (pid -> command line) once ``settle_s`` has passed
    without it emptying: helpers such as multiprocessing's resource tracker exit a moment after
    their parent, an orphaned stage never does."""
    end = time.monotonic() + settle_s
    while True:
        pids = _ip("netns", "pids", ns).stdout.split()
        if not pids or time.monotonic() > end:
            break
        time.sleep(0.2)
    out = {}
    for pid in pids:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass  # it ended meanwhile
    return out


# ---------------------------------------------------------------------------------- the driver (host A)
async def _drive(layout: str, model: str, out: Path) -> None:
    """Runs in namespace A: the client and supervisor; reports each step as a JSON line on stdout."""
    from test_client import speech

    from omnistream.runtime.client import AudioDelta, SessionError, SessionOptions
    from omnistream.runtime.procclient import MultiProcClient

    def say(**kw):
        print(json.dumps(kw), flush=True)

    def remote(c) -> dict:
        return next(s for s in c.status()["stages"] if s["name"] == "speech")

    c = MultiProcClient(model, layout, ping_interval_s=0.2, hang_timeout_s=120, load_timeout_s=600, ready_timeout_s=600)
    await c.start()
    try:
        sid = await c.open_session(SessionOptions(**VOICE))
        events = await voice_turn(c, sid, speech(1.5))
        text, pcm = reply_of(events)
        np.save(out / "turn1.npy", pcm)
        say(done=type(events[-1]).__name__, text=text, remote_pid=remote(c)["pid"])

        await c.update_session(sid, SessionOptions(**LONG))
        t_kill = []

        def on_event(ev, events):
            if isinstance(ev, AudioDelta) and not t_kill:
                t_kill.append(time.monotonic())
                say(live=True, remote_pid=remote(c)["pid"])

        events = await voice_turn(c, sid, speech(1.5, seed=1), on_event)
        last = events[-1]
        say(last=type(last).__name__, code=getattr(last, "code", None), message=getattr(last, "message", None),
            lost_after_s=round(time.monotonic() - t_kill[0], 2))
        assert isinstance(last, SessionError)

        c.take_errors(sid)
        await c.supervisor.wait_ready(600)  # the keeper's new process said Hello and serves
        back_after_s = round(time.monotonic() - t_kill[0], 2)
        await c.update_session(sid, SessionOptions(**VOICE))
        events = await voice_turn(c, sid, speech(1.5))
        text, pcm = reply_of(events)
        np.save(out / "turn3.npy", pcm)
        st = remote(c)
        say(done=type(events[-1]).__name__, text=text, remote_pid=st["pid"], restarts=st["restarts"],
            back_after_s=back_after_s)
    finally:
        await c.close()
    say(closed=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    asyncio.run(_drive(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
