"""The OpenAI Realtime protocol: client events parsed and validated into typed structs, server
events built as JSON-able dicts.

Parsing never raises anything but :class:`ProtocolError` (a code, a message, the offending
parameter and the client's ``event_id``), whatever bytes arrive, so the server can answer every
bad message with an ``error`` event and go on (the hypothesis fuzz test holds it to that).

Two dialects of the protocol are spoken. The GA names (``response.output_audio.delta``,
``response.output_text.delta``, ``response.output_audio_transcript.delta``, the nested
``session.audio.{input,output}`` shape) are the default; the older beta names
(``response.audio.delta``, ``response.text.delta``, ``response.audio_transcript.delta``, the
flat ``voice`` / ``input_audio_format`` / ``turn_detection`` session shape) are used when the
client speaks beta: an ``OpenAI-Beta: realtime=v1`` header or ``openai-beta.realtime-v1``
subprotocol at the handshake, or a ``session.update`` in the beta shape (the latest shape used
wins). One dialect at a time rather than both names for every event: a client that listens to
both would otherwise play every audio chunk twice, and audio would cost twice the bandwidth.
Both session shapes are accepted in either dialect.

Audio is pcm16 mono at 24 kHz, base64, both ways; images (``input_image`` content parts, used
for video frames) are ``data:image/png|jpeg|webp;base64,...`` URLs decoded with PyAV. Image
pixels and bytes, images and text characters per item, and instruction characters are bounded by
:class:`~omnistream.apps.limits.SessionLimits` (``input_too_large``), checked before decoding.

Where the pipeline differs from OpenAI's conversation model, the server maps as follows (and says
so here rather than pretending): a user item's images and audio join the open user turn and its
text closes it; ``response.create`` replies to the conversation including an open (uncommitted)
turn, with its own ``instructions``, ``tools``, ``tool_choice``, ``output_modalities``, ``max_output_tokens``
and ``voice`` (a checkpoint voice; OpenAI names mean the default) for that reply only -- taken at any time,
though the API forbids a session's voice to change once audio was produced: the voice enters the Talker
only at a reply's first step. ``conversation: "none"`` is an out-of-band reply (no item, ``conversation_id``
null, ``metadata`` echoed, the context left as it was); ``input`` is refused. Items
(:mod:`omnistream.apps.realtime_items`): user, assistant and system messages and ``function_call_output``
items are created at the end or after any item (``previous_item_id``, ``"root"``), deleted and retrieved;
the pipeline re-prefills its cache from an edit. Function calling follows the protocol; the
model sees the tools in Qwen's chat-template format (:mod:`omnistream.engine.tools`), and
``tool_choice`` ``required`` or a named function forces a valid call by grammar-constrained decoding.
Input transcription (``audio.input.transcription`` / beta ``input_audio_transcription``) is done by
the Thinker itself, whatever model is named (``whisper-1``, ``gpt-4o-transcribe``, ...: all map to
it; :mod:`omnistream.engine.transcribe`); ``language`` and ``prompt`` are echoed, not used.

This module parses the client events; the session's configuration (``session.update``: both shapes,
:class:`SessionConfig`) and :class:`ProtocolError` are in :mod:`omnistream.apps.realtime_config` and
re-exported here, and ``conversation.item.create`` in :mod:`omnistream.apps.realtime_items`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass

import numpy as np

from omnistream.apps.limits import SessionLimits
from omnistream.apps.realtime_config import (
    _DEFAULT_LIMITS,
    OPENAI_VOICES,
    SAMPLE_RATE,
    ProtocolError,
    SessionConfig,
    SessionPatch,
    TurnDetection,
    _ga_format,
    _instructions,
    _max_tokens,
    _modalities,
    _tool_choice,
    _tools,
    _voice,
    parse_session,
)

__all__ = ["OPENAI_VOICES", "SAMPLE_RATE", "AudioAppend", "AudioClear", "AudioCommit", "ClientEvent", "FunctionOutput",
           "ItemCreate", "ItemDelete", "ItemRetrieve", "ItemTruncate", "MessageCreate", "ProtocolError", "ResponseCancel",
           "ResponseCreate", "SessionConfig", "SessionPatch", "SessionUpdate", "TurnDetection", "decode_image",
           "decode_pcm16", "parse_client_event", "parse_session"]


# ---------------------------------------------------------------------------------- client events
@dataclass
class SessionUpdate:
    event_id: str | None
    patch: SessionPatch


@dataclass
class AudioAppend:
    event_id: str | None
    pcm: np.ndarray  # (n,) int16 at 24 kHz


@dataclass
class AudioCommit:
    event_id: str | None


@dataclass
class AudioClear:
    event_id: str | None


@dataclass
class ItemCreate:
    """A user message: typed text, images (video frames) and/or audio, in content order."""

    event_id: str | None
    item_id: str | None
    previous_item_id: str | None
    text: str | None  # the input_text parts joined; None if there are none
    images: list  # (H, W, 3) uint8 RGB frames
    audio: np.ndarray | None  # input_audio parts concatenated, (n,) int16 at 24 kHz


@dataclass
class MessageCreate:
    """An assistant (``output_text``/``text`` parts) or system (``input_text`` parts) text message."""

    event_id: str | None
    item_id: str | None
    previous_item_id: str | None
    role: str  # "assistant" | "system"
    text: str


@dataclass
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass
class ItemRetrieve:
    event_id: str | None
    item_id: str


@dataclass
class FunctionOutput:
    """A ``function_call_output`` item: what the client's function returned for ``call_id``."""

    event_id: str | None
    item_id: str | None
    previous_item_id: str | None
    call_id: str
    output: str


