"""The four pipeline workers -- encoders, thinker, talker, token2wav -- as message handlers.

A worker never knows whether its neighbour runs in the same process (the message is handed over in
memory: the stage hosting several workers, or the in-process client hosting all four) or in another
one (it travels over ZeroMQ). The rules of the conversation live in the engine core
(:class:`omnistream.engine.conversation.Conversation`); the workers only move its inputs and outputs:

* ``encoders``: user PCM and camera frames -> audio blocks / video patches (``Embeds``), per turn
  (the rules of when a turn opens live here, once);
* ``thinker``: the conversation; prefill, greedy/sampled (or grammar-constrained: a forced function call)
  decode -> ``TextDelta`` to the client (reply text, or a function call's arguments),
  ``Step`` (token, embedding, hidden state) and ``PromptRows`` (the Talker's prompt) to the talker;
* ``talker``: ``feed_prompt`` / ``push`` / ``finish`` -> codec ``Codes``;
* ``token2wav``: codes -> 24 kHz PCM ``AudioChunk`` to the client, then ``Done``.

Session ops (open, commit, respond, ...) travel the chain encoders -> thinker -> talker ->
token2wav in order; every worker acts on the ones it cares about and forwards them.
Long work (decoding a reply, the Talker's tail after the text ended) runs as a per-session task
(a generator) that the worker's :class:`~omnistream.engine.scheduler.Scheduler` advances one model
call per tick, batched across sessions, so the stage's loop answers pings and sees barge-in
epochs between steps (:mod:`omnistream.runtime.session`).

Prefill is budgeted: at most ``prefill_tokens`` tokens of user media / text are prefilled per tick
(the rest waits in order for the next tick), so a session streaming a long video does not stall
the replies of the others (chunked prefill between decode steps, as vLLM schedules it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator

import numpy as np
import torch

from omnistream.engine.conversation import SAMPLE_RATE, SYSTEM_PROMPT, Conversation, SpeechRates, parse_window
from omnistream.engine.scheduler import Need, Scheduler
from omnistream.memory.batch import cache_bytes
from omnistream.runtime import wire
from omnistream.runtime.layout import PIPELINE
from omnistream.runtime.session import Slot, options_from_wire

log = logging.getLogger(__name__)

Send = Callable[..., None]  # send(dest worker name or "client", msg, *tensors)
_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                 torch.int16: "int16", torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8",
                 torch.bool: "bool"}


def ref(x, frame: int) -> wire.TensorRef:
    """TensorRef of a tensor on any device (the stage moves it to CPU only when it leaves the process)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in _TORCH_DTYPES:
            raise wire.WireError(f"unsupported tensor dtype {x.dtype}")
        return wire.TensorRef(dtype=_TORCH_DTYPES[x.dtype], shape=list(x.shape), frame=frame)
    return wire.TensorRef.of(x, frame)


def error_code(e: BaseException) -> str:
    """The client's stable codes for pipeline exceptions."""
    from omnistream.runtime.client import _error_code

    return _error_code(e) if isinstance(e, Exception) else "server_error"


