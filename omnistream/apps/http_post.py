"""POST requests on the Realtime server's one port: the WebRTC calls and the ephemeral keys.

Why this way: ``omnistream serve`` is a ``websockets`` server, whose HTTP parser takes no request
body (a WebSocket handshake has none). A second listener would need a second port through every
proxy and firewall; so instead each connection's parser peeks at the first bytes, and only a
request starting with ``POST`` goes through :func:`_read_post` -- the request line and headers
with websockets' own line parser, then a body of exactly ``Content-Length`` bytes (at most
``MAX_BODY``; none without the header; chunked bodies are refused with 411, a larger one with
413 before it is read; ``Expect: 100-continue`` is answered). Every other request is parsed by websockets unchanged. The
request then reaches the server's ``process_request`` like any other, with its ``body``, so the
Host and Origin checks stay in one place; websockets' handshake timeout bounds a slow body.

Routes (:class:`PostEndpoints`, answered from ``process_request``):

- ``POST /v1/realtime/client_secrets`` (JSON, the server key only): ``{"value": "ek_...",
  "expires_at": ...}``, see :mod:`omnistream.apps.client_secrets`.
- ``POST /v1/realtime/calls`` (``application/sdp``, the server key or an ephemeral key): the
  SDP offer in, 201 with the SDP answer and ``Location: /v1/realtime/calls/{id}``; the session
  then runs over WebRTC (:mod:`omnistream.apps.webrtc`).
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from websockets.exceptions import InvalidMessage
from websockets.http11 import Request, Response, parse_headers, parse_line
from websockets.protocol import Protocol
from websockets.server import ServerProtocol

from omnistream.apps.client_secrets import SecretRequestError, auth_refusal

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024  # an SDP offer is 1-10 kB, a client_secrets request a few hundred bytes
SECRETS_PATH = "/v1/realtime/client_secrets"
CALLS_PATHS = ("/v1/realtime/calls",)  # (not the beta POST /v1/realtime: that path's POST stays 405)
POST_PATHS = (SECRETS_PATH, *CALLS_PATHS)


def install_body_parser(protocol: ServerProtocol, max_body: int = MAX_BODY) -> None:
    """Let ``protocol`` (a connection's, before any byte arrived) read POST bodies."""
    protocol.parser = _parse(protocol, max_body)
    next(protocol.parser)


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse(p: ServerProtocol, max_body: int):
    """websockets' parser coroutine, with POST requests read by :func:`_read_post`."""
    while len(p.reader.buffer) < 5 and not p.reader.eof:
        yield
    if not p.reader.buffer.startswith(b"POST "):
        yield from ServerProtocol.parse(p)  # everything else: websockets' own parser, untouched
        return
    try:
        request = yield from _read_post(p, max_body)
    except _Refused as e:
        p.handshake_exc = InvalidMessage(str(e))
        p.send_response(_http(e.status, f"{e}\n".encode()))  # (replaces this parser with a discarding one)
        yield
        return
    except Exception as e:  # a truncated or malformed request: websockets answers as for any other
        p.handshake_exc = InvalidMessage("did not receive a valid HTTP request")
        p.handshake_exc.__cause__ = e
        p.send_eof()
        p.parser = p.discard()
        next(p.parser)
        yield
        return
    p.events.append(request)
    yield from Protocol.parse(p)


def _read_post(p: ServerProtocol, max_body: int):
    """Request line, headers and a ``Content-Length`` body -> a websockets Request with ``body``."""
    line = yield from parse_line(p.reader.read_line)
    try:
        method, path, proto = line.split(b" ", 2)
    except ValueError:
        raise _Refused(400, "bad request: malformed request line") from None
    if proto not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Refused(400, "bad request: HTTP/1.1 or HTTP/1.0 expected")
    try:
        path_s = path.decode("ascii")
    except UnicodeDecodeError:
        raise _Refused(400, "bad request: non-ASCII path") from None
    headers = yield from parse_headers(p.reader.read_line)
    if "Transfer-Encoding" in headers:
        raise _Refused(411, "length required: send the body with Content-Length (no chunked encoding)")
    lengths = set(headers.get_all("Content-Length")) or {"0"}  # none: no body (RFC 9112 6.3)
    n = lengths.pop()
    if lengths or not n.isdigit():
        raise _Refused(400, "bad request: malformed Content-Length")
    if int(n) > max_body:
        raise _Refused(413, f"request body of {int(n)} bytes is over the {max_body} byte limit")
    if headers.get("Expect", "").lower() == "100-continue":
        p.writes.append(b"HTTP/1.1 100 Continue\r\n\r\n")  # (curl waits for it before sending a body > 1 kB)
    body = yield from p.reader.read_exact(int(n))
    request = Request(path_s, headers, method.decode("ascii"), proto.decode("ascii"))
    request.body = bytes(body)
    return request


def _http(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", extra=()) -> Response:
    from omnistream.apps.server import _http as http  # (server imports this module: no import at load time)

    return http(status, body, ctype, extra)


def _media_type(headers) -> str:
    return headers.get("Content-Type", "").split(";")[0].strip().lower()


class PostEndpoints:
    """The POST routes of a :class:`~omnistream.apps.server.RealtimeServer` (``server.secrets``
    mints and checks the ephemeral keys; the WebRTC side is loaded on the first call, so a server
    without ``aiortc`` installed serves everything else)."""

    def __init__(self, server):
        self.server = server
        self.calls = None  # omnistream.apps.webrtc.RealtimeCalls, once a call came

    async def handle(self, conn, req: Request) -> Response:
        """One POST request to one of ``POST_PATHS`` (its Host was checked by the server) -> the
        response. ``conn``: the HTTP connection (the client's address)."""
        path = urlsplit(req.path).path
        if path not in POST_PATHS:
            return _http(404, b"not found\n")
        srv = self.server
        origin = req.headers.get("Origin")
        if origin is not None and not srv._origin_ok(origin, req.headers.get("Host", "")):
            return _http(403, f"origin {origin} is not allowed (see --allow-origin)\n".encode())
        body = getattr(req, "body", b"")
        if path == SECRETS_PATH:
            return self._client_secret(req, body)
        reason = auth_refusal(srv.config.api_key, srv.secrets, req.headers)
        if reason is not None:
            return _http(401, f"unauthorized: {reason}\n".encode())
        if _media_type(req.headers) != "application/sdp":
            return _http(415, b"unsupported media type: send the SDP offer as Content-Type: application/sdp\n")
        peer = srv._client_ip(conn, req.headers)
        refused = srv._refusal(peer)  # the WebSocket's rules: draining, per-address cap, session cap, admission
        if refused is not None:
            status, reason, why = refused
            srv.metrics.session_refused(reason, peer, why)
            return _http(status, f"{why}\n".encode(), extra=[("Retry-After", "5")])
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            return _http(400, b"bad request: the SDP offer is not UTF-8 text\n")
        if self.calls is None:
            try:
                from omnistream.apps.webrtc import RealtimeCalls
            except ImportError as e:
                return _http(501, f"WebRTC is not available on this server ({e}): use the WebSocket\n".encode())
            self.calls = RealtimeCalls(srv)
        return await self.calls.answer(req, offer, peer)

    def _client_secret(self, req: Request, body: bytes) -> Response:
        srv = self.server
        reason = auth_refusal(srv.config.api_key, srv.secrets, req.headers, ephemeral=False)
        if reason is not None:
            return _http(401, f"unauthorized: {reason}\n".encode())
        if body.strip() and _media_type(req.headers) != "application/json":
            return _http(415, b"unsupported media type: send Content-Type: application/json\n")
        try:
            ttl = srv.secrets.parse_request(body)
        except SecretRequestError as e:
            return _http(400, f"bad request: {e}\n".encode())
        return _http(200, json.dumps(srv.secrets.mint(ttl)).encode(), "application/json")

    async def close(self) -> None:
        if self.calls is not None:
            await self.calls.close()
