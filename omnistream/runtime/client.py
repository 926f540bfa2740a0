"""One client interface over the chat pipeline, whether it runs in this process or in stages.

The server (and tests) talk to the pipeline only through :class:`Client`; which implementation
sits behind it -- :class:`InProcClient` (everything in this process, used by fast tests and by
``omnistream chat``) or the multi-process client of :mod:`omnistream.runtime.supervisor` --
is a deployment choice, and the integration tests run the same cases against both (vLLM v1's
``EngineCoreClient`` follows the same pattern).

The interface is asyncio-facing because its caller is a WebSocket server; the model work runs
elsewhere (a worker thread here, stage processes there) so the event loop never blocks on it.

Epochs: every session counts its replies' epochs. :meth:`Client.cancel` bumps the epoch at once
(barge-in) and every event of an older epoch is dropped before it reaches the caller, so a
cancelled reply cannot leak a late audio chunk into the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
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


# ---------------------------------------------------------------------------------- events
@dataclass
class TextDelta:
    """A piece of the reply text (whole UTF-8 characters)."""

    epoch: int
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


@dataclass
class SessionError:
    """Something went wrong for this session; the session goes on with its next turn."""

    epoch: int
    code: str  # e.g. "invalid_audio", "stage_lost", "busy"
    message: str


Event = TextDelta | AudioDelta | ResponseDone | SessionError


class ClientError(RuntimeError):
    """A call the pipeline cannot take (unknown session, too many sessions, closed client)."""


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
    async def commit(self, sid: str, text: str | None = None) -> None:
        """End the user turn (what was pushed, plus optional typed ``text``)."""

    @abstractmethod
    async def clear(self, sid: str) -> None:
        """Drop the open user turn (``input_audio_buffer.clear``)."""

    @abstractmethod
    def respond(self, sid: str) -> AsyncIterator[Event]:
        """Generate a reply to the committed turn; yields events of the new epoch."""

    @abstractmethod
    async def cancel(self, sid: str) -> int:
        """Barge-in: stop the running reply at once; returns the new epoch."""

    @abstractmethod
    async def truncate(self, sid: str, played_samples: int) -> int:
        """Keep only the first ``played_samples`` (24 kHz) of the last reply; returns tokens kept."""

    @abstractmethod
    def take_errors(self, sid: str) -> list[SessionError]:
        """Input errors (bad audio, bad frames) reported since the last call, oldest first."""

    @abstractmethod
    def status(self) -> dict:
        """JSON-able: stages (name, pid, alive, last_heartbeat_s), sessions, queue depths."""

    def admission(self) -> str | None:
        """None when one more session can be served in real time; else the reason it cannot
        (the server answers HTTP 503 on connect / a ``server_busy`` error event with it)."""
        return None


# ---------------------------------------------------------------------------------- in process
_STOP = object()


class _Session:
    """One conversation owned by the worker thread; ``epoch`` is read by the event loop."""

    def __init__(self, sid: str, options: SessionOptions):
        self.sid = sid
        self.options = options
        self.chat = None  # OmniChat, built lazily on the worker thread
        self.epoch = 0
        self.turn_open = False
        self.video = False
        self.t0_frame: float | None = None


class InProcClient(Client):
    """The whole pipeline in this process: one worker thread runs every session's model work in
    order (torch already uses all cores for one forward), the event loop only moves events."""

    def __init__(self, ck, *, max_sessions: int = 8):
        self.ck = ck
        self.max_sessions = max_sessions
        self._sessions: dict[str, _Session] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._errors: dict[str, list[SessionError]] = {}  # input errors not yet taken

    # -- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="omnistream-inproc", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        for s in self._sessions.values():
            if s.chat is not None:
                s.chat.cancel()
        self._jobs.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            try:
                job()
            except Exception:  # one session's failure must not stop the worker
                log.exception("in-process pipeline job failed")

    def _submit(self, fn) -> asyncio.Future:
        """Run ``fn()`` on the worker thread; the future resolves on the event loop."""
        fut = self._loop.create_future()

        def job():
            try:
                r = fn()
            except BaseException as e:  # noqa: BLE001 -- handed to the awaiting caller
                self._loop.call_soon_threadsafe(_settle, fut, None, e)
            else:
                self._loop.call_soon_threadsafe(_settle, fut, r, None)

        self._jobs.put(job)
        return fut

    def _session(self, sid: str) -> _Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise ClientError(f"unknown session {sid!r}") from None

    # -- sessions
    async def open_session(self, options: SessionOptions | None = None) -> str:
        if len(self._sessions) >= self.max_sessions:
            raise ClientError(f"too many sessions (max {self.max_sessions})")
        sid = f"sess_{next(self._ids)}"
        s = _Session(sid, options or SessionOptions())
        self._sessions[sid] = s
        try:
            await self._submit(lambda: self._build(s))
        except BaseException:
            self._sessions.pop(sid, None)  # (an unknown voice must not leave a half-open session)
            raise
        return sid

    def _build(self, s: _Session) -> None:
        from omnistream.chat import SYSTEM_PROMPT, OmniChat, parse_window
        from omnistream.talker.talker import TalkerConfig

        o = s.options
        if o.voice is not None and o.voice not in self.ck.voices:
            raise ClientError(f"unknown voice {o.voice!r}; this checkpoint has {sorted(self.ck.voices)}")
        s.chat = OmniChat(self.ck, o.system_prompt or SYSTEM_PROMPT, o.fps, voice=o.voice,
                          talker_config=TalkerConfig(max_new_tokens=max(1, int(o.max_speech_s * 50))),
                          window=parse_window(o.window, video=True))

    async def close_session(self, sid: str) -> None:
        s = self._sessions.pop(sid, None)
        if s is not None and s.chat is not None:
            s.chat.cancel()

    async def update_session(self, sid: str, options: SessionOptions) -> None:
        s = self._session(sid)
        key = lambda o: (o.voice, o.system_prompt, o.window, o.max_speech_s, o.fps)
        rebuild = key(options) != key(s.options)
        old, s.options = s.options, options
        if rebuild:  # a new voice/prompt/cache starts a fresh conversation
            try:
                await self._submit(lambda: self._build(s))
            except BaseException:
                s.options = old  # (a ClientError -- e.g. an unknown voice -- keeps the old conversation)
                raise

    # -- input (errors become events of the next respond(); the session goes on)
    async def push_audio(self, sid: str, pcm: np.ndarray, sample_rate: int) -> None:
        s = self._session(sid)
        self._jobs.put(lambda: self._guard(s, lambda: self._audio(s, pcm, sample_rate)))

    def _audio(self, s: _Session, pcm, rate) -> None:
        if not s.turn_open:  # validate first: bad audio must not open a turn it cannot fill
            from omnistream.encoders.audio import PcmConverter

            PcmConverter()(pcm, rate)
        self._open_turn(s, audio=True)
        s.chat.push_audio(pcm, rate)

    async def push_frame(self, sid: str, frame: np.ndarray, t_s: float) -> None:
        s = self._session(sid)
        self._jobs.put(lambda: self._guard(s, lambda: self._frame(s, frame, t_s)))

    def _frame(self, s: _Session, frame, t_s) -> None:
        from omnistream.encoders.vision import check_frame

        check_frame(frame)  # a bad frame must not turn the next turn into a video turn
        if not s.turn_open:  # a turn that starts with the camera on carries audio in video
            s.video = True
        if not s.video:
            return  # the camera came on mid-turn: its frames join the next turn
        self._open_turn(s, audio=True)
        if s.t0_frame is None:
            s.t0_frame = t_s
        s.chat.push_frame(frame, t_s - s.t0_frame)

    def _open_turn(self, s: _Session, audio: bool) -> None:
        if not s.turn_open:
            s.chat.begin_turn(audio=audio, video=s.video)
            s.turn_open = True

    async def commit(self, sid: str, text: str | None = None) -> None:
        s = self._session(sid)
        await self._submit(lambda: self._commit(s, text))

    def _commit(self, s: _Session, text) -> None:
        try:
            if s.turn_open:
                s.chat.end_turn(text)
            else:
                s.chat.say(text or "")
        except Exception:
            if s.turn_open:  # a turn that cannot be closed is dropped, so the next one starts clean
                s.chat.abort_turn()
            raise
        finally:
            s.turn_open, s.video, s.t0_frame = False, False, None

    async def clear(self, sid: str) -> None:
        s = self._session(sid)
        await self._submit(lambda: self._clear(s))

    def _clear(self, s: _Session) -> None:
        if s.turn_open:
            s.chat.abort_turn()
        s.turn_open, s.video, s.t0_frame = False, False, None

    def _guard(self, s: _Session, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- bad input must not end the session
            self._errors.setdefault(s.sid, []).append(
                SessionError(s.epoch, _error_code(e), str(e)))

    def take_errors(self, sid: str) -> list[SessionError]:
        return self._errors.pop(sid, [])

    # -- output
    async def respond(self, sid: str) -> AsyncIterator[Event]:
        s = self._session(sid)
        epoch = s.epoch
        events: asyncio.Queue = asyncio.Queue()
        put = lambda ev: self._loop.call_soon_threadsafe(events.put_nowait, ev)

        def run():
            o, text, samples = s.options, [], 0
            try:
                if s.turn_open:
                    self._commit(s, None)
                for ev in s.chat.reply(o.max_new_tokens, o.temperature):
                    if s.epoch != epoch:
                        s.chat.cancel()
                        continue
                    if ev.kind == "text":
                        text.append(ev.text)
                        put(TextDelta(epoch, ev.text))
                    else:
                        samples += len(ev.pcm)
                        put(AudioDelta(epoch, ev.pcm))
            except Exception as e:  # noqa: BLE001
                put(SessionError(epoch, _error_code(e), str(e)))
                return
            st = s.chat.stats
            put(ResponseDone(epoch, "".join(text), st.reply_tokens, samples, st.cancelled or s.epoch != epoch,
                             {k: getattr(st, k) for k in ("ttft_s", "first_audio_s", "decode_s", "end_of_input_s")}))

        self._jobs.put(run)
        while True:
            ev = await events.get()
            if ev.epoch != s.epoch and not isinstance(ev, ResponseDone):
                continue  # barge-in: drop what the cancelled reply still produced
            yield ev
            if isinstance(ev, ResponseDone | SessionError):
                return

    async def cancel(self, sid: str) -> int:
        s = self._session(sid)
        s.epoch += 1
        if s.chat is not None:
            s.chat.cancel()
        return s.epoch

    async def truncate(self, sid: str, played_samples: int) -> int:
        s = self._session(sid)
        return await self._submit(lambda: s.chat.truncate_to_played(played_samples))

    def status(self) -> dict:
        alive = self._thread is not None and self._thread.is_alive()
        return {
            "mode": "in-process",
            "stages": [{"name": "all", "pid": None, "alive": alive, "last_heartbeat_s": 0.0 if alive else None}],
            "sessions": [{"id": s.sid, "epoch": s.epoch, "turn_open": s.turn_open} for s in self._sessions.values()],
            "queues": {"jobs": self._jobs.qsize()},
        }


def _settle(fut: asyncio.Future, result, exc) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _error_code(e: Exception) -> str:
    """A stable error code for an exception raised by the pipeline (OpenAI-style snake_case)."""
    name = type(e).__name__
    return {"PcmError": "invalid_audio", "VideoError": "invalid_image", "ClientError": "invalid_request",
            "ValueError": "invalid_request"}.get(name, "server_error")
