"""The four pipeline workers -- encoders, thinker, talker, token2wav -- as message handlers.

A stage process hosts one or more workers (see :mod:`omnistream.runtime.layout`); a worker never
knows whether its neighbour runs in the same process (the message is handed over in memory) or
in another one (it travels over ZeroMQ). Each worker does what :class:`omnistream.chat.OmniChat`
does for its part of the model, with the same calls in the same order, so a conversation gives
the same reply text in process and across processes:

* ``encoders``: user PCM and camera frames -> audio blocks / video patches (``Embeds``), per turn;
* ``thinker``: the conversation's KV cache; prefill, greedy/sampled decode -> ``TextDelta`` to the
  client, ``Step`` (token, embedding, hidden state) and ``PromptRows`` (what ``StreamingTalker.sync``
  would read) to the talker;
* ``talker``: ``feed_prompt`` / ``push`` / ``finish`` -> codec ``Codes``;
* ``token2wav``: codes -> 24 kHz PCM ``AudioChunk`` to the client, then ``Done``.

Session ops (open, commit, respond, ...) travel the chain encoders -> thinker -> talker ->
token2wav in order; every worker acts on the ones it cares about and forwards them.
Long work (decoding a reply, the Talker's tail after the text ended) runs as a per-session task
advanced one token per tick, so the stage's main loop answers pings and sees barge-in epochs
between tokens (:mod:`omnistream.runtime.session`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from omnistream.runtime import wire
from omnistream.runtime.layout import PIPELINE
from omnistream.runtime.session import Slot, needs_rebuild, options_from_wire

log = logging.getLogger(__name__)

Send = Callable[..., None]  # send(dest worker name or "client", msg, *tensors)
_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                 torch.int16: "int16", torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8",
                 torch.bool: "bool"}
SAMPLES_PER_CODE = 480  # one codec token = 2 mel frames of 240 samples at 24 kHz


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
    """Dispatch, per-session slots and task stepping shared by the four workers."""

    name = ""
    handles: tuple[type, ...] = ()  # message types acted on here
    forwards: tuple[type, ...] = (wire.OpenSession, wire.CloseSession)  # passed on after handling

    def __init__(self, ck, send: Send, device: str = "cpu"):
        self.ck, self.send, self.device = ck, send, device
        i = PIPELINE.index(self.name)
        self.next = PIPELINE[i + 1] if i + 1 < len(PIPELINE) else None
        self.slots: dict[str, Slot] = {}

    # ------------------------------------------------------------------ entry points
    def deliver(self, msg, tensors) -> None:
        """One message for this worker (from the wire or from a co-located worker)."""
        if isinstance(msg, wire.Epoch):
            if (s := self.slots.get(msg.session)) is not None:
                s.see(msg.epoch)
                self.on_epoch(s)
            return
        if isinstance(msg, wire.OpenSession):
            return self._open(msg)
        if isinstance(msg, wire.CloseSession):
            s = self.slots.pop(msg.session, None)
            if s is not None:
                self.close(s)
            return self._forward(msg, tensors)
        s = self.slots.get(msg.session)
        if s is None:  # e.g. work queued for a stage that was restarted meanwhile
            log.debug("%s: dropping %s for unknown session %s", self.name, type(msg).__name__, msg.session)
            if getattr(msg, "req", 0):
                self.send("client", wire.Result(session=msg.session, req=msg.req, error="unknown session"))
            return
        if hasattr(msg, "epoch"):
            s.see(msg.epoch)
            self.on_epoch(s)
        if s.busy:
            s.backlog.append((msg, tensors))
        else:
            self._dispatch(s, msg, tensors)

    def tick(self) -> bool:
        """Advance every session's task by one step; True if work remains."""
        more = False
        for s in list(self.slots.values()):
            if s.task is not None:
                try:
                    s.step()
                except Exception as e:  # one session's failure stays its own
                    log.exception("%s: task of session %s failed", self.name, s.sid)
                    self.send("client", wire.ReplyError(session=s.sid, epoch=s.task_epoch, code=error_code(e),
                                                        message=f"{self.name}: {e}"))
            while s.task is None and s.backlog:
                self._dispatch(s, *s.backlog.popleft())
            more = more or s.task is not None
        return more

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
        if self.next is not None:
            self.send(self.next, msg)
        elif msg.req:
            self.send("client", wire.Result(session=msg.session, req=msg.req))
        if s is not None and not msg.fresh and not needs_rebuild(s.options, options):
            s.options = options
            s.see(msg.epoch)
            return
        if s is not None:
            self.close(s)
            self.slots.pop(msg.session, None)
        try:
            self.slots[msg.session] = Slot(msg.session, options, self.build(options, msg.session), epoch=msg.epoch)
        except Exception as e:
            log.exception("%s: building session %s failed", self.name, msg.session)
            self.send("client", wire.Error(session=msg.session, code="server_error", message=f"{self.name}: {e}"))

    def _forward(self, msg, tensors=()) -> None:
        if self.next is not None:
            self.send(self.next, msg, *tensors)

    def _dispatch(self, s: Slot, msg, tensors) -> None:
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

    # ------------------------------------------------------------------ per worker
    def check(self, options) -> None:
        """Raise ValueError if ``options`` cannot be served (the first worker of the chain rejects them
        before any worker rebuilds anything)."""
        from omnistream.chat import parse_window

        _check_voice(self.ck, options.voice)
        parse_window(options.window, video=True)

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
    """The open user turn's streaming encoders (the in-process client's turn bookkeeping)."""

    def __init__(self):
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

    def _blocks(self, s: Slot, blocks) -> None:
        for b in blocks:  # b.embeds: (n, D)
            self.send(self.next, wire.Embeds(session=s.sid, epoch=s.epoch, kind="audio", embeds=ref(b.embeds, 1)),
                      b.embeds)

    def _patches(self, s: Slot, patches) -> None:
        for p in patches:  # p.embeds: (h*w/4, D)
            self.send(self.next, wire.Embeds(session=s.sid, epoch=s.epoch, kind="video", embeds=ref(p.embeds, 1),
                                             grid=[int(g) for g in p.grid_thw]), p.embeds)