class Worker:
    """Dispatch, per-session slots, the prefill budget and the batching scheduler shared by the workers."""

    name = ""
    handles: tuple[type, ...] = ()  # message types acted on here
    forwards: tuple[type, ...] = (wire.OpenSession, wire.CloseSession)  # passed on after handling
    batchers: dict = {}  # Need kind -> batched call (see omnistream.engine.scheduler)
    prefill_tokens = 0  # per-tick budget of prefill tokens (0: unbudgeted)

    def __init__(self, ck, send: Send, device: str = "cpu", *, max_batch: int = 64):
        self.ck, self.send, self.device = ck, send, device
        i = PIPELINE.index(self.name)
        self.next = PIPELINE[i + 1] if i + 1 < len(PIPELINE) else None
        self.slots: dict[str, Slot] = {}
        self.scheduler = Scheduler(self.batchers, max_batch=max_batch)
        self._budget = self.prefill_tokens

    # ------------------------------------------------------------------ entry points
    def deliver(self, msg, tensors) -> None:
        """One message for this worker (from the wire or from a co-located worker)."""
        if isinstance(msg, wire.Epoch):
            if (s := self.slots.get(msg.session)) is not None:
                s.see(msg.epoch)
                self.on_epoch(s)
            return
        if isinstance(msg, wire.CloseSession):
            s = self.slots.pop(msg.session, None)
            if s is not None:
                if s.run is not None and s.run.gen is not None:
                    s.run.gen.close()  # the task's cleanup runs (its end-of-reply messages)
                self.close(s)
            return self._forward(msg, tensors)
        s = self.slots.get(msg.session)
        if isinstance(msg, wire.OpenSession) and (s is None or not s.busy):
            return self._open(msg)
        if s is None:  # e.g. work queued for a stage that was restarted meanwhile
            log.debug("%s: dropping %s for unknown session %s", self.name, type(msg).__name__, msg.session)
            if getattr(msg, "req", 0):
                self.send("client", wire.Result(session=msg.session, req=msg.req, error="unknown session"))
            return
        if hasattr(msg, "epoch"):
            s.see(msg.epoch)
            self.on_epoch(s)
        cost = self.cost(msg, tensors)
        if s.busy or (cost and self._budget <= 0):  # in order behind the task / the next tick's budget
            s.backlog.append((msg, tensors))
        else:
            self._budget -= cost
            self._dispatch(s, msg, tensors)

    def tick(self) -> bool:
        """Advance every session's task by one model call (batched); True if work remains."""
        self._budget = self.prefill_tokens
        more = self.scheduler.tick(((s, s.run) for s in list(self.slots.values()) if s.run is not None),
                                   self._ended, self.priority)
        for s in list(self.slots.values()):
            while s.run is None and s.backlog and (self._budget > 0 or not self.prefill_tokens):
                msg, tensors = s.backlog.popleft()
                if isinstance(msg, wire.OpenSession):
                    self._open(msg)
                    s = self.slots.get(msg.session, s)
                    continue
                self._budget -= self.cost(msg, tensors)
                self._dispatch(s, msg, tensors)
            more = more or s.busy
        return more

    def _ended(self, s: Slot, error: BaseException | None) -> None:
        s.run = None
        if error is not None:
            log.error("%s: task of session %s failed: %s", self.name, s.sid, error, exc_info=error)
            self.send("client", wire.ReplyError(session=s.sid, epoch=s.task_epoch, code=error_code(error),
                                                message=f"{self.name}: {error}"))

    # ------------------------------------------------------------------ plumbing
    def _open(self, msg: wire.OpenSession) -> None:
        """Create / update / rebuild the session. The op is forwarded *before* the state is built,
        because building may already send to the next worker (the system prompt's prompt rows)."""
        s = self.slots.get(msg.session)
        try:
            options = options_from_wire(msg.options)
            self.check(options)
        except Exception as e:  # noqa: BLE001 -- bad options / unknown voice: tell the client
            log.info("%s: cannot open session %s: %s", self.name, msg.session, e)
            if msg.req:  # not forwarded: every worker checks the same, so none changes anything
                self.send("client", wire.Result(session=msg.session, req=msg.req, error=str(e)))
            return
        rebuild = s is None or msg.fresh or self.rebuilds(s, options)
        if rebuild and s is not None and not msg.fresh and self.defer_rebuild(s):
            s.pending_open = msg  # applied when the next user turn begins (see ThinkerWorker)
            if msg.req:
                self.send("client", wire.Result(session=msg.session, req=msg.req))
            return
        if rebuild and not msg.fresh and s is not None:
            msg = wire.OpenSession(session=msg.session, epoch=msg.epoch, options=msg.options, req=msg.req, fresh=True)
        if self.next is not None:
            self.send(self.next, msg)
        elif msg.req:
            self.send("client", wire.Result(session=msg.session, req=msg.req))
        if not rebuild:
            s.options = options
            s.see(msg.epoch)
            self.update(s)
            return
        if s is not None:
            self.close(s)
            self.slots.pop(msg.session, None)
        try:
            new = self.slots[msg.session] = Slot(msg.session, options, self.build(options, msg.session),
                                                 epoch=max(msg.epoch, s.epoch if s is not None else 0))
            if s is not None:
                new.backlog = s.backlog  # ops queued behind the old state keep their order
        except Exception as e:
            log.exception("%s: building session %s failed", self.name, msg.session)
            self.send("client", wire.Error(session=msg.session, code="server_error", message=f"{self.name}: {e}"))

    def _forward(self, msg, tensors=()) -> None:
        if self.next is not None:
            self.send(self.next, msg, *tensors)

    def _dispatch(self, s: Slot, msg, tensors) -> None:
        if msg.reply_work and s.stale(msg.epoch):
            return  # work of an interrupted reply, also when it waited in the backlog (wire._Msg.reply_work)
        try:
            if isinstance(msg, self.handles):
                self.handle(s, msg, tensors)
            if not isinstance(msg, self.handles) or isinstance(msg, self.forwards):
                self._forward(msg, tensors)
        except Exception as e:  # noqa: BLE001 -- bad input: an error event, the session goes on
            log.info("%s: %s for session %s failed: %s", self.name, type(msg).__name__, s.sid, e)
            if getattr(msg, "req", 0):
                self.send("client", wire.Result(session=s.sid, req=msg.req, error=f"{type(e).__name__}: {e}"))
            else:
                self.send("client", wire.Error(session=s.sid, code=error_code(e), message=str(e)))

    def replying(self) -> int:
        """Sessions with a reply in progress here (what the load meter divides busy time by)."""
        return sum(s.run is not None for s in self.slots.values())

    def status(self) -> dict:
        """Batch sizes and call times of this worker's scheduler (``/status``)."""
        return {"sessions": len(self.slots), "running": sum(s.run is not None for s in self.slots.values()),
                "backlog": sum(len(s.backlog) for s in self.slots.values()), **self.scheduler.status()}

    # ------------------------------------------------------------------ per worker
    def check(self, options) -> None:
        """Raise ValueError if ``options`` cannot be served (the first worker of the chain rejects them
        before any worker rebuilds anything)."""
        _check_voice(self.ck, options.voice)
        parse_window(options.window, video=True)

    def rebuilds(self, s: Slot, options) -> bool:
        """Does changing ``s.options`` to ``options`` need a fresh session state? (Only the thinker
        decides: it forwards ``fresh`` to the workers after it.)"""
        return False

    def defer_rebuild(self, s: Slot) -> bool:
        return False

    def update(self, s: Slot) -> None:
        """Options changed without a rebuild (limits, temperature): apply what the state keeps."""

    def cost(self, msg, tensors) -> int:
        """Prefill tokens ``msg`` costs (counted against the per-tick budget)."""
        return 0

    def priority(self, s: Slot) -> float:
        """Lower runs first when a batch is full (e.g. the seconds of audio queued ahead of playback)."""
        return 0.0

    def build(self, options, sid: str):
        return None

    def close(self, s: Slot) -> None:
        pass

    def on_epoch(self, s: Slot) -> None:
        """The session's epoch may have grown: stop stale work at once."""

    def handle(self, s: Slot, msg, tensors) -> None:
        raise NotImplementedError


