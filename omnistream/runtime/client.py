"""One client interface over the chat pipeline, whether it runs in this process or in stages.

The server (and tests) talk to the pipeline only through :class:`Client`; which implementation
sits behind it -- :class:`~omnistream.runtime.inproc.InProcClient` (the pipeline's workers on a
thread of this process) or :class:`~omnistream.runtime.procclient.MultiProcClient` (the same
workers in stage processes) -- is a deployment choice; both are thin transports under
:class:`~omnistream.runtime.wireclient.WireClient`, and the integration tests run the same cases
against both (vLLM v1's ``EngineCoreClient`` follows the same pattern).

The interface is asyncio-facing because its caller is a WebSocket server; the model work runs
elsewhere (an engine thread, or stage processes) so the event loop never blocks on it.

Epochs: every session counts its replies' epochs. :meth:`Client.cancel` bumps the epoch at once
(barge-in) and every event of an older epoch is dropped before it reaches the caller, so a
cancelled reply cannot leak a late audio chunk into the next one.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- options
@dataclass
class SessionOptions:
    """What a session is opened with (``session.update`` may change voice/prompt before a turn)."""

    voice: str | None = None  # a speaker from the checkpoint's spk_dict.pt; None: text only
    system_prompt: str | None = None  # None: the checkpoint's default Qwen system prompt
    window: str | None = None  # sink + sliding-window cache, e.g. "8192" or "600s"; None: growing
    max_new_tokens: int = 64  # reply text tokens
    max_speech_s: float = 30.0  # the Talker stops after this much speech (a random one never ends)
    temperature: float = 0.0
    fps: float = 2.0  # video frames per second the encoder samples
    seed: int | None = None  # seeds sampling (Thinker at temperature > 0, the Talker) and the speech noise
    transcribe: bool = False  # keep each turn's audio so a commit can ask for its input transcription
    block_sparse_dit: bool = False  # Token2Wav's DiT attends only to the key blocks its mask allows (faster, not bit-equal)


@dataclass
class ResponseOptions:
    """One reply's own settings (``response.create``); the session's options fill what is unset."""

    max_new_tokens: int | None = None  # None: the session's
    instructions: str | None = None  # for this reply only (added to the session's system prompt)
    tools: list = field(default_factory=list)  # function tools, as omnistream.engine.tools.check_tools returns
    tool_choice: str = "auto"  # auto | none | required | function:NAME (omnistream.engine.tools.check_tool_choice)
    audio: bool = True  # False: a text-only reply (no Talker / Token2Wav work)
    voice: str | None = None  # this reply's speaker (a checkpoint voice); None: the session's
    out_of_band: bool = False  # the reply is not added to the conversation (conversation "none")
    item: str | None = None  # the conversation item the reply becomes (the server's id); None: anonymous


# ---------------------------------------------------------------------------------- events
@dataclass
class TextDelta:
    """A piece of the reply text (whole UTF-8 characters)."""

    epoch: int
    text: str


@dataclass
class ArgumentsDelta:
    """A piece of the arguments (JSON text) of the function call ``name`` the reply is writing."""

    epoch: int
    name: str
    text: str


@dataclass
class AudioDelta:
    """A chunk of the spoken reply: float32 mono PCM at 24 kHz, shape (n,)."""

    epoch: int
    pcm: np.ndarray


@dataclass
class ResponseDone:
    """The reply of ``epoch`` ended (completed, cancelled or cut by a limit)."""

    epoch: int
    text: str
    reply_tokens: int
    audio_samples: int
    cancelled: bool
    stats: dict = field(default_factory=dict)  # TurnStats fields: ttft_s, first_audio_s, rtf, ...
    usage: dict = field(default_factory=dict)  # input_tokens (prefilled for it), output_tokens (generated), ...
    tool_calls: list = field(default_factory=list)  # omnistream.engine.tools.ToolCall per function call made


@dataclass
class Transcript:
    """Input transcription of the user turn committed as ``item`` (``commit(..., transcribe=item)``): a
    piece of text, or (``final``) the whole transcript; ``error`` set: it failed."""

    item: str
    text: str
    final: bool = False
    error: str | None = None
    usage: dict = field(default_factory=dict)  # (final) input_tokens, audio_tokens, output_tokens


@dataclass
class SessionError:
    """Something went wrong for this session; the session goes on with its next turn."""

    epoch: int
    code: str  # e.g. "invalid_audio", "stage_lost", "busy"
    message: str


Event = TextDelta | ArgumentsDelta | AudioDelta | ResponseDone | SessionError


class ClientError(RuntimeError):
    """A call the pipeline cannot take (unknown session, too many sessions, closed client); ``code``:
    the pipeline's stable error code when it gave one (e.g. ``turn_too_long``)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------- interface