# ====================================================================== thinker
class _Conversation:
    """The Thinker's side of :class:`omnistream.chat.OmniChat`: same appends, same decode; the
    rows a ``StreamingTalker.sync`` would read go to the talker as ``PromptRows`` instead."""

    def __init__(self, ck, options, sid: str, send: Send):
        from omnistream.chat import SYSTEM_PROMPT, parse_window
        from omnistream.talker.thinker import StreamingThinker

        self.ck, self.tok, self.sid, self.send = ck, ck.tokenizer, sid, send
        self.options, self.voice = options, options.voice
        window = parse_window(options.window, video=True)
        record = self.voice is not None
        if window is None:
            self.thinker = StreamingThinker(ck.thinker, tokenizer=ck.tokenizer, record=record)
        else:
            from omnistream.memory.window_cache import window_thinker

            self.thinker = window_thinker(ck.thinker, window, tokenizer=ck.tokenizer, record=record)
        self.stop_ids = {self.tok.convert_tokens_to_ids("<|im_end|>"), self.tok.convert_tokens_to_ids("<|endoftext|>")}
        self.sent = 0  # prompt rows the talker holds (its n_prompt)
        self.replying = False
        self.turn_start: int | None = None
        self.last_reply: tuple[int, int] | None = None
        self.end_of_input_s = 0.0
        prompt = options.system_prompt or SYSTEM_PROMPT
        self._text(f"<|im_start|>system\n{prompt}<|im_end|>\n")

    def _text(self, s: str) -> None:
        self.thinker.append_text(self.tok(s, add_special_tokens=False).input_ids)
        self._sync()

    def _sync(self) -> None:
        """``StreamingTalker.sync`` over the wire: the new records as prompt rows."""
        if self.voice is None or self.replying:
            return
        th, start, end = self.thinker, self.sent, self.thinker.n_tokens
        if end < start:
            self._truncate_prompt(end)
            start = end
        e, h = th.records(start, end)  # (n, D) each
        pos = th.rope.positions[:, start:end].contiguous()  # (3, n)
        self.send("talker", wire.PromptRows(session=self.sid, embeds=ref(e, 1), hidden=ref(h, 2), positions=ref(pos, 3),
                                            next_position=int(th.rope.next_position)), e, h, pos)
        th.release_records(end)
        self.sent = end

    def _truncate_prompt(self, n: int) -> None:
        if self.voice is not None and self.sent > n:
            self.send("talker", wire.TruncatePrompt(session=self.sid, n_tokens=n))
            self.sent = n

    def begin_turn(self, video: bool) -> None:
        self.turn_start = self.thinker.n_tokens
        self._text("<|im_start|>user\n")
        if video:
            self.thinker.begin_video(2.0 / self.options.fps, with_audio=True)
        else:
            self.thinker.begin_audio()

    def append(self, kind: str, embeds: torch.Tensor, grid) -> None:
        if self.turn_start is None:
            raise RuntimeError("media for a turn that was not opened")
        if kind == "audio":
            self.thinker.append_audio_block(embeds)
        else:
            self.thinker.append_video_patch(embeds, tuple(grid))
        self._sync()

    def commit(self, text: str | None) -> None:
        t0 = time.perf_counter()
        if self.turn_start is not None:
            try:
                self.thinker.end_segment()
            except Exception:
                self.abort()  # a turn that cannot be closed is dropped, so the next one starts clean
                raise
            self._sync()
        else:
            self.turn_start = self.thinker.n_tokens
            self._text("<|im_start|>user\n")
        self._text(f"{text or ''}<|im_end|>\n<|im_start|>assistant\n")
        self.turn_start = None
        self.end_of_input_s = time.perf_counter() - t0

    def abort(self) -> None:
        if self.turn_start is None:
            return
        self.thinker.truncate(self.turn_start)
        self._truncate_prompt(self.turn_start)
        self.turn_start = None

    def reply(self, epoch: int, slot: Slot) -> Iterator[None]:
        """OmniChat.reply's text side, one decoded token per step."""
        o, speak = slot.options, self.voice is not None
        from omnistream.chat import TextDeltas

        deltas, texts, ended = TextDeltas(self.tok), [], False
        reply_start, ids = self.thinker.n_tokens, deltas.ids
        self.replying = True
        cancelled = False
        try:
            steps = self.thinker.decode(o.max_new_tokens, self.stop_ids, do_sample=o.temperature > 0,
                                        temperature=o.temperature)
            for step in steps:
                if step.token in self.stop_ids:
                    ended = True
                else:
                    if text := deltas.push(step.token):
                        texts.append(text)
                        self.send("client", wire.TextDelta(session=self.sid, epoch=epoch, seq=len(texts), text=text))
                if speak:
                    self.send("talker", wire.Step(session=self.sid, epoch=epoch, token=step.token,
                                                  embed=ref(step.embed, 1), hidden=ref(step.hidden, 2)),
                              step.embed, step.hidden)
                yield
                if slot.stale(epoch):
                    cancelled = True
                    break
            if text := deltas.flush():
                texts.append(text)
                self.send("client", wire.TextDelta(session=self.sid, epoch=epoch, seq=len(texts), text=text))
        finally:
            if speak:
                self.send("talker", wire.EndReply(session=self.sid, epoch=epoch, cancelled=cancelled))
            self.replying = False
        if not ended:
            self._text("<|im_end|>")
        self._text("\n")
        self.last_reply = (reply_start, len(ids))
        self.send("client", wire.Done(session=self.sid, epoch=epoch, part="text", cancelled=cancelled,
                                      text="".join(texts), reply_tokens=len(ids), speech=speak,
                                      stats={"end_of_input_s": self.end_of_input_s}))

    def truncate_to_played(self, played: int) -> int:
        if self.last_reply is None:
            raise RuntimeError("no reply to truncate")
        start, n_text = self.last_reply
        kept = min(n_text, math.ceil(max(0, played) / SAMPLES_PER_CODE))
        self.thinker.truncate(start + kept)
        self._truncate_prompt(start + kept)
        self._text("<|im_end|>\n")
        self.last_reply = (start, kept)
        return kept