# ====================================================================== encoders
class _Turn:
    """The open user turn's streaming encoders and what it received."""

    def __init__(self):
        self.n_frames = 0  # camera frames taken into the turn
        self.open = False
        self.video = False
        self.t0: float | None = None
        self.audio = None  # AudioStream
        self.frames = None  # VideoStream


class EncodersWorker(Worker):
    name = "encoders"
    handles = (wire.AudioChunk, wire.Frame, wire.Commit, wire.Clear, wire.Respond)
    forwards = Worker.forwards + (wire.Commit, wire.Clear, wire.Respond)

    def build(self, options, sid):
        return _Turn()

    def handle(self, s, msg, tensors):
        t: _Turn = s.state
        if isinstance(msg, wire.AudioChunk):
            if not t.open:  # validate first: bad audio must not open a turn it cannot fill
                from omnistream.encoders.audio import PcmConverter

                PcmConverter()(tensors[0], msg.sample_rate)
            self._open_turn(s)
            self._blocks(s, t.audio.push(tensors[0], msg.sample_rate))
        elif isinstance(msg, wire.Frame):
            from omnistream.encoders.vision import check_frame

            check_frame(tensors[0])  # a bad frame must not turn the next turn into a video turn
            if not t.open:  # a turn that starts with the camera on carries its audio in the video
                t.video = True
            if not t.video:
                return  # the camera came on mid-turn: its frames join the next turn
            self._open_turn(s)
            if t.t0 is None:
                t.t0 = msg.t_s
            t.n_frames += 1
            self._patches(s, t.frames.push_frame(tensors[0], msg.t_s - t.t0))
        elif isinstance(msg, wire.Commit):
            self._flush(s)
        elif isinstance(msg, wire.Clear):
            s.state = _Turn()
        elif isinstance(msg, wire.Respond) and t.open:  # respond() commits an open turn first
            self._flush(s)
            self.send(self.next, wire.Commit(session=s.sid, epoch=msg.epoch))

    def _open_turn(self, s: Slot) -> None:
        from omnistream.encoders.audio import AudioStream
        from omnistream.encoders.vision import VideoStream

        t: _Turn = s.state
        if t.open:
            return
        self.send(self.next, wire.BeginTurn(session=s.sid, epoch=s.epoch, video=t.video))
        t.audio = AudioStream.from_checkpoint(self.ck)
        t.frames = VideoStream.from_checkpoint(self.ck, fps=s.options.fps) if t.video else None
        t.open = True

    def _flush(self, s: Slot) -> None:
        """End of the user turn: what the encoders still hold (video first, as OmniChat.end_turn)."""
        t: _Turn = s.state
        if t.open:
            if t.frames is not None:
                self._patches(s, t.frames.finish())
            self._blocks(s, t.audio.finish())
        s.state = _Turn()
        s.last_turn_frames = t.n_frames  # (tests and /status read it)

    def _blocks(self, s: Slot, blocks) -> None:
        for b in blocks:  # b.embeds: (n, D)
            self.send(self.next, wire.Embeds(session=s.sid, epoch=s.epoch, kind="audio", embeds=ref(b.embeds, 1)),
                      b.embeds)

    def _patches(self, s: Slot, patches) -> None:
        for p in patches:  # p.embeds: (h*w/4, D)
            self.send(self.next, wire.Embeds(session=s.sid, epoch=s.epoch, kind="video", embeds=ref(p.embeds, 1),
                                             grid=[int(g) for g in p.grid_thw]), p.embeds)


