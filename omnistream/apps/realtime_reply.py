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

A reply's own settings (``response.create``: instructions, tools, tool_choice, output modalities,
max_output_tokens, voice, ``conversation: "none"``) travel to the pipeline as
:class:`~omnistream.runtime.client.ResponseOptions`, with the id of the item the reply becomes (every
output item of a reply is part of that one pipeline item). An out-of-band reply announces no
``conversation.item.created``, joins no item list and names no item (its ``response`` objects carry
``conversation_id: null`` and the client's ``metadata``). Its
output items: an assistant ``message`` (unless ``tool_choice`` forces a call), then one
``function_call`` item per call the model made (with its ``call_id``, ``name`` and ``arguments``
events); a text-only reply sends no audio event at all. ``usage`` counts the tokens prefilled for
the reply and the tokens generated, as the pipeline reports them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import numpy as np
from websockets.exceptions import ConnectionClosed

from omnistream.apps.pacer import AudioPacer
from omnistream.apps.realtime import SAMPLE_RATE, ProtocolError, ResponseCreate
from omnistream.apps.realtime_events import encode_pcm16
from omnistream.runtime.client import (
    ArgumentsDelta,
    AudioDelta,
    ClientError,
    ResponseDone,
    ResponseOptions,
    SessionError,
    TextDelta,
)

log = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Reply:
    """One reply of a :class:`~omnistream.apps.realtime_session.RealtimeSession`."""

    def __init__(self, conn, prev: Reply | None, req: ResponseCreate | None = None):
        self.conn, self.prev = conn, prev
        self.id, self.item_id = new_id("resp"), new_id("item")
        cfg = conn.cfg
        self.voice = conn.options.voice
        if req is not None and req.voice is not None:  # checked before any work
            voice = conn.resolve_voice(req.voice, "response.voice")
            self.voice = voice if self.voice is not None else None  # (a session without speech speaks no reply)
        self.out_of_band = req is not None and req.out_of_band  # conversation "none"
        self.metadata = req.metadata if req is not None else None
        modal = None if req is None else req.audio_out  # this response's output_modalities, else the session's
        self.audio = self.voice is not None and (cfg.audio_out if modal is None else modal)
        self.max_tokens = (req.max_output_tokens if req is not None and req.max_output_tokens else None) or \
            conn.options.max_new_tokens
        tools = cfg.tools if req is None or req.tools is None else req.tools
        choice = (req.tool_choice if req is not None and req.tool_choice else None) or cfg.tool_choice
        if choice.startswith("function:") and choice[9:] not in {t["name"] for t in tools}:
            raise ProtocolError("invalid_value", f"tool_choice names {choice[9:]!r}, which is not among the tools",
                                "response.tool_choice", req.event_id if req is not None else None)
        if choice == "required" and not tools:
            raise ProtocolError("invalid_value", "tool_choice 'required' needs tools", "response.tool_choice",
                                req.event_id if req is not None else None)
        self.forced = bool(tools) and choice not in ("auto", "none")  # the output is a function call only
        if self.forced:
            self.audio = False  # a function call is never spoken
        self.options = ResponseOptions(  # every reply names its item (None: out of band, not in the conversation)
            max_new_tokens=self.max_tokens, instructions=req.instructions if req is not None else None,
            tools=tools, tool_choice=choice, audio=self.audio,
            voice=self.voice if self.voice != conn.options.voice else None, out_of_band=self.out_of_band,
            item=None if self.out_of_band else self.item_id)
        self.outputs: list[dict] = []  # the response's output items, in order
        self.streamed: dict | None = None  # the function call whose arguments are streaming (ids, name, text)
        self.n_items = 0 if self.forced else 1  # output items opened (the message first, unless forced)
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
        conn.server.metrics.reply_started(self)  # metrics

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
        await c.send(ev.event("response.created", response=self._object("in_progress")))
        self.started = True
        self.ids = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
        if not self.forced:  # a forced function call has no message item
            item = ev.assistant_item(self.item_id, "in_progress", self.audio)
            await c.send(ev.event("response.output_item.added", response_id=self.id, output_index=0, item=item))
            await self._created(item)
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
        c.server.metrics.audio_out(self, len(pcm))  # metrics

    async def _consume(self) -> None:
        """The pipeline's events for this reply, until its end (or a reported failure)."""
        c, ev = self.conn, self.conn.ev
        async for e in c.client.respond(c.sid, self.options):
            self.last_event_t = time.monotonic()
            if isinstance(e, TextDelta):
                self.text.append(e.text)
                if self.stopped is None:
                    kind = "response.output_audio_transcript.delta" if self.audio else "response.output_text.delta"
                    await c.send(ev.event(kind, **self.ids, delta=e.text))
                    c.server.metrics.text_out(self)  # metrics
            elif isinstance(e, ArgumentsDelta):
                if self.stopped is None:
                    await self._arguments(e)
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
        elif self.stopped == "server_shutdown":  # metrics: cut by the drain (omnistream.apps.drain)
            status, details = "incomplete", {"type": "incomplete", "reason": "server_shutdown"}
        elif self.stopped is not None:
            status, details = "cancelled", {"type": "cancelled", "reason": self.stopped}
        elif done is not None and done.reply_tokens >= self.max_tokens:
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            status, details = "completed", None
        item = ev.assistant_item(self.item_id, "completed" if status == "completed" else "incomplete", self.audio,
                                 text)
        if self.started and not self.forced:
            ids = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
            if self.audio:
                await c.send(ev.event("response.output_audio.done", **ids))
                await c.send(ev.event("response.output_audio_transcript.done", **ids, transcript=text))
            else:
                await c.send(ev.event("response.output_text.done", **ids, text=text))
            await c.send(ev.event("response.content_part.done", **ids, part=ev.part(self.audio, text)))
            await c.send(ev.event("response.output_item.done", response_id=self.id, output_index=0, item=item))
            self.outputs.append(item)
            if not self.out_of_band:
                c.items.update(item)
        calls = done.tool_calls if self.started and done is not None and failure is None and self.stopped is None \
            else []
        for i, call in enumerate(calls):
            await self._send_call(call, self.streamed if i == 0 else None)
        if self.streamed is not None and not calls:  # the call being written was cut short (limit, cancel)
            await self._send_call(None, self.streamed)
        usage = _usage(done.usage if done is not None else {})
        stats = {"audio_samples": self.sent, **(done.stats if done is not None else {})}
        r = self._object(status, details, usage)
        if self.metadata is None:  # the client's metadata is echoed; else the server's timings, for clients that care
            r["metadata"] = {k: str(v) for k, v in stats.items()}
        c.server.metrics.reply_done(self, status, done)  # metrics
        await c.flush_transcripts()  # the turn's input transcription comes before its reply's end
        c.response_finished(self)  # before response.done leaves: the client may send response.create at once
        await c.send(ev.event("response.done", response=r))

    async def _open_call(self, name: str) -> dict:
        """A ``function_call`` output item begins (``response.output_item.added``)."""
        c, ev = self.conn, self.conn.ev
        item_id, call_id = new_id("item"), new_id("call")
        index, self.n_items = self.n_items, self.n_items + 1
        item = ev.call_item(item_id, "in_progress", call_id, name, "")
        await c.send(ev.event("response.output_item.added", response_id=self.id, output_index=index, item=item))
        await self._created(item)
        return {"ids": {"response_id": self.id, "item_id": item_id, "output_index": index}, "call_id": call_id,
                "name": name, "text": ""}

    async def _arguments(self, e: ArgumentsDelta) -> None:
        """The arguments of the call being written, as they decode (``function_call_arguments.delta``)."""
        if self.streamed is None:
            self.streamed = await self._open_call(e.name)
        st = self.streamed
        st["text"] += e.text
        await self.conn.send(self.conn.ev.event("response.function_call_arguments.delta", **st["ids"],
                                                call_id=st["call_id"], delta=e.text))

    async def _send_call(self, call, st: dict | None) -> None:
        """Close a ``function_call`` item (``st``: the one that streamed; else it is opened here and its
        arguments sent as one delta). ``call`` None: the call was cut short, the item is incomplete.
        The ``call_id`` is what the client's ``function_call_output`` answers."""
        c, ev = self.conn, self.conn.ev
        if st is not None and call is not None and (call.name, call.arguments) != (st["name"], st["text"]):
            await self._send_call(None, st)  # (not what was parsed in the end: closed as incomplete)
            st = None
        if st is None:
            st = await self._open_call(call.name)
            st["text"] = call.arguments
            await c.send(ev.event("response.function_call_arguments.delta", **st["ids"], call_id=st["call_id"],
                                  delta=call.arguments))
        status = "completed" if call is not None else "incomplete"
        if call is not None:
            await c.send(ev.event("response.function_call_arguments.done", **st["ids"], call_id=st["call_id"],
                                  name=call.name, arguments=call.arguments))
            if not self.out_of_band:  # (a call out of band is not in the conversation: it has no output to take)
                c.calls[st["call_id"]] = st["ids"]["item_id"]
        item = ev.call_item(st["ids"]["item_id"], status, st["call_id"], st["name"], st["text"])
        await c.send(ev.event("response.output_item.done", response_id=self.id, output_index=st["ids"]["output_index"],
                              item=item))
        self.outputs.append(item)
        if not self.out_of_band:
            c.items.update(item)

    async def _created(self, item: dict) -> None:
        """An output item joins the conversation (``conversation.item.created``), unless out of band;
        every output item of a reply is part of the reply's one pipeline item."""
        if not self.out_of_band:
            prev = self.conn.items.add(item, self.item_id)
            await self.conn.send(self.conn.ev.event("conversation.item.created", previous_item_id=prev, item=item))

    def _object(self, status: str, details: dict | None = None, usage: dict | None = None) -> dict:
        """The ``response`` object: ``conversation_id`` null out of band, the client's ``metadata`` echoed."""
        r = self.conn.ev.response(self.id, status, self.audio, self.voice, self.outputs, details, usage,
                                  self.max_tokens, conversation=not self.out_of_band)
        if self.metadata is not None:
            r["metadata"] = dict(self.metadata)
        return r


def _usage(u: dict) -> dict:
    """The pipeline's token counts as the protocol's ``usage`` (speech is not counted in tokens: the
    Talker's codes are not the model's output tokens)."""
    n_in, n_out = int(u.get("input_tokens", 0)), int(u.get("output_tokens", 0))
    audio, image = int(u.get("audio_tokens", 0)), int(u.get("image_tokens", 0))
    return {"total_tokens": n_in + n_out, "input_tokens": n_in, "output_tokens": n_out,
            "input_token_details": {"text_tokens": n_in - audio - image, "audio_tokens": audio, "image_tokens": image,
                                    "cached_tokens": 0},
            "output_token_details": {"text_tokens": n_out, "audio_tokens": 0}}
