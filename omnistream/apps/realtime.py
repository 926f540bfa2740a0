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
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field, replace

import numpy as np

from omnistream.apps.limits import SessionLimits

SAMPLE_RATE = 24000  # pcm16 in and out, as the OpenAI Realtime API
_DEFAULT_LIMITS = SessionLimits()
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")

class ProtocolError(Exception):
    """A client event the server cannot take; becomes an ``error`` server event."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.event_id, self.type = code, message, param, event_id, type


# ---------------------------------------------------------------------------------- session
@dataclass
class TurnDetection:
    """``turn_detection: {type: "server_vad", ...}`` (silero-vad on the server)."""

    threshold: float = 0.5  # speech probability that starts speech
    prefix_padding_ms: int = 300  # audio kept before the detected start
    silence_duration_ms: int = 500  # silence that ends speech
    create_response: bool = True  # speech_stopped -> commit + response.create
    interrupt_response: bool = True  # speech_started during a reply -> barge-in


@dataclass
class SessionConfig:
    """What the client configured; the server maps it onto the pipeline's SessionOptions."""

    model: str = "omnistream"
    instructions: str | None = None  # None: the checkpoint's default system prompt
    audio_out: bool = True  # output_modalities ["audio"] (with transcript) or ["text"]
    voice: str | None = None  # None: the server's default voice
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    max_output_tokens: int | None = None  # None: the server's default ("inf" is capped by it)
    temperature: float | None = None  # None: the server's default (beta field)
    tools: list = field(default_factory=list)  # function tools (omnistream.engine.tools.check_tools)
    tool_choice: str = "auto"  # auto | none | required | function:NAME
    transcription: dict | None = None  # {"model", ...}: the Thinker transcribes each committed user turn


_UNSET = object()


@dataclass
class SessionPatch:
    """A validated ``session.update``: fields left at ``_UNSET`` keep their value."""

    fields: dict
    dialect: str | None  # "ga" | "beta" | None (shape not telling)

    def apply(self, cfg: SessionConfig) -> SessionConfig:
        return replace(cfg, **self.fields)


_GA_IGNORED = {"type", "include", "tracing", "truncation", "prompt", "parallel_tool_calls",
               "reasoning", "object", "id", "expires_at"}
_BETA_IGNORED = {"input_audio_noise_reduction", "speed",
                 "tracing", "object", "id", "expires_at", "client_secret", "include", "input_audio_format",
                 "output_audio_format"}
_BETA_ONLY = {"modalities", "voice", "input_audio_format", "output_audio_format", "turn_detection", "temperature",
              "max_response_output_tokens", "input_audio_transcription", "input_audio_noise_reduction", "speed"}
_GA_ONLY = {"output_modalities", "audio", "max_output_tokens", "type"}