# ====================================================================== thinker
class _WireFeed:
    """The staged :class:`~omnistream.engine.conversation.TalkerFeed`: prompt rows as messages."""

    def __init__(self, send: Send, sid: str):
        self.send, self.sid = send, sid

    def prompt_rows(self, embeds, hidden, positions, next_position) -> None:
        pos = positions.contiguous()  # (3, n)
        self.send("talker", wire.PromptRows(session=self.sid, embeds=ref(embeds, 1), hidden=ref(hidden, 2),
                                            positions=ref(pos, 3), next_position=next_position), embeds, hidden, pos)

    def truncate_prompt(self, n_tokens: int) -> None:
        self.send("talker", wire.TruncatePrompt(session=self.sid, n_tokens=n_tokens))


def decode_rows(rows: list[tuple]) -> list[None]:
    """The Thinker's batched decode step: ``rows`` are ``(StreamingThinker, token)``; each thinker
    gets its token appended (one forward for all of them)."""
    from omnistream.model.thinker import step_tokens

    step_tokens([th for th, _ in rows], [tok for _, tok in rows])  # grouped by model and cache kind inside
    return [None] * len(rows)


class ThinkerWorker(Worker):
    name = "thinker"
    handles = (wire.BeginTurn, wire.Embeds, wire.Commit, wire.Clear, wire.Respond, wire.Truncate)
    forwards = Worker.forwards
    batchers = {"thinker.decode": decode_rows}
    prefill_tokens = 512  # ~ two 2-s audio+video chunks per tick
    REBUILD_KEYS = ("voice", "system_prompt", "window", "fps")  # baked into the conversation

    def build(self, options, sid):
        feed = _WireFeed(self.send, sid) if options.voice is not None else None
        return Conversation(self.ck, system_prompt=options.system_prompt or SYSTEM_PROMPT, fps=options.fps,
                            window=parse_window(options.window, video=True), feed=feed)

    def rebuilds(self, s, options):
        return any(getattr(s.options, k) != getattr(options, k) for k in self.REBUILD_KEYS)

    def status(self) -> dict:
        """Plus ``kv_bytes``: the Thinker caches the sessions hold (``/metrics``' omnistream_kv_bytes). In
        process this is read from the event loop while the engine thread works: a cache being replaced
        is counted as it was, or skipped."""
        kv = 0
        for slot in list(self.slots.values()):
            try:
                kv += cache_bytes(slot.state.thinker.cache)
            except (AttributeError, RuntimeError):
                continue
        return {**super().status(), "kv_bytes": kv}

    def defer_rebuild(self, s):
        """A new voice / prompt / cache applies from the next user turn: never inside an open one."""
        return s.state.turn_open

    def cost(self, msg, tensors):
        return int(tensors[0].shape[0]) if isinstance(msg, wire.Embeds) else 0

    def handle(self, s, msg, tensors):
        c: Conversation = s.state
        if isinstance(msg, (wire.BeginTurn, wire.Commit)) and not c.turn_open and s.pending_open is not None:
            pending, s.pending_open = s.pending_open, None  # the deferred new settings start this turn
            self._open(wire.OpenSession(session=s.sid, epoch=s.epoch, options=pending.options, fresh=True))
            s = self.slots[s.sid]
            c = s.state
        if isinstance(msg, wire.BeginTurn):
            c.begin_turn(audio=True, video=msg.video)
        elif isinstance(msg, wire.Embeds):
            if msg.kind == "audio":
                c.append_audio(tensors[0])
            else:
                c.append_video(tensors[0], msg.grid)
        elif isinstance(msg, wire.Commit):
            c.end_turn(msg.text)
            self._ack(s, msg.req)
        elif isinstance(msg, wire.Clear):
            c.abort_turn()
            self._ack(s, msg.req)
        elif isinstance(msg, wire.Truncate):
            self._ack(s, msg.req, c.truncate_to_played(msg.played_samples))
        elif isinstance(msg, wire.Respond):
            o = s.options
            try:
                r = c.begin_reply(msg.max_new_tokens or o.max_new_tokens, o.temperature, o.seed,
                                  instructions=msg.instructions, tools=msg.tools, tool_choice=msg.tool_choice)
            except Exception as e:  # noqa: BLE001 -- e.g. a tool_choice naming no tool: this reply fails, not the session
                self.send("client", wire.ReplyError(session=s.sid, epoch=msg.epoch, code=error_code(e),
                                                    message=f"{self.name}: {e}"))
                return
            speak = c.feed is not None and msg.audio and not r.forced  # a forced call is never spoken
            if speak:
                self.send("talker", msg)
            s.start(self._reply(s, c, r, msg.epoch, speak), msg.epoch)

    def _reply(self, s: Slot, c: Conversation, r, epoch: int, speak: bool) -> Generator:
        """The text side of a reply, one token per scheduler tick (batched with the other sessions).
        ``speak``: its steps go to the Talker (until a tool call begins: a call is not spoken)."""
        end_of_input_s, cancelled, seq = c.stats.end_of_input_s, False, 0
        try:
            while not r.done:
                tok = r.next_token()
                yield Need("thinker.decode", (c.thinker, tok))
                step, text = r.accept(tok)
                if text:
                    seq += 1
                    self.send("client", wire.TextDelta(session=s.sid, epoch=epoch, seq=seq, text=text))
                if args := r.take_arguments():
                    seq += 1
                    self.send("client", wire.TextDelta(session=s.sid, epoch=epoch, seq=seq, text=args[1], call=args[0]))
                if speak and not r.calling:
                    self.send("talker", wire.Step(session=s.sid, epoch=epoch, token=step.token,
                                                  embed=ref(step.embed, 1), hidden=ref(step.hidden, 2)),
                              step.embed, step.hidden)
                yield  # the next tick resumes here, after the epochs that arrived meanwhile
                if s.stale(epoch):
                    cancelled = True
                    break
            if text := r.flush():
                seq += 1
                self.send("client", wire.TextDelta(session=s.sid, epoch=epoch, seq=seq, text=text))
            if args := r.take_arguments():
                seq += 1
                self.send("client", wire.TextDelta(session=s.sid, epoch=epoch, seq=seq, text=args[1], call=args[0]))
        finally:
            if speak:
                self.send("talker", wire.EndReply(session=s.sid, epoch=epoch, cancelled=cancelled))
            c.end_reply(cancelled)
        text, calls = r.result()
        self.send("client", wire.Done(session=s.sid, epoch=epoch, part="text", cancelled=cancelled, text=text,
                                      reply_tokens=len(r.ids), speech=speak, stats={"end_of_input_s": end_of_input_s},
                                      usage=r.usage(), tool_calls=[{"name": k.name, "arguments": k.arguments}
                                                                   for k in calls]))

    def _ack(self, s: Slot, req: int, value: int = 0) -> None:
        if req:
            self.send("client", wire.Result(session=s.sid, req=req, value=value))


