"""Ephemeral keys: short-lived tokens a browser page uses instead of the server's API key.

Why: a page that connects with the server's long-lived key has it in its URL, its JavaScript or
its WebSocket subprotocol, where any extension, log or shoulder can read it. OpenAI's answer,
kept here: the page's own backend (which holds the real key) asks
``POST /v1/realtime/client_secrets`` for a token and hands only that to the page; the token is
accepted wherever the server key is (``Authorization: Bearer``, the
``openai-insecure-api-key.`` subprotocol, ``POST /v1/realtime/calls``) until it expires.

Design (documented behaviour):

- **TTL-bound, not single-use.** A token is valid for any number of connections until its
  ``expires_at`` (a page may reconnect after a network drop without a new round trip to its
  backend), then refused with 401 and the reason. A session opened before the expiry goes on:
  like OpenAI's, the check is at connection time.
- **Stateless.** ``ek_`` + base64url(expires_at (8 bytes) | nonce (8 bytes) | HMAC-SHA256 tag (16
  bytes)) under a random per-process secret: minting stores nothing (a client minting in a loop
  cannot fill the server's memory), checking is one HMAC, and a server restart revokes every
  outstanding token.
- **Only the server key mints.** An ephemeral key cannot mint another (it would make its own
  lifetime unbounded).
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import struct
import time
from collections.abc import Callable

PREFIX = "ek_"
_TAG = 16  # bytes of the HMAC-SHA256 tag kept
_RAW = 8 + 8 + _TAG  # expires_at (ms, big-endian) | nonce | tag
_SUBPROTOCOL = "openai-insecure-api-key."
MAX_TTL_S = 7200.0  # OpenAI's bound on expires_after.seconds


class SecretRequestError(ValueError):
    """A ``client_secrets`` request body the server cannot take (400, one line)."""


def presented_keys(headers) -> list[str]:
    """The keys a request carries: its ``Authorization: Bearer`` token and any
    ``openai-insecure-api-key.KEY`` subprotocol (browsers cannot set headers on a WebSocket)."""
    keys = []
    auth = headers.get("Authorization", "")
    if auth.startswith("Bearer ") and auth[7:].strip():
        keys.append(auth[7:].strip())
    for h in headers.get_all("Sec-WebSocket-Protocol"):
        keys += [p.strip()[len(_SUBPROTOCOL):] for p in h.split(",") if p.strip().startswith(_SUBPROTOCOL)]
    return keys


class ClientSecrets:
    """Mints and checks ephemeral keys (see the module doc). ``clock`` returns Unix seconds
    (tests pass a fake one to expire a token without sleeping)."""

    def __init__(self, ttl_s: float = 600.0, max_ttl_s: float = MAX_TTL_S, clock: Callable[[], float] = time.time):
        if not 0 < ttl_s <= max_ttl_s:
            raise ValueError(f"client secret TTL {ttl_s:g} s: it must be in (0, {max_ttl_s:g}] s")
        self.ttl_s, self.max_ttl_s, self.clock = ttl_s, max_ttl_s, clock
        self._secret = secrets.token_bytes(32)

    def mint(self, ttl_s: float | None = None) -> dict:
        """A new token: ``{"value": "ek_...", "expires_at": unix seconds}``."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        expires_ms = int((self.clock() + ttl) * 1000)
        head = struct.pack(">Q", expires_ms) + secrets.token_bytes(8)
        raw = head + self._tag(head)
        return {"value": PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("="), "expires_at": expires_ms // 1000}

    def _tag(self, head: bytes) -> bytes:
        return hmac.digest(self._secret, head, "sha256")[:_TAG]

    def check(self, token: str) -> str | None:
        """None when ``token`` is a valid, unexpired key of this server; else why not (one line)."""
        if not token.startswith(PREFIX):
            return "not an ephemeral key"
        try:
            raw = base64.urlsafe_b64decode(token[len(PREFIX):] + "=" * (-len(token) % 4))
        except ValueError:
            raw = b""
        if len(raw) != _RAW or not hmac.compare_digest(raw[16:], self._tag(raw[:16])):
            return "the ephemeral key is not valid on this server (was it minted before a restart?)"
        expires = struct.unpack(">Q", raw[:8])[0] / 1000
        if self.clock() >= expires:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
            return f"the ephemeral key expired at {when}: mint a new one (POST /v1/realtime/client_secrets)"
        return None

    def parse_request(self, body: bytes) -> float:
        """The TTL a ``client_secrets`` request body asks for (OpenAI's shape:
        ``{"expires_after": {"anchor": "created_at", "seconds": N}, "session": {...}}``); an empty
        body means the default. Session settings other than ``type``/``model`` are refused rather
        than ignored: they belong in ``session.update`` once connected."""
        if not body.strip():
            return self.ttl_s
        try:
            req = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise SecretRequestError(f"the body is not valid JSON: {str(e)[:120]}") from None
        if not isinstance(req, dict):
            raise SecretRequestError("the body must be a JSON object")
        unknown = set(req) - {"expires_after", "session"}
        if unknown:
            raise SecretRequestError(f"unknown field(s) {sorted(unknown)}: expires_after and session are accepted")
        session = req.get("session")
        if session is not None and (not isinstance(session, dict) or set(session) - {"type", "model"}):
            raise SecretRequestError("session settings in a client secret are not supported (only type and model): "
                                     "send them in session.update once connected")
        ea = req.get("expires_after")
        if ea is None:
            return self.ttl_s
        if not isinstance(ea, dict) or ea.get("anchor", "created_at") != "created_at":
            raise SecretRequestError('expires_after must be {"anchor": "created_at", "seconds": N}')
        s = ea.get("seconds")
        if isinstance(s, bool) or not isinstance(s, int | float) or not 1 <= s <= self.max_ttl_s:
            raise SecretRequestError(f"expires_after.seconds must be a number in [1, {self.max_ttl_s:g}]")
        return float(s)


def auth_refusal(api_key: str | None, store: ClientSecrets | None, headers, ephemeral: bool = True) -> str | None:
    """None when the request is authorised (no key configured, the server key, or -- with
    ``ephemeral`` -- a valid ephemeral key of ``store``); else the one-line reason for the 401."""
    if not api_key:
        return None
    keys = presented_keys(headers)
    if any(hmac.compare_digest(k.encode(), api_key.encode()) for k in keys):
        return None
    reason = None
    for k in keys:
        if k.startswith(PREFIX):
            if not ephemeral:
                return "an ephemeral key cannot do this: use the server's API key"
            reason = store.check(k) if store is not None else "ephemeral keys are not enabled on this server"
            if reason is None:
                return None
    return reason or ("give Authorization: Bearer KEY (the server key or an ephemeral key) or the subprotocol "
                      "openai-insecure-api-key.KEY")
