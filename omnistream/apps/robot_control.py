"""The robot app's outside interfaces: the control socket (ZeroMQ ROUTER, JSON commands) and HTTP
(`/health`, `/status`).

Both bind in the caller's thread at start-up (`ControlServer.bind`, `HttpServer.bind`), before the robot
process or an agent stage exists: an address already taken (a second `omnistream robot` on the same port,
say) is then a one-line start-up error, not a traceback in a background thread of an app that goes on
logging "running". Only once the robot answers do they start serving (`start`).

Commands (`{"type": ...}`, validated by msgspec; anything else is rejected with a logged reason and
changes nothing):

* ``instruction {"text", "max_steps"?}``: a new navigation task (replaces the running one);
* ``estop``: latch an emergency stop; the reply reports the state *after* the stop (the robot confirmed
  the latch with zero velocities);
* ``resume``: release the e-stop latch. The robot stays still: as ISO 13850 requires, resetting an
  emergency stop does not restart the machine;
* ``continue``: go on with the task held by an e-stop (after ``resume``);
* ``cancel``: end the running task, base stopped; ``status``: the status, nothing else.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated

import msgspec
import zmq

log = logging.getLogger("omnistream.robot")


class StartupError(RuntimeError):
    """The app cannot start; `code` is its exit status (2: bad configuration or an address in use)."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


# ---------------------------------------------------------------------------------------------- commands
class _Cmd(msgspec.Struct, forbid_unknown_fields=True, tag_field="type"):
    pass


class InstructionCmd(_Cmd, tag="instruction"):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    max_steps: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


class EStopCmd(_Cmd, tag="estop"):
    pass


class ResumeCmd(_Cmd, tag="resume"):
    pass


class ContinueCmd(_Cmd, tag="continue"):
    pass


class CancelCmd(_Cmd, tag="cancel"):
    pass


class StatusCmd(_Cmd, tag="status"):
    pass


CONTROL_DECODER = msgspec.json.Decoder(InstructionCmd | EStopCmd | ResumeCmd | ContinueCmd | CancelCmd | StatusCmd)


# ---------------------------------------------------------------------------------------------- control socket
class ControlServer:
    """The ROUTER socket and its thread; `handle` turns one message into one reply through the app."""

    def __init__(self, app):
        self.app = app
        self.sock = None
        self.counts = {"control_rejected": 0, "control_ok": 0}
        self.last_reject: str | None = None

    def bind(self, addr: str) -> None:
        sock = self.app.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(addr)
        except zmq.ZMQError as e:
            sock.close(0)
            hint = " (is another omnistream robot running?)" if e.errno == zmq.EADDRINUSE else ""
            raise StartupError(f"control socket {addr}: {zmq.strerror(e.errno)}{hint}", code=2) from None
        self.sock = sock

    def run(self) -> None:
        """Serve until the app stops (its own thread: the socket is used here only, then closed here)."""
        sock = self.sock
        try:
            while not self.app.stop_event.is_set():
                if not sock.poll(50):
                    continue
                frames = sock.recv_multipart()
                ident, rest = frames[0], frames[1:]
                envelope = [b""] if rest and rest[0] == b"" else []  # a REQ client's delimiter
                body = rest[len(envelope):]
                reply = self.handle(body[0] if len(body) == 1 else None, len(body))
                sock.send_multipart([ident, *envelope, json.dumps(reply).encode()])
        finally:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def handle(self, raw: bytes | None, nparts: int = 1) -> dict:
        """One control message -> reply; bad ones are rejected with a logged reason, nothing else happens."""
        if raw is None:
            return self.reject(f"expected one message frame, got {nparts}")
        try:
            cmd = CONTROL_DECODER.decode(raw)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            return self.reject(str(e))
        reply = self.execute(cmd, "control")
        if not reply["ok"]:
            return self.reject(reply["error"])
        self.counts["control_ok"] += 1
        return reply

    def execute(self, cmd: _Cmd, source: str) -> dict:
        """One validated command -> ``{"ok": True, ...}`` or ``{"ok": False, "error"}``. The one path for
        every command source -- this socket and the conversation's tools (omnistream/robot/tools.py) -- so
        that the safety rules cannot differ between them. ``source`` is recorded on a new task."""
        app = self.app
        if isinstance(cmd, InstructionCmd):
            if "navigate" not in app.cfg.modes:
                return {"ok": False, "error": "navigate mode is off"}
            t = app.submit(cmd.text, cmd.max_steps, source)
            return {"ok": True, "task": t.id}
        if isinstance(cmd, ContinueCmd):
            why = app.continue_task()
            if why is not None:
                return {"ok": False, "error": why}
        elif isinstance(cmd, EStopCmd):
            app.emergency_stop()
        elif isinstance(cmd, ResumeCmd):
            app.resume()
        elif isinstance(cmd, CancelCmd):
            app.cancel()
        return {"ok": True, "status": app.status()}

    def reject(self, why: str) -> dict:
        self.counts["control_rejected"] += 1
        self.last_reject = why
        log.warning("control: rejected command: %s", why)
        return {"ok": False, "error": why}


# ---------------------------------------------------------------------------------------------- http
class HttpServer:
    """GET /health (200 ok, 503 degraded) and GET /status, JSON, from a daemon thread."""

    def __init__(self, app):
        self.app = app
        self.server: ThreadingHTTPServer | None = None
        self.port: int | None = None
        self._thread: threading.Thread | None = None

    def bind(self, host: str, port: int) -> None:
        app = self.app

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/health":
                    ok, body = app.health()
                    self._send(200 if ok else 503, body)
                elif self.path == "/status":
                    self._send(200, app.status())
                else:
                    self._send(404, {"error": f"no such endpoint {self.path}; try /health or /status"})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):  # access logs at debug level, not on stderr
                log.debug("http: " + a[0], *a[1:])

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise StartupError(f"http {host}:{port}: {e.strerror or e}", code=2) from None
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def start(self) -> None:
        # a short poll interval: shutdown() waits for the loop to notice, and the app exits within 1 s
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.server is None:
            return
        if self._thread is not None:
            self.server.shutdown()
        self.server.server_close()
        self.server = None