# ====================================================================== talker
def talker_steps(talkers: list) -> list:
    """The Talker's batched decode step: every given ``StreamingTalker`` emits its next code (None at eos)."""
    from omnistream.model.talker import step_talkers

    return step_talkers(talkers)


class TalkerWorker(Worker):
    name = "talker"
    handles = (wire.PromptRows, wire.TruncatePrompt, wire.Respond, wire.Step, wire.EndReply)
    forwards = Worker.forwards + (wire.Respond,)
    batchers = {"talker.step": talker_steps}

    def build(self, options, sid):
        from omnistream.model.talker import StreamingTalker, TalkerConfig

        if options.voice is None:
            return None
        cfg = TalkerConfig(max_new_tokens=self._codes(options), seed=options.seed)
        return StreamingTalker.from_checkpoint(self.ck, options.voice, cfg)

    def _codes(self, options) -> int:
        return max(1, int(options.max_speech_s * SpeechRates.from_checkpoint(self.ck).codes_per_second))

    def update(self, s):
        if s.state is not None:
            s.state.config.max_new_tokens = self._codes(s.options)  # read when the next reply starts
            s.state.config.seed = s.options.seed

    def on_epoch(self, s):
        if s.state is not None and s.state.started and s.stale(s.task_epoch):  # task_epoch: the reply's epoch
            s.state.cancel()

    def replying(self):
        return sum(s.state is not None and s.state.started for s in self.slots.values())

    def priority(self, s):
        """Seconds of speech coded ahead of real time since the reply's first code (lower: more urgent)."""
        t0 = getattr(s, "t_first_code", None)
        if t0 is None or s.state is None:
            return 0.0
        rates = SpeechRates.from_checkpoint(self.ck)
        return len(s.state.codes) / rates.codes_per_second - (time.perf_counter() - t0)

    def handle(self, s, msg, tensors):
        talker = s.state
        if talker is None:
            raise RuntimeError("this session has no voice: the talker has nothing to do")
        if isinstance(msg, wire.PromptRows):
            talker.feed_prompt(tensors[0], tensors[1], tensors[2], msg.next_position)
        elif isinstance(msg, wire.TruncatePrompt):
            talker.truncate_prompt(msg.n_tokens)
        elif isinstance(msg, wire.Respond):
            s.task_epoch, s.t_first_code = msg.epoch, None
        elif isinstance(msg, wire.Step):
            from omnistream.model.thinker import ThinkerStep

            self._send_codes(s, msg.epoch, talker.feed(ThinkerStep(msg.token, tensors[0], tensors[1])))
            if talker.ready():
                s.start(self._decode(s, msg.epoch, last=False), msg.epoch)
        elif isinstance(msg, wire.EndReply):
            if msg.cancelled or s.stale(msg.epoch):
                talker.cancel()
            talker.close_text()
            s.start(self._decode(s, msg.epoch, last=True), msg.epoch)

    def _send_codes(self, s: Slot, epoch: int, codes: list[int]) -> None:
        if codes:
            s.t_first_code = getattr(s, "t_first_code", None) or time.perf_counter()
            self.send("token2wav", wire.Codes(session=s.sid, epoch=epoch, codes=codes))

    def _decode(self, s: Slot, epoch: int, last: bool) -> Generator:
        """The codec steps that can run now, one per tick (batched with the other sessions'); after
        the text ended (``last``) the tail until codec eos, then the turn is closed."""
        talker = s.state
        try:
            while talker.ready():
                code = yield Need("talker.step", talker)
                if code is not None:
                    self._send_codes(s, epoch, [code])
                yield  # the next tick resumes here, after the epochs that arrived meanwhile
                if s.stale(epoch):
                    talker.cancel()
        finally:
            if last:
                cancelled = talker.stop_reason == "cancelled" or s.stale(epoch)
                talker.end_turn()
                self.send("token2wav", wire.EndReply(session=s.sid, epoch=epoch, cancelled=cancelled))