@dataclass
class ItemTruncate:
    event_id: str | None
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass
class ResponseCreate:
    """``response.create``; every override is for this response only (None: the session's)."""

    event_id: str | None
    max_output_tokens: int | None  # per-response override; None: the session's
    instructions: str | None = None
    audio_out: bool | None = None  # output_modalities: ["audio"] True, ["text"] False
    tools: list | None = None
    tool_choice: str | None = None
    voice: str | None = None  # this response's voice (checked against the checkpoint's by the session)
    out_of_band: bool = False  # conversation "none": the reply is not added to the conversation
    metadata: dict | None = None  # echoed in the response object


@dataclass
class ResponseCancel:
    event_id: str | None
    response_id: str | None


ClientEvent = (SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | MessageCreate | FunctionOutput
               | ItemTruncate | ItemDelete | ItemRetrieve | ResponseCreate | ResponseCancel)
_UNSUPPORTED = {"output_audio_buffer.clear", "transcription_session.update"}


def parse_client_event(data, limits: SessionLimits = _DEFAULT_LIMITS) -> ClientEvent:
    """One WebSocket message -> a typed client event, or :class:`ProtocolError` (items and
    instructions over ``limits`` too: code ``input_too_large``)."""
    if isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("invalid_event", "binary messages are not supported: send JSON text events")
    try:
        ev = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("invalid_json", f"the message is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(ev, dict):
        raise ProtocolError("invalid_event", "an event must be a JSON object with a 'type'")
    event_id = ev.get("event_id")
    if event_id is not None and (not isinstance(event_id, str) or len(event_id) > 512):
        raise ProtocolError("invalid_value", "event_id must be a string of at most 512 characters", "event_id")
    t = ev.get("type")
    if not isinstance(t, str):
        raise ProtocolError("missing_required_parameter", "Missing required parameter: 'type'", "type", event_id)
    err = lambda code, msg, param=None: ProtocolError(code, msg, param, event_id)
    if t == "session.update":
        if "session" not in ev:
            raise err("missing_required_parameter", "Missing required parameter: 'session'", "session")
        return SessionUpdate(event_id, parse_session(ev["session"], event_id, limits))
    if t == "input_audio_buffer.append":
        return AudioAppend(event_id, decode_pcm16(ev.get("audio"), "audio", event_id))
    if t == "input_audio_buffer.commit":
        return AudioCommit(event_id)
    if t == "input_audio_buffer.clear":
        return AudioClear(event_id)
    if t == "conversation.item.create":
        from omnistream.apps.realtime_items import parse_item  # (it builds on this module)

        return parse_item(ev, event_id, limits)
    if t in ("conversation.item.delete", "conversation.item.retrieve"):
        item_id = ev.get("item_id")
        if not isinstance(item_id, str) or not 0 < len(item_id) <= 256:
            raise err("missing_required_parameter", "Missing required parameter: 'item_id'", "item_id")
        return (ItemDelete if t.endswith("delete") else ItemRetrieve)(event_id, item_id)
    if t == "conversation.item.truncate":
        item_id = ev.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise err("missing_required_parameter", "Missing required parameter: 'item_id'", "item_id")
        idx, end = ev.get("content_index", 0), ev.get("audio_end_ms")
        for name, x in (("content_index", idx), ("audio_end_ms", end)):
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**40:
                raise err("invalid_value", f"{name} must be a non-negative integer", name)
        return ItemTruncate(event_id, item_id, idx, end)
    if t == "response.create":
        r = ev.get("response") or {}
        if not isinstance(r, dict):
            raise err("invalid_type", "response must be an object", "response")
        if r.get("conversation", "auto") not in ("auto", "none", None):
            raise err("invalid_value", "response.conversation must be 'auto' or 'none'", "response.conversation")
        audio = None
        for key in ("output_modalities", "modalities"):
            if key in r:
                audio = _modalities(r[key], f"response.{key}", event_id)
        if r.get("input") is not None:
            raise err("unsupported_feature", "response.input (a custom context) is not supported: the reply uses "
                      "the conversation (conversation 'none' keeps it out of the conversation)", "response.input")
        mot = None
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in r:
                mot = _max_tokens(r[key], f"response.{key}", event_id)
        ins = _instructions(r.get("instructions"), "response.instructions", event_id, limits)
        tools = _tools(r["tools"], "response.tools", event_id) if "tools" in r else None
        choice = None
        if r.get("tool_choice") is not None:
            choice = _tool_choice(r["tool_choice"], tools, "response.tool_choice", event_id)
        return ResponseCreate(event_id, mot, ins, audio, tools, choice, _response_voice(r, event_id),
                              r.get("conversation") == "none", _metadata(r.get("metadata"), event_id))
    if t == "response.cancel":
        rid = ev.get("response_id")
        if rid is not None and not isinstance(rid, str):
            raise err("invalid_type", "response_id must be a string", "response_id")
        return ResponseCancel(event_id, rid)
    if t in _UNSUPPORTED:
        raise err("unsupported_event", f"{t} is not supported by this server", "type")
    raise err("unknown_event_type", f"Unknown event type {t[:100]!r}", "type")


def _response_voice(r: dict, event_id) -> str | None:
    """``response.voice`` (beta) / ``response.audio.output.voice`` (GA); the format must be pcm16."""
    v = _voice(r.get("voice"), "response.voice", event_id)
    audio = r.get("audio")
    if audio is None:
        return v
    out = audio.get("output") if isinstance(audio, dict) else None
    if not isinstance(audio, dict) or set(audio) - {"output"} or (out is not None and not isinstance(out, dict)):
        raise ProtocolError("invalid_value", "response.audio must be {'output': {'voice': ..., 'format': ...}}",
                            "response.audio", event_id)
    out = out or {}
    for k in set(out) - {"voice", "format"}:
        raise ProtocolError("unknown_parameter", f"Unknown parameter: 'response.audio.output.{k}'",
                            f"response.audio.output.{k}", event_id)
    if "format" in out:
        _ga_format(out["format"], "response.audio.output.format", event_id)
    ov = out.get("voice")
    return _voice(ov.get("id") if isinstance(ov, dict) else ov, "response.audio.output.voice", event_id) or v


def _metadata(m, event_id) -> dict | None:
    """``response.metadata``: at most 16 string pairs (keys up to 64, values up to 512 characters)."""
    if m is None:
        return None
    if not isinstance(m, dict) or len(m) > 16 or any(
            not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512 for k, v in m.items()):
        raise ProtocolError("invalid_value", "response.metadata must be at most 16 string pairs (keys of up to 64, "
                            "values of up to 512 characters)", "response.metadata", event_id)
    return dict(m)


def decode_pcm16(v, param: str = "audio", event_id: str | None = None) -> np.ndarray:
    """base64 pcm16 little-endian mono -> (n,) int16; bad base64 or an odd byte count are errors."""
    if not isinstance(v, str):
        raise ProtocolError("missing_required_parameter" if v is None else "invalid_type",
                            f"{param} must be a base64 string of pcm16 24 kHz mono audio", param, event_id)
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", f"{param} is not valid base64", param, event_id) from None
    if len(raw) % 2:
        raise ProtocolError("invalid_audio_format", f"{param} holds {len(raw)} bytes: pcm16 needs an even count "
                            "(24 kHz mono, 16-bit little-endian)", param, event_id)
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,(.*)", re.DOTALL)
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "jpg": b"\xff\xd8\xff", "webp": b"RIFF"}


