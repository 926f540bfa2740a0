"""``omnistream serve``: an OpenAI-Realtime-compatible WebSocket server over the chat pipeline.

One asyncio process holds the WebSocket connections; the model work runs behind the
:class:`~omnistream.runtime.client.Client` interface (in this process on a worker thread, or in
ZeroMQ stage processes), so the event loop only moves events and never waits on a forward.

Endpoints (one port; plain HTTP is answered from ``process_request`` before any handshake):

- ``GET /v1/realtime`` (WebSocket): the Realtime protocol (:mod:`omnistream.apps.realtime`).
- ``GET /health``: 200 ``{"status": "ok"}`` while the server runs.
- ``GET /status``: the pipeline's stages (name, pid, alive, last heartbeat), sessions and queue
  depths, from ``Client.status()`` (needs the API key when one is set).
- ``GET /`` and ``GET /web/<file>``: the browser client's static files.

Per session (:mod:`omnistream.apps.realtime_session`): server VAD with silero-vad
(:mod:`omnistream.apps.vad`), reply audio paced in 40 ms deltas, barge-in that truncates the
conversation to what was played.

Security: loopback bind by default; optional API key (``Authorization: Bearer KEY`` or the
browser-compatible ``openai-insecure-api-key.KEY`` subprotocol); an Origin allow-list (browser
pages from other origins are refused unless listed; same-origin pages and clients that send no
Origin pass); 15 MiB per message (a larger one gets an ``error`` event, one over 16 MiB closes
the connection with 1009, as the frame is never read); a session cap (HTTP 503 at the
handshake); a per-session token-bucket rate limit on client events.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import mimetypes
import re
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from omnistream.apps.realtime_session import RealtimeSession, subprotocols
from omnistream.runtime.client import Client, SessionOptions

log = logging.getLogger(__name__)
MiB = 1 << 20
WEB_DIR = Path(__file__).parent / "web"
REALTIME_PATHS = ("/v1/realtime", "/realtime")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: any free port (tests)
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()  # browser origins allowed besides the server's own; "*": any
    max_sessions: int = 8
    rate_limit: float = 100.0  # client events per second per session (token bucket); 0: off
    rate_burst: float | None = None  # bucket size; None: 2 s worth of events (at least 50)
    max_message: int = 15 * MiB  # larger messages get an error event
    hard_max_message: int = 16 * MiB  # larger frames close the connection (1009) before being read
    voice: str | None = None  # default voice; None: "Chelsie" if the model has it, else its first
    defaults: SessionOptions = field(default_factory=SessionOptions)  # limits, window, ... for new sessions
    server_vad: bool = True  # sessions start with turn_detection server_vad (False: null)
    output_lead_ms: float = 100.0  # reply audio sent ahead of real time at most this much
    chunk_samples: int = 960  # 40 ms at 24 kHz per output audio delta
    web_dir: Path = WEB_DIR


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

    async def start(self) -> None:
        c = self.config
        self._server = await serve(
            self._handle, c.host, c.port, process_request=self._process_request,
            select_subprotocol=_select_subprotocol, max_size=c.hard_max_message, compression=None,
            ping_interval=20, ping_timeout=20, max_queue=64,
        )
        log.info("serving the OpenAI Realtime protocol on ws://%s:%d/v1/realtime", c.host, self.port)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # ------------------------------------------------------------------ HTTP + handshake
    def _process_request(self, conn: ServerConnection, req: Request) -> Response | None:
        path = urlsplit(req.path).path
        if path == "/health":
            return _http(200, _json({"status": "ok", "sessions": len(self.sessions)}), "application/json")
        if path == "/status":
            if not self._authorized(req.headers):
                return _http(401, b"unauthorized: give Authorization: Bearer KEY\n")
            return _http(200, _json(self.status()), "application/json")
        if path in ("/", "/index.html") or path.startswith("/web/"):
            return self._static("index.html" if path in ("/", "/index.html") else path[len("/web/"):])
        if path not in REALTIME_PATHS:
            return _http(404, b"not found\n")
        origin = req.headers.get("Origin")
        if origin is not None and not self._origin_ok(origin, req.headers.get("Host", "")):
            log.warning("refused a WebSocket from origin %r (not in --allow-origin)", origin)
            return _http(403, f"origin {origin} is not allowed (see --allow-origin)\n".encode())
        if not self._authorized(req.headers):
            return _http(401, b"unauthorized: give Authorization: Bearer KEY or the subprotocol "
                         b"openai-insecure-api-key.KEY\n")
        if len(self.sessions) >= self.config.max_sessions:
            return _http(503, f"too many sessions (max {self.config.max_sessions}); try again later\n".encode(),
                         extra=[("Retry-After", "5")])
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        allowed = self.config.allow_origins
        if "*" in allowed or origin in allowed:
            return True
        o = urlsplit(origin)
        return o.scheme in ("http", "https") and o.netloc == host  # the page this server served

    def _authorized(self, headers: Headers) -> bool:
        key = self.config.api_key
        if not key:
            return True
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), key.encode()):
            return True
        for proto in subprotocols(headers):
            if proto.startswith("openai-insecure-api-key.") and hmac.compare_digest(
                    proto[len("openai-insecure-api-key."):].encode(), key.encode()):
                return True
        return False

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

    def status(self) -> dict:
        s = dict(self.client.status())
        s["connections"] = len(self.sessions)
        s["uptime_s"] = round(time.monotonic() - self.started_at, 1)
        return s

    # ------------------------------------------------------------------ sessions
    async def _handle(self, ws: ServerConnection) -> None:
        if len(self.sessions) >= self.config.max_sessions:  # a race past the handshake check
            await ws.close(1013, "too many sessions")
            return
        conn = RealtimeSession(self, ws)
        self.sessions.add(conn)
        try:
            await conn.run()
        finally:
            self.sessions.discard(conn)
            await conn.cleanup()




def _select_subprotocol(conn: ServerConnection, offered) -> str | None:
    """Answer with "realtime" when offered (browsers fail a handshake that ignores their list);
    never echo the key-carrying one."""
    if "realtime" in offered:
        return "realtime"
    for p in offered:
        if not p.startswith("openai-insecure-api-key."):
            return p
    return None


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
    opts = {"max_sessions": args.max_sessions}
    if args.layout:
        try:
            from omnistream.runtime.procclient import MultiProcClient
        except ImportError as e:
            raise ValueError(f"--layout {args.layout}: the multi-process runtime (omnistream.runtime.procclient) "
                             f"is not available in this installation ({e}); run without --layout") from e
        return MultiProcClient(args.model, layout=args.layout, spares=getattr(args, "spares", False), **opts)
    from omnistream.checkpoints import load_omni
    from omnistream.runtime.client import InProcClient

    return InProcClient(load_omni(args.model), **opts)


def run_server(args) -> int:
    """``omnistream serve``: run until SIGINT/SIGTERM, then close sessions and the pipeline."""
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key, allow_origins=tuple(args.allow_origin or ()),
        max_sessions=args.max_sessions, rate_limit=args.rate_limit, voice=args.voice,
        defaults=SessionOptions(window=args.window, max_new_tokens=args.max_new_tokens,
                                max_speech_s=args.max_speech_s),
        server_vad=not args.no_vad,
    )
    if not getattr(args, "verbose", False):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # not a line per HTTP request
    client = build_client(args)

    async def main() -> None:
        await client.start()
        server = RealtimeServer(client, config)
        await server.start()
        print(f"omnistream: serving ws://{args.host}:{server.port}/v1/realtime (browser page: "
              f"http://{args.host}:{server.port}/)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await server.close()
        drain = getattr(client, "drain", None)  # stage runtime: running replies finish first (bounded)
        await (drain() if drain is not None else client.close())

    asyncio.run(main())
    return 0