class ThinkerWorker(Worker):
    name = "thinker"
    handles = (wire.BeginTurn, wire.Embeds, wire.Commit, wire.Clear, wire.Respond, wire.Truncate)
    forwards = Worker.forwards

    def build(self, options, sid):
        return _Conversation(self.ck, options, sid, self.send)

    def handle(self, s, msg, tensors):
        c: _Conversation = s.state
        if isinstance(msg, wire.BeginTurn):
            c.begin_turn(msg.video)
        elif isinstance(msg, wire.Embeds):
            c.append(msg.kind, tensors[0], msg.grid)
        elif isinstance(msg, wire.Commit):
            c.commit(msg.text)
            self._ack(s, msg.req)
        elif isinstance(msg, wire.Clear):
            c.abort()
            self._ack(s, msg.req)
        elif isinstance(msg, wire.Truncate):
            self._ack(s, msg.req, c.truncate_to_played(msg.played_samples))
        elif isinstance(msg, wire.Respond):
            if c.voice is not None:
                self.send("talker", msg)
            s.start(c.reply(msg.epoch, s), msg.epoch)

    def _ack(self, s: Slot, req: int, value: int = 0) -> None:
        if req:
            self.send("client", wire.Result(session=s.sid, req=req, value=value))


# ====================================================================== talker
class TalkerWorker(Worker):
    name = "talker"
    handles = (wire.PromptRows, wire.TruncatePrompt, wire.Respond, wire.Step, wire.EndReply)
    forwards = Worker.forwards + (wire.Respond,)

    def build(self, options, sid):
        from omnistream.talker.talker import StreamingTalker, TalkerConfig

        if options.voice is None:
            return None
        cfg = TalkerConfig(max_new_tokens=max(1, int(options.max_speech_s * 50)))
        return StreamingTalker.from_checkpoint(self.ck, options.voice, cfg)

    def on_epoch(self, s):
        if s.state is not None and s.state.started and s.stale(s.task_epoch):  # task_epoch: the reply's epoch
            s.state.cancel()

    def handle(self, s, msg, tensors):
        talker = s.state
        if talker is None:
            raise RuntimeError("this session has no voice: the talker has nothing to do")
        if isinstance(msg, wire.PromptRows):
            talker.feed_prompt(tensors[0], tensors[1], tensors[2], msg.next_position)
        elif isinstance(msg, wire.TruncatePrompt):
            talker.truncate_prompt(msg.n_tokens)
        elif isinstance(msg, wire.Respond):
            s.task_epoch = msg.epoch
        elif isinstance(msg, wire.Step):
            from omnistream.talker.thinker import ThinkerStep

            if s.stale(msg.epoch):
                talker.cancel()
                return
            codes = talker.push(ThinkerStep(msg.token, tensors[0], tensors[1]))
            if codes:
                self.send("token2wav", wire.Codes(session=s.sid, epoch=msg.epoch, codes=codes))
        elif isinstance(msg, wire.EndReply):
            s.start(self._finish(s, msg), msg.epoch)

    def _finish(self, s: Slot, msg: wire.EndReply) -> Iterator[None]:
        """OmniChat.reply's speech tail: the Talker's remaining codes, one per step, then end_turn."""
        talker, cancelled = s.state, msg.cancelled or s.stale(msg.epoch)
        try:
            if not cancelled:
                for code in talker.finish():
                    self.send("token2wav", wire.Codes(session=s.sid, epoch=msg.epoch, codes=[code]))
                    yield
                    if s.stale(msg.epoch):
                        talker.cancel()
                        cancelled = True
                        break
        finally:
            talker.end_turn()
            self.send("token2wav", wire.EndReply(session=s.sid, epoch=msg.epoch, cancelled=cancelled))