def decode_image(url, param: str = "image_url", event_id: str | None = None,
                 limits: SessionLimits = _DEFAULT_LIMITS) -> np.ndarray:
    """A ``data:image/...;base64,`` URL -> (H, W, 3) uint8 RGB; anything else is an error. Images
    over ``limits.max_image_bytes`` (encoded) or ``max_image_pixels`` (read from the header, before
    decoding: decompression bombs) are ``input_too_large``."""
    if not isinstance(url, str):
        raise ProtocolError("invalid_type", f"{param} must be a data URL string", param, event_id)
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise ProtocolError("invalid_image", f"{param} must be a data URL 'data:image/png|jpeg|webp;base64,...' "
                            "(remote URLs are not fetched)", param, event_id)
    kind = m.group(1)
    if len(m.group(2)) // 4 * 3 > limits.max_image_bytes:
        raise ProtocolError("input_too_large", f"{param}: more than {limits.max_image_bytes} bytes of image data",
                            param, event_id)
    try:
        raw = base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", f"{param} is not valid base64", param, event_id) from None
    if not raw.startswith(_MAGIC[kind]) or (kind == "webp" and raw[8:12] != b"WEBP"):
        raise ProtocolError("invalid_image", f"{param} does not hold {kind.upper()} data", param, event_id)
    import av

    fmt = {"png": "png_pipe", "jpeg": "jpeg_pipe", "jpg": "jpeg_pipe", "webp": "webp_pipe"}[kind]
    try:
        with av.open(io.BytesIO(raw), format=fmt) as c:
            if not c.streams.video:
                raise ProtocolError("invalid_image", f"{param}: no image found", param, event_id)
            st = c.streams.video[0]
            w, h = st.codec_context.width, st.codec_context.height
            if w * h > limits.max_image_pixels:
                raise ProtocolError("input_too_large", f"{param}: a {w}x{h} image is larger than "
                                    f"{limits.max_image_pixels} pixels", param, event_id)
            frame = next(c.decode(st))
            img = frame.to_ndarray(format="rgb24")
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 -- PyAV raises many error types on corrupt data
        raise ProtocolError("invalid_image", f"{param}: cannot decode {kind.upper()}: {type(e).__name__}",
                            param, event_id) from None
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] * img.shape[1] > limits.max_image_pixels:
        raise ProtocolError("invalid_image", f"{param}: unexpected decoded shape {img.shape}", param, event_id)
    return np.ascontiguousarray(img)