class Client(ABC):
    """Sessions over the Thinker-Talker pipeline.

    Input calls (``push_*``, ``commit``, ``clear``) are queued in order per session and return
    at once; bad input is reported as a :class:`SessionError` event, never raised, so the
    session goes on. :meth:`respond` streams the reply's events and ends with
    :class:`ResponseDone` (or a :class:`SessionError` if the reply was lost).
    """

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def open_session(self, options: SessionOptions | None = None) -> str: ...

    @abstractmethod
    async def close_session(self, sid: str) -> None: ...

    @abstractmethod
    async def update_session(self, sid: str, options: SessionOptions) -> None:
        """New options take effect from the next turn (voice, prompt, limits)."""

    @abstractmethod
    async def push_audio(self, sid: str, pcm: np.ndarray, sample_rate: int) -> None:
        """User audio of any length/rate (int16 or float); opens an audio turn if none is open."""

    @abstractmethod
    async def push_frame(self, sid: str, frame: np.ndarray, t_s: float) -> None:
        """A camera frame (H, W, 3) uint8 RGB taken at session time ``t_s`` seconds."""

    @abstractmethod
    async def commit(self, sid: str, text: str | None = None, transcribe: str | None = None,
                     item: str | None = None) -> None:
        """End the user turn (what was pushed, plus optional typed ``text``). ``transcribe``: an item id;
        the turn's audio is transcribed by the Thinker (the session needs ``transcribe=True``) and
        :class:`Transcript` events with that id come from :meth:`transcripts`. ``item``: the id the
        closed turn has in the conversation (what :meth:`add_item` / :meth:`delete_item` refer to)."""

    @abstractmethod
    async def clear(self, sid: str) -> None:
        """Drop the open user turn (``input_audio_buffer.clear``)."""

    @abstractmethod
    def respond(self, sid: str, options: ResponseOptions | None = None) -> AsyncIterator[Event]:
        """Generate a reply to the committed turn (``options``: this reply's own settings); yields
        events of the new epoch."""

    async def add_item(self, sid: str, item: str, role: str, text: str, after: str | None = None) -> None:
        """Put a ``role`` (user | assistant | system) text message into the conversation as ``item``,
        after the item ``after`` (None: at the end; ``"root"``: at the start). Raises
        :class:`ClientError` with the engine's code (``item_not_found``, ``item_evicted``, ``item_busy``,
        ``invalid_item``) when it cannot; the conversation is then unchanged."""
        raise ClientError("this client keeps no conversation items", "invalid_request")

    async def delete_item(self, sid: str, item: str) -> None:
        """Take ``item`` out of the conversation (ClientError with the engine's code, as :meth:`add_item`)."""
        raise ClientError("this client keeps no conversation items", "invalid_request")

    @abstractmethod
    async def cancel(self, sid: str) -> int:
        """Barge-in: stop the running reply at once; returns the new epoch."""

    @abstractmethod
    async def truncate(self, sid: str, played_samples: int) -> int:
        """Keep only the first ``played_samples`` (24 kHz) of the last reply; returns tokens kept."""

    @abstractmethod
    def take_errors(self, sid: str) -> list[SessionError]:
        """Input errors (bad audio, bad frames) reported since the last call, oldest first."""

    def take_transcripts(self, sid: str) -> list[Transcript]:
        """Transcript events that arrived since the last call, oldest first."""
        return []

    async def wait_transcripts(self, sid: str) -> None:
        """Return once :meth:`take_transcripts` has something (ClientError: the session is gone)."""
        import asyncio

        await asyncio.Event().wait()  # a client without transcription: never

    @abstractmethod
    def status(self) -> dict:
        """JSON-able: stages (name, pid, alive, last_heartbeat_s), sessions, queue depths."""

    def admission(self) -> str | None:
        """None when one more session can be served in real time; else the reason it cannot
        (the server answers HTTP 503 on connect / a ``server_busy`` error event with it)."""
        return None


# ---------------------------------------------------------------------------------- in process
def __getattr__(name: str):
    """``InProcClient`` lives in :mod:`omnistream.runtime.inproc` (it builds on this module)."""
    if name == "InProcClient":
        from omnistream.runtime.inproc import InProcClient

        return InProcClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _error_code(e: Exception) -> str:
    """A stable error code for an exception raised by the pipeline (OpenAI-style snake_case); an
    exception that carries its own ``code`` (the engine's ``ItemError``) keeps it."""
    code = getattr(e, "code", None)
    if isinstance(code, str) and code:
        return code
    name = type(e).__name__
    return {"PcmError": "invalid_audio", "VideoError": "invalid_image", "ClientError": "invalid_request",
            "ValueError": "invalid_request", "TurnTooLong": "turn_too_long"}.get(name, "server_error")