# ====================================================================== token2wav
class Token2WavWorker(Worker):
    name = "token2wav"
    handles = (wire.Respond, wire.Codes, wire.EndReply)
    forwards = ()

    def build(self, options, sid):
        return {"t2w": None, "epoch": -1}

    def on_epoch(self, s):
        st = s.state
        if st["t2w"] is not None and s.stale(st["epoch"]):
            st["t2w"].cancel()

    def handle(self, s, msg, tensors):
        st = s.state
        if isinstance(msg, wire.Respond):
            from omnistream.talker.token2wav import StreamingToken2Wav

            v = self.ck.voices[s.options.voice]
            st["t2w"] = StreamingToken2Wav.from_config(self.ck.token2wav, v["cond"], v["ref_mel"])
            st["epoch"], st["seq"] = msg.epoch, 0
        elif isinstance(msg, wire.Codes):
            if st["t2w"] is None or msg.epoch != st["epoch"] or s.stale(msg.epoch):
                return
            self._pcm(s, st["t2w"].push(msg.codes))
        elif isinstance(msg, wire.EndReply):
            cancelled = msg.cancelled or s.stale(msg.epoch) or st["t2w"] is None or msg.epoch != st["epoch"]
            if not cancelled:
                self._pcm(s, st["t2w"].finish())
            st["t2w"] = None
            self.send("client", wire.Done(session=s.sid, epoch=msg.epoch, part="audio", cancelled=cancelled))

    def _pcm(self, s: Slot, chunks) -> None:
        st = s.state
        for pcm in chunks:  # (n,) float32 24 kHz
            pcm = np.ascontiguousarray(pcm, dtype=np.float32)
            st["seq"] += 1
            self.send("client", wire.AudioChunk(session=s.sid, epoch=st["epoch"], seq=st["seq"], sample_rate=24000,
                                                pcm=wire.TensorRef.of(pcm)), pcm)


def _check_voice(ck, voice) -> None:
    if voice is not None and voice not in ck.voices:
        raise ValueError(f"unknown voice {voice!r}; this checkpoint has {sorted(ck.voices)}")


WORKER_TYPES = {w.name: w for w in (EncodersWorker, ThinkerWorker, TalkerWorker, Token2WavWorker)}
