"""One Realtime reply: the pipeline's events for one ``respond()`` mapped onto the protocol.

Text deltas go out at once; audio goes through the :class:`~omnistream.apps.pacer.AudioPacer`
(40 ms deltas at real-time pace), so a barge-in (:meth:`Reply.stop`) silences the reply at
once and the session knows how much was heard.

Every reply ends with exactly one ``response.done``, whatever happens meanwhile: the pipeline
ends it (``completed`` / ``incomplete`` / ``cancelled``), reports it lost (an ``error`` event,
then ``failed``), raises, or says nothing at all -- a pipeline silent for
``SessionLimits.reply_idle_s`` ends the reply as ``failed`` (code ``reply_timeout``), and a
cancelled reply whose end is not confirmed within ``cancel_grace_s`` ends as ``cancelled``; in
both cases the session's epoch is bumped so the lost reply's late events are dropped, and the
session is free for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import numpy as np
from websockets.exceptions import ConnectionClosed

from omnistream.apps.pacer import AudioPacer
from omnistream.apps.realtime import SAMPLE_RATE, ProtocolError, encode_pcm16
from omnistream.runtime.client import AudioDelta, ClientError, ResponseDone, SessionError, TextDelta

log = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Reply:
    """One reply of a :class:`~omnistream.apps.realtime_session.RealtimeSession`."""

    def __init__(self, conn, prev: Reply | None):
        self.conn, self.prev = conn, prev
        self.id, self.item_id = new_id("resp"), new_id("item")
        self.audio = conn.options.voice is not None
        self.voice = conn.options.voice
        self.max_tokens = conn.options.max_new_tokens
        self.task: asyncio.Task | None = None
        self.stopped: str | None = None  # cancel reason: "turn_detected" | "client_cancelled"
        self.stopped_at = 0.0
        self.truncated_ms: int | None = None
        cfg = conn.server.config
        self.pacer = AudioPacer(cfg.chunk_samples, cfg.output_lead_ms * SAMPLE_RATE / 1000)
        self.text: list[str] = []
        self.started = self.finished = False  # response.created / response.done sent
        self.last_event_t = time.monotonic()
        self.done: ResponseDone | None = None  # the pipeline's end of the reply
        self.failure: SessionError | None = None  # ... or the loss it reported

    @property
    def sent(self) -> int:
        """Samples of reply audio sent to the client."""
        return self.pacer.sent

    def played(self) -> int:
        return self.pacer.played()

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped, self.stopped_at = reason, time.monotonic()
            self.pacer.stop()

    async def run(self) -> None:
        c = self.conn
        try:
            if self.prev is not None and self.prev.task is not None:
                await asyncio.shield(self.prev.task)  # an auto-response waits for the one it follows
            await self._run()
        except ConnectionClosed:
            self.stop("client_cancelled")
            try:  # the connection's cleanup may have closed the session already
                await c.client.cancel(c.sid)
            except ClientError:
                pass
        except Exception as e:
            log.exception("session %s: response failed", c.sid)
            try:
                err = ProtocolError("server_error", f"{type(e).__name__}: {e}", type="server_error")
                await (c.send_error(err) if self.finished else self._finish(None, err))
            except ConnectionClosed:
                pass
        finally:
            c.response_finished(self)

    async def _run(self) -> None:
        c, ev = self.conn, self.conn.ev
        prev_item = c.last_item_id
        await c.send(ev.event("response.created", response=ev.response(
            self.id, "in_progress", self.audio, self.voice, max_output_tokens=self.max_tokens)))
        self.started = True
        item = ev.assistant_item(self.item_id, "in_progress", self.audio)
        await c.send(ev.event("response.output_item.added", response_id=self.id, output_index=0, item=item))
        await c.send(ev.event("conversation.item.created", previous_item_id=prev_item, item=item))
        c.last_item_id = self.item_id
        self.ids = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
        await c.send(ev.event("response.content_part.added", **self.ids, part=ev.part(self.audio)))
        pacer = asyncio.create_task(self.pacer.run(self._send_audio))
        failure: ProtocolError | None = None
        try:
            if self.stopped is None:  # a barge-in before the reply began: nothing to generate
                failure = await self._watch(asyncio.create_task(self._consume()))
        finally:
            self.pacer.finish()
            await pacer
        await self._finish(self.done, failure)

    async def _send_audio(self, pcm: np.ndarray) -> None:
        c = self.conn
        await c.send(c.ev.event("response.output_audio.delta", **self.ids, delta=encode_pcm16(pcm)))

    async def _consume(self) -> None:
        """The pipeline's events for this reply, until its end (or a reported failure)."""
        c, ev = self.conn, self.conn.ev
        async for e in c.client.respond(c.sid):
            self.last_event_t = time.monotonic()
            if isinstance(e, TextDelta):
                self.text.append(e.text)
                if self.stopped is None:
                    kind = "response.output_audio_transcript.delta" if self.audio else "response.output_text.delta"
                    await c.send(ev.event(kind, **self.ids, delta=e.text))
            elif isinstance(e, AudioDelta):
                if self.stopped is None and self.audio:
                    self.pacer.put(np.round(np.clip(e.pcm, -1.0, 1.0) * 32767.0).astype(np.int16))
            elif isinstance(e, ResponseDone):
                self.done = e
            elif isinstance(e, SessionError):
                self.failure = e

    async def _watch(self, consume: asyncio.Task) -> ProtocolError | None:
        """Wait for the pipeline's end of the reply, bounded (see the module doc); the failure to
        report, if any."""
        lim = self.conn.limits
        while not consume.done():
            now = time.monotonic()
            if self.stopped is not None:
                left = self.stopped_at + lim.cancel_grace_s - now
            else:
                left = self.last_event_t + lim.reply_idle_s - now
            if left <= 0:
                consume.cancel()
                await asyncio.gather(consume, return_exceptions=True)
                try:  # a later event of this reply is stale now
                    await self.conn.client.cancel(self.conn.sid)
                except ClientError:
                    pass
                if self.stopped is not None:
                    log.warning("session %s: the pipeline did not confirm the cancelled reply's end in %.0f s",
                                self.conn.sid, lim.cancel_grace_s)
                    return None
                log.error("session %s: no reply event for %.0f s: the reply is ended as failed", self.conn.sid,
                          lim.reply_idle_s)
                return ProtocolError("reply_timeout", f"the pipeline sent nothing for this reply in "
                                     f"{lim.reply_idle_s:g} s: it was ended", type="server_error")
            await asyncio.wait({consume}, timeout=min(left, 0.25))
        consume.result()  # (ConnectionClosed, ClientError... go to run())
        if self.failure is not None:
            return ProtocolError(self.failure.code, self.failure.message, type="server_error")
        return None

    async def _finish(self, done: ResponseDone | None, failure: ProtocolError | None) -> None:
        """The closing events: the parts' ``done`` events (when they were opened), ``response.done``."""
        c, ev = self.conn, self.conn.ev
        self.finished = True
        text = "".join(self.text)
        if failure is not None:
            await c.send_error(failure)
            status, details = "failed", {"type": "failed", "error": {"type": "server_error", "code": failure.code,
                                                                     "message": failure.message}}
        elif self.stopped is not None:
            status, details = "cancelled", {"type": "cancelled", "reason": self.stopped}
        elif done is not None and done.reply_tokens >= self.max_tokens:
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            status, details = "completed", None
        item = ev.assistant_item(self.item_id, "completed" if status == "completed" else "incomplete", self.audio,
                                 text)
        if self.started:
            ids = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
            if self.audio:
                await c.send(ev.event("response.output_audio.done", **ids))
                await c.send(ev.event("response.output_audio_transcript.done", **ids, transcript=text))
            else:
                await c.send(ev.event("response.output_text.done", **ids, text=text))
            await c.send(ev.event("response.content_part.done", **ids, part=ev.part(self.audio, text)))
            await c.send(ev.event("response.output_item.done", response_id=self.id, output_index=0, item=item))
        n = done.reply_tokens if done is not None else 0
        usage = {"total_tokens": n, "input_tokens": 0, "output_tokens": n}
        stats = {"audio_samples": self.sent, **(done.stats if done is not None else {})}
        r = ev.response(self.id, status, self.audio, self.voice, [item] if self.started else [], details, usage,
                        self.max_tokens)
        r["metadata"] = {k: str(v) for k, v in stats.items()}  # server timings, for clients that care
        c.response_finished(self)  # before response.done leaves: the client may send response.create at once
        await c.send(ev.event("response.done", response=r))
