"""``omnistream serve``: an OpenAI-Realtime-compatible WebSocket server over the chat pipeline.

One asyncio process holds the WebSocket connections; the model work runs behind the
:class:`~omnistream.runtime.client.Client` interface (in this process on a worker thread, or in
ZeroMQ stage processes), so the event loop only moves events and never waits on a forward.

Endpoints (one port; plain HTTP is answered from ``process_request`` before any handshake):

- ``GET /v1/realtime`` (WebSocket): the Realtime protocol (:mod:`omnistream.apps.realtime`).
- ``GET /health`` (readiness, what a load balancer reads): 200 ``{"status": "ok"}`` while the replica
  takes sessions; 503 with ``status`` ``full`` (``--max-sessions`` or admission control),
  ``draining`` or ``unavailable`` (a stage down or stalled) and the reason.
- ``GET /livez`` (liveness): 200 while this process answers, whatever the pipeline does.
- ``GET /metrics``: Prometheus text format (:mod:`omnistream.apps.metrics`); needs the API key if set.
- ``POST /admin/drain``: start the drain (:mod:`omnistream.apps.drain`), as SIGTERM does; with an
  API key set it needs the key, without one only a loopback peer that no proxy forwarded may.
- ``GET /status``: the pipeline's stages (name, pid, alive, last heartbeat), sessions and queue
  depths, from ``Client.status()``; with an API key set, a request without it gets counts only
  (connections, stages alive): pids, ipc paths and session ids are operator data.
- ``GET /config.json``: what the browser page needs to know before connecting (whether it must
  ask for an API key).
- ``GET /`` and ``GET /web/<file>``: the browser client's static files (GET and HEAD only).

Per session (:mod:`omnistream.apps.realtime_session`): server VAD with silero-vad
(:mod:`omnistream.apps.vad`), reply audio paced in 40 ms deltas, barge-in that truncates the
conversation to what was played.

Security: loopback bind by default; the Host header must name this server (an IP literal, a
localhost name, the bound host name or one of ``--allowed-hosts``), so a page on a DNS-rebinding
domain gets 403 for HTTP and WebSocket alike; malformed requests (a non-ASCII path, a duplicated
Host/Origin/Authorization header) get 400, other methods than GET/HEAD 405; optional API key
(``Authorization: Bearer KEY`` or the browser-compatible ``openai-insecure-api-key.KEY``
subprotocol); an Origin allow-list (browser pages from other origins are refused unless listed;
same-origin pages and clients that send no Origin pass); 15 MiB per message (a larger one gets
an ``error`` event, one over 16 MiB closes the connection with 1009, as the frame is never read);
a session cap, a per-client-IP cap (429; behind a ``--trusted-proxy`` the client is the last
``X-Forwarded-For`` address) and the client's admission check (HTTP 503 at the handshake, with the
reason); a per-session token-bucket rate limit on client events.
"""

from __future__ import annotations

import asyncio
import http
import importlib.util
import ipaddress
import json
import logging
import mimetypes
import os
import re
import signal
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING
from websockets.server import ServerProtocol

from omnistream.apps.client_secrets import ClientSecrets, auth_refusal
from omnistream.apps.drain import Drainer
from omnistream.apps.http_post import CALLS_PATHS, POST_PATHS, SECRETS_PATH, PostEndpoints, install_body_parser
from omnistream.apps.limits import SessionLimits
from omnistream.apps.metrics import CONTENT_TYPE as METRICS_TYPE
from omnistream.apps.metrics import ServerMetrics
from omnistream.apps.realtime_session import RealtimeSession
from omnistream.runtime.client import Client, SessionOptions