# ====================================================================== token2wav
def run_t2w_jobs(jobs: list) -> list:
    """Token2Wav's batched call: DiT windows / BigVGAN spans of all sessions, equal shapes stacked."""
    from omnistream.model.token2wav import run_jobs

    return run_jobs(jobs)


class _Voice:
    """One session's speech output at the token2wav worker: the reply's stream and its playout clock."""

    def __init__(self):
        self.t2w = None  # StreamingToken2Wav of the reply being spoken
        self.epoch = -1
        self.seq = 0
        self.samples = 0
        self.t_first: float | None = None  # when its first PCM left
        self.ended = False  # EndReply arrived: the tail is due, then Done

    def lead_s(self) -> float:
        """Seconds of audio sent ahead of real-time playback (negative: the listener ran dry)."""
        if self.t_first is None:
            return 0.0
        return self.samples / SAMPLE_RATE - (time.perf_counter() - self.t_first)


class Token2WavWorker(Worker):
    name = "token2wav"
    handles = (wire.Respond, wire.Codes, wire.EndReply)
    forwards = ()
    batchers = {"token2wav.job": run_t2w_jobs}

    def build(self, options, sid):
        return _Voice()

    def on_epoch(self, s):
        v: _Voice = s.state
        if v.t2w is not None and s.stale(v.epoch):
            v.t2w.cancel()

    def replying(self):
        return sum(s.state.t2w is not None for s in self.slots.values())

    def priority(self, s):
        return s.state.lead_s()  # the session closest to running dry goes first

    def handle(self, s, msg, tensors):
        v: _Voice = s.state
        if isinstance(msg, wire.Respond):
            from omnistream.model.token2wav import StreamingToken2Wav

            spk = self.ck.voices[s.options.voice]
            v.t2w = StreamingToken2Wav.from_config(self.ck.token2wav, spk["cond"], spk["ref_mel"], seed=s.options.seed)
            v.epoch, v.seq, v.samples, v.t_first, v.ended = msg.epoch, 0, 0, None, False
            return
        if v.t2w is None or msg.epoch != v.epoch:
            if isinstance(msg, wire.EndReply):  # a reply this worker never started (e.g. restarted meanwhile)
                self.send("client", wire.Done(session=s.sid, epoch=msg.epoch, part="audio", cancelled=True))
            return
        if isinstance(msg, wire.Codes):
            v.t2w.feed(msg.codes)
        else:  # EndReply
            v.ended = True
            if msg.cancelled or s.stale(msg.epoch):
                v.t2w.cancel()
            v.t2w.close_input()
        s.start(self._speak(s, v), v.epoch)

    def _speak(self, s: Slot, v: _Voice) -> Generator:
        """Run the stream's ready jobs (batched with the other sessions'), one per tick; after the
        reply's end, its tail and then ``Done``."""
        t2w = v.t2w
        while jobs := t2w.pending():
            result = yield Need("token2wav.job", jobs[0])
            for pcm in t2w.accept(jobs[0], result):  # (n,) float32 24 kHz
                pcm = np.ascontiguousarray(pcm, dtype=np.float32)
                v.seq += 1
                v.samples += pcm.shape[0]
                v.t_first = v.t_first or time.perf_counter()
                self.send("client", wire.AudioChunk(session=s.sid, epoch=v.epoch, seq=v.seq, sample_rate=SAMPLE_RATE,
                                                    pcm=wire.TensorRef.of(pcm)), pcm)
        if v.ended:
            self.send("client", wire.Done(session=s.sid, epoch=v.epoch, part="audio",
                                          cancelled=t2w.cancelled or s.stale(v.epoch)))
            v.t2w = None


def _check_voice(ck, voice) -> None:
    if voice is not None and voice not in ck.voices:
        raise ValueError(f"unknown voice {voice!r}; this checkpoint has {sorted(ck.voices)}")


WORKER_TYPES = {w.name: w for w in (EncodersWorker, ThinkerWorker, TalkerWorker, Token2WavWorker)}
