"""The Realtime session's configuration: what ``session.update`` sets, validated.

:func:`parse_session` takes a ``session`` object in either shape of the protocol (the GA nested
``audio.{input,output}`` one or the beta flat one, see :mod:`omnistream.apps.realtime` for the two
dialects) and returns a :class:`SessionPatch` that :meth:`SessionPatch.apply` lays over the
session's :class:`SessionConfig` (with its :class:`TurnDetection`). The value checks here (tools,
tool choice, modalities, token limits, voices, audio formats) are shared by ``response.create``'s
per-reply overrides, parsed in :mod:`omnistream.apps.realtime` with the other client events.

:class:`ProtocolError` lives here, at the bottom of the protocol's parsers, because every one of
them raises it; :mod:`omnistream.apps.realtime` re-exports it with the rest of this module's names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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


@dataclass
class SessionPatch:
    """A validated ``session.update``: the fields it names (the others keep their value)."""

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
        out["instructions"] = _instructions(s["instructions"], "session.instructions", event_id, limits)
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


def _instructions(v, param, event_id, limits: SessionLimits) -> str | None:
    """Instructions (None or "": the default); longer than ``limits.max_instructions_chars``: ``input_too_large``."""
    if isinstance(v, str) and len(v) > limits.max_instructions_chars:
        raise ProtocolError("input_too_large", f"{param} holds {len(v)} characters: at most "
                            f"{limits.max_instructions_chars} are taken", param, event_id)
    return None if v is None else _str(v, param, event_id, max_len=limits.max_instructions_chars) or None


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