log = logging.getLogger(__name__)
MiB = 1 << 20
WEB_DIR = Path(__file__).parent / "web"
REALTIME_PATHS = ("/v1/realtime", "/realtime")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# headers a request may carry once: a second copy is ambiguous (which one did the proxy check?)
_SINGLE_HEADERS = ("Host", "Origin", "Authorization", "OpenAI-Beta", "Sec-WebSocket-Key", "Sec-WebSocket-Version")
_METHODS = ("GET", "HEAD")
DRAIN_PATH = "/admin/drain"  # POST; the deploy/ configs and the HAProxy test use this name
LOOPBACK = ("127.0.0.1", "::1")
_LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1"))
_LOCAL_NAMES = ("localhost", "localhost.localdomain")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # a DNS name or an IPv4 address, lowercased


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: any free port (tests)
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()  # browser origins allowed besides the server's own; "*": any
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides IP literals, localhost and `host`;
    # ".example.com" also matches its subdomains; "*": any (turns the DNS-rebinding check off)
    max_sessions: int = 8
    max_sessions_per_ip: int = 4  # sessions one client address may hold (0: no cap)
    trusted_proxies: tuple[str, ...] = LOOPBACK  # peers whose X-Forwarded-For names the client (addresses/CIDRs)
    drain_grace_s: float = 30.0  # SIGTERM / POST /admin/drain: running replies get this long, then are cut
    rate_limit: float = 100.0  # client events per second per session (token bucket); 0: off
    rate_burst: float | None = None  # bucket size; None: 2 s worth of events (at least 50)
    max_message: int = 15 * MiB  # larger messages get an error event
    hard_max_message: int = 16 * MiB  # larger frames close the connection (1009) before being read
    voice: str | None = None  # default voice; None: "Chelsie" if the model has it, else its first
    defaults: SessionOptions = field(default_factory=SessionOptions)  # limits, window, ... for new sessions
    server_vad: bool = True  # sessions start with turn_detection server_vad (False: null)
    output_lead_ms: float = 100.0  # reply audio sent ahead of real time at most this much
    chunk_samples: int = 960  # 40 ms at 24 kHz per output audio delta
    limits: SessionLimits = field(default_factory=SessionLimits)  # input sizes, audio rate, turn cap, slow readers
    web_dir: Path = WEB_DIR
    client_secret_ttl_s: float = 600.0  # default lifetime of an ephemeral key (POST /v1/realtime/client_secrets)
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs for WebRTC calls; none: host candidates only (LAN)


def checkpoint_voices(model_dir) -> list[str] | None:
    """The speakers of a checkpoint directory (keys of its ``spk_dict.pt``), without loading it."""
    f = Path(str(model_dir)) / "spk_dict.pt"
    if not f.is_file():
        return None
    import torch

    try:
        return sorted(torch.load(f, map_location="cpu", weights_only=True))
    except Exception:  # an unreadable file: the pipeline will say so when it loads
        log.warning("cannot read the voices from %s", f, exc_info=True)
        return None


def _client_voices(client: Client) -> list[str] | None:
    """The voices the client's model has: its loaded checkpoint's, or read from its directory."""
    v = getattr(client, "voices", None)
    if v is None:
        v = getattr(getattr(client, "ck", None), "voices", None)
    if v is None and isinstance(getattr(client, "model", None), str | Path):
        v = checkpoint_voices(client.model)
    return sorted(v) if v is not None else None