def parse_session(s, event_id: str | None = None, limits: SessionLimits = _DEFAULT_LIMITS) -> SessionPatch:
    """Validate a ``session`` object in the GA or the beta shape; unknown keys are errors."""
    err = lambda code, msg, param: ProtocolError(code, msg, param, event_id)
    if not isinstance(s, dict):
        raise err("invalid_type", "session must be an object", "session")
    out: dict = {}
    keys = set(s)
    dialect = "ga" if keys & _GA_ONLY else ("beta" if keys & _BETA_ONLY else None)
    for k in keys - (_GA_ONLY | _BETA_ONLY | _GA_IGNORED | _BETA_IGNORED | {"model", "instructions", "tools",
                                                                             "tool_choice"}):
        raise err("unknown_parameter", f"Unknown parameter: 'session.{k}'", f"session.{k}")
    if "type" in s and s["type"] != "realtime":
        raise err("invalid_value", f"session.type {s['type']!r} is not supported (only 'realtime')", "session.type")
    if "model" in s:
        out["model"] = _str(s["model"], "session.model", event_id, max_len=256)
    if "instructions" in s:
        ins = s["instructions"]
        if isinstance(ins, str) and len(ins) > limits.max_instructions_chars:
            raise err("input_too_large", f"session.instructions holds {len(ins)} characters: at most "
                      f"{limits.max_instructions_chars} are taken", "session.instructions")
        out["instructions"] = None if ins is None else _str(ins, "session.instructions", event_id,
                                                            max_len=limits.max_instructions_chars) or None
    if "tools" in s:
        out["tools"] = _tools(s["tools"], "session.tools", event_id)
    if "tool_choice" in s:  # a named function is checked against the tools once the update is applied
        out["tool_choice"] = _tool_choice(s["tool_choice"], None, "session.tool_choice", event_id)
    # output modalities: GA ["audio"] | ["text"]; beta ["text", "audio"] | ["text"]
    for key in ("output_modalities", "modalities"):
        if key in s:
            out["audio_out"] = _modalities(s[key], f"session.{key}", event_id)
    if "max_output_tokens" in s or "max_response_output_tokens" in s:
        key = "max_output_tokens" if "max_output_tokens" in s else "max_response_output_tokens"
        out["max_output_tokens"] = _max_tokens(s[key], f"session.{key}", event_id)
    if "temperature" in s:
        t = s["temperature"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 2.0:
            raise err("invalid_value", "session.temperature must be a number in [0, 2]", "session.temperature")
        out["temperature"] = float(t)
    # beta flat audio fields
    for key in ("input_audio_format", "output_audio_format"):
        if key in s and s[key] != "pcm16":
            raise err("unsupported_audio_format", f"{key} {s[key]!r} is not supported: this server takes "
                      "and sends pcm16 (24 kHz mono)", f"session.{key}")
    if "voice" in s:
        out["voice"] = _voice(s["voice"], "session.voice", event_id)
    if "input_audio_transcription" in s:
        out["transcription"] = _transcription(s["input_audio_transcription"], "session.input_audio_transcription",
                                              event_id)
    if "turn_detection" in s:
        out["turn_detection"] = _turn_detection(s["turn_detection"], "session.turn_detection", event_id)
    # GA nested audio config
    if "audio" in s:
        audio = s["audio"]
        if not isinstance(audio, dict):
            raise err("invalid_type", "session.audio must be an object", "session.audio")
        for k in set(audio) - {"input", "output"}:
            raise err("unknown_parameter", f"Unknown parameter: 'session.audio.{k}'", f"session.audio.{k}")
        inp, outp = audio.get("input"), audio.get("output")
        if inp is not None:
            if not isinstance(inp, dict):
                raise err("invalid_type", "session.audio.input must be an object", "session.audio.input")
            for k in set(inp) - {"format", "turn_detection", "noise_reduction", "transcription"}:
                raise err("unknown_parameter", f"Unknown parameter: 'session.audio.input.{k}'",
                          f"session.audio.input.{k}")
            if "format" in inp:
                _ga_format(inp["format"], "session.audio.input.format", event_id)
            if "transcription" in inp:
                out["transcription"] = _transcription(inp["transcription"], "session.audio.input.transcription",
                                                      event_id)
            if "turn_detection" in inp:
                out["turn_detection"] = _turn_detection(inp["turn_detection"], "session.audio.input.turn_detection",
                                                        event_id)
        if outp is not None:
            if not isinstance(outp, dict):
                raise err("invalid_type", "session.audio.output must be an object", "session.audio.output")
            for k in set(outp) - {"format", "voice", "speed"}:
                raise err("unknown_parameter", f"Unknown parameter: 'session.audio.output.{k}'",
                          f"session.audio.output.{k}")
            if "format" in outp:
                _ga_format(outp["format"], "session.audio.output.format", event_id)
            if "voice" in outp:
                v = outp["voice"]
                if isinstance(v, dict):  # VoiceID {"id": ...}
                    v = v.get("id")
                out["voice"] = _voice(v, "session.audio.output.voice", event_id)
    return SessionPatch(out, dialect)


def _tools(v, param, event_id) -> list[dict]:
    from omnistream.engine.tools import check_tools

    if v is None:
        return []
    try:
        return check_tools(v)
    except (ValueError, TypeError, RecursionError) as e:
        raise ProtocolError("invalid_value", f"{param}: {e}", param, event_id) from None


def _tool_choice(v, tools: list[dict] | None, param, event_id) -> str:
    """-> ``auto`` | ``none`` | ``required`` | ``function:NAME``; ``tools`` None: the name is not checked."""
    from omnistream.engine.tools import check_tool_choice

    try:
        if tools is None and isinstance(v, dict) and v.get("type") == "function":
            name = v.get("name")
            return check_tool_choice(v, [{"name": name}] if isinstance(name, str) else [])
        return check_tool_choice(v, tools or [])
    except ValueError as e:
        raise ProtocolError("invalid_value", f"{param}: {e}", param, event_id) from None


def _transcription(v, param, event_id) -> dict | None:
    """Input transcription settings (null: off). Every model name is served by the Thinker itself
    (:mod:`omnistream.engine.transcribe`): OpenAI's (``whisper-1``, ``gpt-4o-transcribe``, ...) are
    accepted so their clients work unchanged; ``language`` and ``prompt`` are taken and echoed."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ProtocolError("invalid_type", f"{param} must be an object or null", param, event_id)
    for k in set(v) - {"model", "language", "prompt"}:
        raise ProtocolError("unknown_parameter", f"Unknown parameter: '{param}.{k}'", f"{param}.{k}", event_id)
    out = {"model": "omnistream-thinker"}
    for k in ("model", "language", "prompt"):
        if v.get(k) is not None:
            out[k] = _str(v[k], f"{param}.{k}", event_id, max_len=1024)
    return out


def _str(v, param, event_id, max_len: int) -> str:
    if not isinstance(v, str):
        raise ProtocolError("invalid_type", f"{param} must be a string", param, event_id)
    if len(v) > max_len:
        raise ProtocolError("invalid_value", f"{param} is longer than {max_len} characters", param, event_id)
    return v


def _modalities(v, param, event_id) -> bool:
    if not isinstance(v, list) or not v or any(m not in ("text", "audio") for m in v):
        raise ProtocolError("invalid_value", f"{param} must be a list of 'text' and/or 'audio'", param, event_id)
    return "audio" in v


def _max_tokens(v, param, event_id) -> int | None:
    if v == "inf" or v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
        raise ProtocolError("invalid_value", f"{param} must be an integer in [1, 4096] or 'inf'", param, event_id)
    return v


def _voice(v, param, event_id) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > 64:
        raise ProtocolError("invalid_value", f"{param} must be a voice name", param, event_id)
    return v


def _ga_format(f, param, event_id) -> None:
    if not isinstance(f, dict):
        raise ProtocolError("invalid_type", f"{param} must be an object like {{'type': 'audio/pcm', 'rate': 24000}}",
                            param, event_id)
    t, rate = f.get("type", "audio/pcm"), f.get("rate", SAMPLE_RATE)
    if t != "audio/pcm" or rate != SAMPLE_RATE or set(f) - {"type", "rate"}:
        raise ProtocolError("unsupported_audio_format", f"{param} {f!r} is not supported: this server takes and "
                            "sends audio/pcm at 24000 Hz (pcm16 mono)", param, event_id)


_TD_KEYS = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
            "interrupt_response", "idle_timeout_ms"}


def _turn_detection(v, param, event_id) -> TurnDetection | None:
    if v is None:
        return None  # manual turns: the client commits
    if not isinstance(v, dict):
        raise ProtocolError("invalid_type", f"{param} must be an object or null", param, event_id)
    if v.get("type", "server_vad") != "server_vad":
        raise ProtocolError("unsupported_feature", f"{param}.type {v.get('type')!r} is not supported "
                            "(only 'server_vad')", f"{param}.type", event_id)
    for k in set(v) - _TD_KEYS:
        raise ProtocolError("unknown_parameter", f"Unknown parameter: '{param}.{k}'", f"{param}.{k}", event_id)
    td = TurnDetection()
    checks = {"threshold": (float, 0.0, 1.0), "prefix_padding_ms": (int, 0, 5000),
              "silence_duration_ms": (int, 0, 10000)}
    for k, (kind, lo, hi) in checks.items():
        if k in v and v[k] is not None:
            x = v[k]
            if isinstance(x, bool) or not isinstance(x, int | float) or not lo <= x <= hi or (
                    kind is int and x != int(x)):
                raise ProtocolError("invalid_value", f"{param}.{k} must be a number in [{lo}, {hi}]",
                                    f"{param}.{k}", event_id)
            setattr(td, k, kind(x))
    for k in ("create_response", "interrupt_response"):
        if k in v and v[k] is not None:
            if not isinstance(v[k], bool):
                raise ProtocolError("invalid_type", f"{param}.{k} must be a boolean", f"{param}.{k}", event_id)
            setattr(td, k, v[k])
    return td


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
        ins = r.get("instructions")
        if ins is not None:
            if isinstance(ins, str) and len(ins) > limits.max_instructions_chars:
                raise err("input_too_large", f"response.instructions holds {len(ins)} characters: at most "
                          f"{limits.max_instructions_chars} are taken", "response.instructions")
            ins = _str(ins, "response.instructions", event_id, max_len=limits.max_instructions_chars) or None
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
