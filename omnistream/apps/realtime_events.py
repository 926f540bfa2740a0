"""Server events of the Realtime protocol: what the server sends, in the session's dialect.

The client half (parsing and checking client events) is :mod:`omnistream.apps.realtime`; this
module builds the server's events and objects (session, items, responses) in GA or beta names
(one dialect per session, never both, so no audio plays twice) and encodes reply audio.
"""

from __future__ import annotations

import base64
import itertools

import numpy as np

from omnistream.apps.realtime import SAMPLE_RATE, ProtocolError, SessionConfig

# GA event name -> beta event name (events not listed have one name in both)
_BETA_NAMES = {
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}


class ServerEvents:
    """Builds server events (dicts) in the session's dialect, with fresh ``event_id`` s."""

    def __init__(self, dialect: str = "ga"):
        self.dialect = dialect
        self._ids = itertools.count(1)

    def event(self, type: str, **fields) -> dict:
        if self.dialect == "beta":
            type = _BETA_NAMES.get(type, type)
        return {"type": type, "event_id": f"event_{next(self._ids)}", **fields}

    def error(self, e: ProtocolError) -> dict:
        return self.event("error", error={"type": e.type, "code": e.code, "message": e.message, "param": e.param,
                                          "event_id": e.event_id})

    # -- objects
    def session(self, sid: str, cfg: SessionConfig, voice: str | None, max_output_tokens) -> dict:
        td = None if cfg.turn_detection is None else {"type": "server_vad", **cfg.turn_detection.__dict__}
        mot = "inf" if max_output_tokens is None else max_output_tokens
        if self.dialect == "beta":
            return {"id": sid, "object": "realtime.session", "model": cfg.model,
                    "modalities": ["text", "audio"] if cfg.audio_out else ["text"], "instructions": cfg.instructions,
                    "voice": voice, "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                    "turn_detection": td, "temperature": cfg.temperature, "max_response_output_tokens": mot,
                    "tools": tools_json(cfg.tools), "tool_choice": choice_json(cfg.tool_choice),
                    "input_audio_transcription": cfg.transcription}
        fmt = {"type": "audio/pcm", "rate": SAMPLE_RATE}
        return {"type": "realtime", "object": "realtime.session", "id": sid, "model": cfg.model,
                "output_modalities": ["audio"] if cfg.audio_out else ["text"], "instructions": cfg.instructions,
                "audio": {"input": {"format": fmt, "turn_detection": td, "transcription": cfg.transcription},
                          "output": {"format": fmt, "voice": voice}},
                "max_output_tokens": mot, "tools": tools_json(cfg.tools), "tool_choice": choice_json(cfg.tool_choice)}

    @staticmethod
    def part(audio: bool, transcript: str = "") -> dict:
        """A ``response.content_part.*`` part: "audio"/"text" in both dialects (as the GA SDK types it)."""
        return {"type": "audio", "transcript": transcript} if audio else {"type": "text", "text": transcript}

    def assistant_item(self, item_id: str, status: str, audio: bool, transcript: str | None = None) -> dict:
        """An assistant message; its content types are "output_audio"/"output_text" in GA."""
        content = []
        if transcript is not None:
            content = [self.part(audio, transcript)]
            if self.dialect != "beta":
                content[0]["type"] = "output_" + content[0]["type"]
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    @staticmethod
    def call_item(item_id: str, status: str, call_id: str, name: str, arguments: str) -> dict:
        return {"id": item_id, "object": "realtime.item", "type": "function_call", "status": status,
                "call_id": call_id, "name": name, "arguments": arguments}

    @staticmethod
    def output_item(item_id: str, call_id: str, output: str) -> dict:
        return {"id": item_id, "object": "realtime.item", "type": "function_call_output", "status": "completed",
                "call_id": call_id, "output": output}

    def transcript(self, t, item_id: str) -> dict:
        """The event of one :class:`omnistream.runtime.client.Transcript` (same names in both dialects)."""
        name = "conversation.item.input_audio_transcription."
        if t.error is not None:
            return self.event(name + "failed", item_id=item_id, content_index=0,
                              error={"type": "transcription_error", "code": "transcription_failed",
                                     "message": t.error, "param": None})
        if t.final:
            u = t.usage
            usage = {"type": "tokens", "input_tokens": u.get("input_tokens", 0), "output_tokens": u.get("output_tokens", 0),
                     "total_tokens": u.get("input_tokens", 0) + u.get("output_tokens", 0),
                     "input_token_details": {"audio_tokens": u.get("audio_tokens", 0),
                                             "text_tokens": u.get("input_tokens", 0) - u.get("audio_tokens", 0)}}
            return self.event(name + "completed", item_id=item_id, content_index=0, transcript=t.text, usage=usage)
        return self.event(name + "delta", item_id=item_id, content_index=0, delta=t.text)

    @staticmethod
    def user_item(item_id: str, content: list[dict]) -> dict:
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": content}

    def response(self, rid: str, status: str, audio: bool, voice: str | None, output: list | None = None,
                 status_details: dict | None = None, usage: dict | None = None, max_output_tokens=None,
                 conversation: bool = True) -> dict:
        """A ``realtime.response``; ``conversation`` False: out of band (``conversation_id`` null, as the API)."""
        r = {"id": rid, "object": "realtime.response", "status": status, "status_details": status_details,
             "output": output or [], "conversation_id": "conv_default" if conversation else None, "usage": usage,
             "max_output_tokens": "inf" if max_output_tokens is None else max_output_tokens}
        if self.dialect == "beta":
            r["modalities"] = ["text", "audio"] if audio else ["text"]
            r["voice"] = voice
        else:
            r["output_modalities"] = ["audio"] if audio else ["text"]
            r["audio"] = {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": voice}}
        return r


def tools_json(tools: list[dict]) -> list[dict]:
    return [{"type": "function", **t} for t in tools]


def choice_json(choice: str):
    from omnistream.engine.tools import choice_json as engine_choice_json

    return engine_choice_json(choice)


def encode_pcm16(pcm: np.ndarray) -> str:
    """float32 [-1, 1] or int16 (n,) -> base64 pcm16 little-endian."""
    if pcm.dtype != np.int16:
        pcm = np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")