class RealtimeServer:
    """The WebSocket + HTTP server; one :class:`RealtimeSession` per Realtime session."""

    def __init__(self, client: Client, config: ServerConfig | None = None, *, voices: list[str] | None = None):
        self.client = client
        self.config = config or ServerConfig()
        self.voices = voices if voices is not None else _client_voices(client)
        v = self.config.voice
        if v is None and self.voices:
            v = "Chelsie" if "Chelsie" in self.voices else self.voices[0]
        if v is not None and self.voices is not None and v not in self.voices:
            raise ValueError(f"--voice {v!r}: this model has voices {self.voices}")
        self.default_voice = v
        self.sessions: set[RealtimeSession] = set()
        self._server = None
        self.started_at = time.monotonic()
        self._per_ip: dict[str, int] = {}  # client address -> sessions it holds
        self._proxies = [ipaddress.ip_network(a, strict=False) for a in self.config.trusted_proxies]
        self.drainer = Drainer(self)
        self.metrics = ServerMetrics(self)
        self.secrets = ClientSecrets(self.config.client_secret_ttl_s)  # ephemeral keys
        self.post = PostEndpoints(self)  # POST /v1/realtime/calls (WebRTC), /v1/realtime/client_secrets

    @property
    def draining(self) -> bool:
        return self.drainer.draining

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` when given (``serve`` binds it before loading the model), else bind
        ``config.host:port`` now."""
        c = self.config
        where = {"sock": sock} if sock is not None else {"host": c.host, "port": c.port}
        self._server = await serve(
            self._handle, process_request=self._process_request, create_connection=_Connection,
            select_subprotocol=_select_subprotocol, max_size=c.hard_max_message, compression=None,
            ping_interval=20, ping_timeout=20, max_queue=64, **where,
        )
        log.info("serving the OpenAI Realtime protocol on ws://%s:%d/v1/realtime", c.host, self.port)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await self.post.close()  # the WebRTC calls
        await self.drainer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # ------------------------------------------------------------------ HTTP + handshake
    def _process_request(self, conn: ServerConnection, req: Request) -> Response | None:
        """Every request, HTTP or WebSocket, passes here first: validation, Host, then the route."""
        for name in _SINGLE_HEADERS:
            if len(req.headers.get_all(name)) > 1:
                return _http(400, f"bad request: more than one {name} header\n".encode())
        host = self._request_host(req)
        if host is None:
            return _http(400, b"bad request: missing or malformed Host header\n")
        if not self._host_ok(host):
            log.warning("refused a request for Host %r (see --allowed-hosts)", host)
            return _http(403, f"host {host} is not allowed (see --allowed-hosts)\n".encode())
        path = urlsplit(req.path).path
        if req.method == "POST" and path in POST_PATHS:
            return self.post.handle(conn, req)  # a coroutine: websockets awaits it
        if path == DRAIN_PATH:
            if req.method == "POST":
                return self._admin_drain(conn, req.headers)
            return _http(405, f"method {req.method} not allowed\n".encode(), extra=[("Allow", "POST")])
        if req.method not in _METHODS:
            return _http(405, f"method {req.method} not allowed\n".encode(), extra=[("Allow", ", ".join(_METHODS))])
        if path not in REALTIME_PATHS:
            resp = self._route(path, req.headers)
            if req.method == "HEAD":  # the same headers, Content-Length included, without the body
                resp = Response(resp.status_code, resp.reason_phrase, resp.headers, b"")
            return resp
        origin = req.headers.get("Origin")
        if origin is not None and not self._origin_ok(origin, req.headers.get("Host", "")):
            log.warning("refused a WebSocket from origin %r (not in --allow-origin)", origin)
            return _http(403, f"origin {origin} is not allowed (see --allow-origin)\n".encode())
        refusal = auth_refusal(self.config.api_key, self.secrets, req.headers)  # the key or an ephemeral key
        if refusal is not None:
            return _http(401, f"unauthorized: {refusal}\n".encode())
        peer = self._client_ip(conn, req.headers)
        refused = self._refusal(peer)
        if refused is not None:
            status, reason, why = refused
            self.metrics.session_refused(reason, peer, why)
            return _http(status, f"{why}\n".encode(), extra=[("Retry-After", "5")])
        return None

    def _refusal(self, peer: str) -> tuple[int, str, str] | None:
        """Why one more session from ``peer`` is refused: (HTTP status, metrics reason, message), or None."""
        c = self.config
        if self.draining:
            return 503, "draining", "this server is draining (restarting): connect again to reach another replica"
        if c.max_sessions_per_ip and self._per_ip.get(peer, 0) >= c.max_sessions_per_ip:
            return 429, "per_ip", f"too many sessions from {peer} (max {c.max_sessions_per_ip} per client address)"
        if len(self.sessions) >= c.max_sessions:
            return 503, "full", f"too many sessions (max {c.max_sessions}); try again later"
        reason = self._admission()
        if reason is not None:
            return 503, "busy", f"server busy: {reason}"
        return None

    def _client_ip(self, conn: ServerConnection, headers: Headers) -> str:
        """The client's address: the peer's, or -- when the peer is a trusted proxy -- the last
        ``X-Forwarded-For`` entry (the address that proxy saw; earlier entries are the client's word)."""
        peer = _peer(conn)
        xff = headers.get_all("X-Forwarded-For")
        if xff and self._proxies and _in(peer, self._proxies):
            fwd = _norm_ip(xff[-1].split(",")[-1].strip())
            if fwd is not None:
                return fwd
        return peer

    def _admin_drain(self, conn: ServerConnection, headers: Headers) -> Response:
        """``POST /admin/drain``: with an API key, only with it; without one, only from a loopback
        peer that no proxy forwarded (a balancer on this machine must not pass anyone's drain on)."""
        if self.config.api_key:
            if not self._authorized(headers):
                return _http(401, b"unauthorized: POST /admin/drain needs Authorization: Bearer KEY\n")
        elif not (_in(_peer(conn), _LOOPBACK_NETS) and not any(
                headers.get_all(h) for h in ("X-Forwarded-For", "Forwarded", "X-Real-IP"))):
            return _http(403, b"forbidden: without --api-key, POST /admin/drain is taken only from this machine\n")
        started = self.drainer.start("POST /admin/drain")
        return _http(202, _json({"status": "draining", "sessions": len(self.sessions), "grace_s": self.drainer.grace_s,
                                 "already_draining": not started}), "application/json")

    def _route(self, path: str, headers: Headers) -> Response:
        """The plain HTTP endpoints (GET or HEAD)."""
        if path == "/health":
            health = self.health()
            return _http(200 if health["status"] == "ok" else 503, _json(health), "application/json")
        if path == "/livez":
            return _http(200, _json({"status": "alive", "uptime_s": round(time.monotonic() - self.started_at, 1),
                                     "draining": self.draining}), "application/json")
        if path == "/metrics":
            if not self._authorized(headers):
                return _http(401, b"unauthorized: /metrics needs Authorization: Bearer KEY\n")
            return _http(200, self.metrics.exposition(), METRICS_TYPE)
        if path == "/status":
            return _http(200, _json(self.status(full=self._authorized(headers))), "application/json")
        if path == "/config.json":
            return _http(200, _json(self.page_config()), "application/json")
        if path in ("/", "/index.html") or path.startswith("/web/"):
            return self._static("index.html" if path in ("/", "/index.html") else path[len("/web/"):])
        return _http(404, b"not found\n")

    def health(self) -> dict:
        """``ok`` while the replica takes one more session; else why not -- ``draining``,
        ``unavailable`` (a stage down or stalled) or ``full`` (the session cap or admission
        control) -- which ``/health`` answers with 503: what a load balancer reads."""
        n = len(self.sessions)
        if self.draining:
            return {"status": "draining", "reason": "the replica is draining (restart or scale-down)", "sessions": n}
        try:
            st = self.client.status()
        except Exception as e:  # noqa: BLE001
            return {"status": "unavailable", "reason": f"status failed: {e}", "sessions": n}
        if st.get("serving") is False:
            return {"status": "unavailable", "reason": st.get("reason") or "the pipeline is not serving", "sessions": n}
        if n >= self.config.max_sessions:
            return {"status": "full", "reason": f"too many sessions (max {self.config.max_sessions})", "sessions": n}
        reason = self._admission()
        if reason is not None:
            return {"status": "full", "reason": reason, "sessions": n}
        return {"status": "ok", "sessions": n}

    def _admission(self) -> str | None:
        """``Client.admission()``'s reason to refuse one more session, or None. A check that fails
        refuses (fail closed): admitting a session the pipeline cannot serve hurts every session."""
        try:
            reason = self.client.admission()
        except Exception:
            log.exception("the admission check failed; refusing the session")
            return "the admission check failed"
        return None if reason is None else (str(reason).splitlines() or ["busy"])[0][:200]

    @staticmethod
    def _request_host(req: Request) -> str | None:
        """The Host header's name, lowercased, without port or IPv6 brackets; None when it is
        missing (HTTP/1.0 may omit it: then the request is for this server) or malformed."""
        raw = req.headers.get("Host")
        if raw is None:
            return "localhost" if req.protocol == "HTTP/1.0" else None
        try:
            u = urlsplit("//" + raw.strip())
            u.port  # noqa: B018 (raises ValueError on a bad port)
        except ValueError:
            return None
        if not u.hostname or u.username is not None or u.password is not None or u.path or u.query or u.fragment:
            return None
        name = u.hostname.rstrip(".")
        if not _HOST_NAME.fullmatch(name):
            try:
                ipaddress.IPv6Address(name)  # "[::1]:8000" -> "::1"
            except ValueError:
                return None
        return name

    def _host_ok(self, host: str) -> bool:
        """DNS rebinding defence: a page on a rebinding domain sends that domain as its Host, so
        only names this server answers to pass. IP literals pass (a rebinding page's origin is a
        DNS name, never an address), as do localhost names (browsers resolve them to loopback
        themselves), the ``--host`` name, this machine's name and ``--allowed-hosts``."""
        allowed = self.config.allowed_hosts
        if "*" in allowed:
            return True
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        if host in _LOCAL_NAMES or host.endswith(".localhost"):
            return True
        if host in (self.config.host.lower().rstrip("."), socket.gethostname().lower()):
            return True
        for a in allowed:
            a = a.lower().rstrip(".")
            if host == a or (a.startswith(".") and (host.endswith(a) or host == a[1:])):
                return True
        return False

    def _origin_ok(self, origin: str, host: str) -> bool:
        allowed = self.config.allow_origins
        if "*" in allowed or origin in allowed:
            return True
        o = urlsplit(origin)
        return o.scheme in ("http", "https") and o.netloc == host  # the page this server served

    def _authorized(self, headers: Headers) -> bool:
        """The server key (not an ephemeral key): /status, /metrics, /admin/drain."""
        return auth_refusal(self.config.api_key, None, headers, ephemeral=False) is None

    def _static(self, name: str) -> Response:
        root = self.config.web_dir.resolve()
        parts = name.split("/")
        if not all(_SAFE_NAME.fullmatch(p) for p in parts):
            return _http(404, b"not found\n")
        f = root.joinpath(*parts).resolve()
        if not f.is_relative_to(root) or not f.is_file():
            return _http(404, b"not found\n")
        ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        if f.suffix in (".js", ".mjs"):
            ctype = "text/javascript"
        if ctype.startswith("text/"):
            ctype += "; charset=utf-8"
        return _http(200, f.read_bytes(), ctype)

    def status(self, full: bool = True) -> dict:
        """``full``: the client's status (stages with pids, sessions, queues) and the counts;
        else the counts only (connections, stages alive): safe to show anyone who can connect."""
        s = dict(self.client.status())
        stages = s.get("stages") or []
        counts = {"connections": len(self.sessions), "stages_alive": sum(bool(st.get("alive")) for st in stages),
                  "stages_total": len(stages)}
        if not full:
            return counts
        s.update(counts, uptime_s=round(time.monotonic() - self.started_at, 1))
        return s

    def page_config(self) -> dict:
        """What the browser page reads before it connects: whether to ask for an API key."""
        return {"api_key_required": bool(self.config.api_key), "realtime_path": REALTIME_PATHS[0],
                "webrtc": importlib.util.find_spec("aiortc") is not None, "calls_path": CALLS_PATHS[0],
                "client_secrets_path": SECRETS_PATH}

    # ------------------------------------------------------------------ sessions
    async def _handle(self, ws: ServerConnection) -> None:
        peer = self._client_ip(ws, ws.request.headers)
        refused = self._refusal(peer)  # a race past the handshake check (busy is the session's to say)
        if refused is not None and refused[1] != "busy":
            self.metrics.session_refused(refused[1], peer, refused[2])
            await ws.close(1012 if refused[1] == "draining" else 1013, refused[2][:120])
            return
        conn = RealtimeSession(self, ws)
        conn.peer = peer
        self.sessions.add(conn)
        self._per_ip[peer] = self._per_ip.get(peer, 0) + 1
        try:
            await conn.run()
        finally:
            self.sessions.discard(conn)
            self._per_ip[peer] -= 1
            if not self._per_ip[peer]:
                del self._per_ip[peer]
            try:
                await conn.cleanup()
            finally:
                self.metrics.session_closed(conn)




class _Protocol(ServerProtocol):
    """websockets' server protocol, answering a request it cannot parse (a non-ASCII path, a bad
    request line, a request body) with 400 instead of closing the connection without a word."""

    def send_eof(self) -> None:
        exc = self.handshake_exc
        if (self.state is CONNECTING and not self.writes and isinstance(exc, InvalidMessage)
                and not isinstance(exc.__cause__, EOFError)):
            self.writes.append(_http(400, b"bad request: malformed HTTP request\n").serialize())
        super().send_eof()


class _Connection(ServerConnection):
    """Each connection's protocol is a :class:`_Protocol` (serve() builds the plain one)."""

    def __init__(self, protocol: ServerProtocol, *args, **kwargs):
        protocol.__class__ = _Protocol  # only send_eof differs; the running parser is unaffected
        install_body_parser(protocol)  # POST bodies (omnistream.apps.http_post)
        super().__init__(protocol, *args, **kwargs)


def _select_subprotocol(conn: ServerConnection, offered) -> str | None:
    """Answer with "realtime" when offered (browsers fail a handshake that ignores their list);
    never echo the key-carrying one."""
    if "realtime" in offered:
        return "realtime"
    for p in offered:
        if not p.startswith("openai-insecure-api-key."):
            return p
    return None


def _norm_ip(s: str) -> str | None:
    """An address as text (an IPv4-mapped IPv6 address as IPv4), or None if ``s`` is not one."""
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return None
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


def _peer(conn: ServerConnection) -> str:
    addr = conn.remote_address  # (none for a Unix socket)
    return (_norm_ip(str(addr[0])) or str(addr[0])) if isinstance(addr, tuple) and addr else "unknown"


def _in(addr: str, networks) -> bool:
    ip = _norm_ip(addr)
    return ip is not None and any(ipaddress.ip_address(ip) in n for n in networks)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _http(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", extra=()) -> Response:
    s = http.HTTPStatus(status)
    headers = Headers([("Connection", "close"), ("Content-Length", str(len(body))), ("Content-Type", ctype),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), *extra])
    return Response(s.value, s.phrase, headers, body)


# ---------------------------------------------------------------------------------- running it
@asynccontextmanager
async def serving(client: Client, config: ServerConfig | None = None, **kw):
    """Start ``client`` and a server on it; yield the server; close both (tests, benchmarks)."""
    await client.start()
    server = RealtimeServer(client, config, **kw)
    try:
        await server.start()
        yield server
    finally:
        await server.close()
        await client.close()


# ---------------------------------------------------------------------------------- CLI
def build_client(args):
    """``--layout`` unset: the in-process client; else the ZeroMQ stage runtime's client."""
    opts = {"max_sessions": args.max_sessions, "headroom": getattr(args, "headroom", 0.9) or None}
    if args.layout:
        try:
            from omnistream.runtime.procclient import MultiProcClient
        except ImportError as e:
            raise ValueError(f"--layout {args.layout}: the multi-process runtime (omnistream.runtime.procclient) "
                             f"is not available in this installation ({e}); run without --layout") from e
        from omnistream.runtime import layout as layouts

        lay = layouts.load(args.layout, device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", "auto"))
        return MultiProcClient(args.model, layout=lay, spares=getattr(args, "spares", False),
                               hang_timeout_s=getattr(args, "hang_s", 30.0), **opts)
    from omnistream.checkpoints import load_omni
    from omnistream.runtime.inproc import InProcClient, engine_options

    device = getattr(args, "device", "cpu")
    ck = load_omni(args.model, device=device, dtype=getattr(args, "dtype", "auto"),
                   attn_implementation=getattr(args, "attn", "sdpa"))
    return InProcClient(ck, **engine_options(device, getattr(args, "threads", None)), **opts)


def bind_socket(host: str, port) -> socket.socket:
    """A listening TCP socket on ``host:port``, or ValueError with one line saying why not.
    ``serve`` calls it before loading the model: a port in use fails in a second, not after the
    model and the stages have started."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is 0..65535 (0: any free port)")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]  # "localhost" may give ::1 and 127.0.0.1: the resolver's first
    try:
        return socket.create_server(addr, family=family)
    except OSError as e:  # e.strerror carries a "(while attempting to bind ...)" tail: the plain reason
        raise ValueError(f"cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}") from None


def run_server(args) -> int:
    """``omnistream serve``: bind, load the model, serve until SIGTERM/SIGINT or ``POST
    /admin/drain``, drain (:mod:`omnistream.apps.drain`; a second signal cuts the running replies
    at once), close the pipeline and return 0."""
    from omnistream.logs import setup_logging

    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key, allow_origins=tuple(args.allow_origin or ()),
        allowed_hosts=tuple(getattr(args, "allowed_hosts", None) or ()),
        max_sessions=args.max_sessions, rate_limit=args.rate_limit, voice=args.voice,
        max_sessions_per_ip=args.max_sessions_per_ip, trusted_proxies=tuple(args.trusted_proxy or LOOPBACK),
        drain_grace_s=args.drain_grace_s, client_secret_ttl_s=min(args.client_secret_ttl, 7200.0),
        ice_servers=tuple(args.ice_server or ()), defaults=SessionOptions(window=args.window, max_new_tokens=args.max_new_tokens,
                                                                  max_speech_s=args.max_speech_s, seed=args.seed,
                                                                  block_sparse_dit=args.block_sparse_dit),
        limits=SessionLimits(max_turn_s=getattr(args, "max_turn_s", 120.0)),
        server_vad=not args.no_vad,
    )
    sock = bind_socket(args.host, args.port)  # before the model: a bad port fails at once
    setup_logging(args.log_json, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    if not getattr(args, "verbose", False):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # not a line per HTTP request
    try:
        client = build_client(args)
    except BaseException:
        sock.close()
        raise

    async def main() -> None:
        await client.start()
        server = RealtimeServer(client, config)
        await server.start(sock)
        print(f"omnistream: serving ws://{args.host}:{server.port}/v1/realtime (browser page: "
              f"http://{args.host}:{server.port}/)", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.drainer.start, sig.name, None, True)
        await server.drainer.wait()
        await server.close()
        try:  # the replies have ended: closing the pipeline is quick, but bounded all the same
            await asyncio.wait_for(client.close(), max(2.0, server.drainer.started + config.drain_grace_s
                                                       - time.monotonic()))
        except TimeoutError:
            log.warning("the pipeline did not close within the drain grace period")
        log.info("stopped")

    try:
        asyncio.run(main())
    finally:
        sock.close()
    return 0
