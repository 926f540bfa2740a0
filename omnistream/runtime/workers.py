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
  input transcription of a committed turn (``Commit.transcribe``) as a side task on its own cache
  -> ``Transcript`` to the client, always before the ``Done`` of the reply that follows the turn;
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
import math
import os
import time
from collections.abc import Generator

import numpy as np

from omnistream.engine.conversation import SYSTEM_PROMPT, Conversation
from omnistream.engine.scheduler import Need
from omnistream.engine.transcribe import Transcription, Transcriptions
from omnistream.engine.turns import SAMPLE_RATE, SpeechRates, parse_window
from omnistream.memory.batch import cache_bytes
from omnistream.runtime import wire
from omnistream.runtime.session import Slot
from omnistream.runtime.worker import Send, Worker, _check_voice, error_code

log = logging.getLogger(__name__)


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

    def handle(self, s, msg):
        t: _Turn = s.state
        if isinstance(msg, wire.AudioChunk):
            if not t.open:  # validate first: bad audio must not open a turn it cannot fill
                from omnistream.encoders.audio import PcmConverter

                PcmConverter()(msg.pcm, msg.sample_rate)
            self._open_turn(s)
            self._blocks(s, t.audio.push(msg.pcm, msg.sample_rate))
        elif isinstance(msg, wire.Frame):
            from omnistream.encoders.vision import check_frame

            check_frame(msg.image)  # a bad frame must not turn the next turn into a video turn
            if not t.open:  # a turn that starts with the camera on carries its audio in the video
                t.video = True
            if not t.video:
                return  # the camera came on mid-turn: its frames join the next turn
            self._open_turn(s)
            if t.t0 is None:
                t.t0 = msg.t_s
            t.n_frames += 1
            self._patches(s, t.frames.push_frame(msg.image, msg.t_s - t.t0))
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
            self.send(self.next, wire.Embeds(session=s.sid, epoch=s.epoch, kind="audio", embeds=b.embeds))

    def _patches(self, s: Slot, patches) -> None:
        for p in patches:  # p.embeds: (h*w/4, D)
            self.send(self.next, wire.Embeds(session=s.sid, epoch=s.epoch, kind="video", embeds=p.embeds,
                                             grid=[int(g) for g in p.grid_thw]))


# ====================================================================== thinker
class _WireFeed:
    """The staged :class:`~omnistream.engine.conversation.TalkerFeed`: prompt rows as messages."""

    def __init__(self, send: Send, sid: str):
        self.send, self.sid = send, sid

    def prompt_rows(self, embeds, hidden, positions, next_position) -> None:
        self.send("talker", wire.PromptRows(session=self.sid, embeds=embeds, hidden=hidden,
                                            positions=positions.contiguous(), next_position=next_position))  # (3, n)

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
    handles = (wire.BeginTurn, wire.Embeds, wire.Commit, wire.Clear, wire.Respond, wire.Truncate, wire.AddItem,
               wire.DeleteItem)
    forwards = Worker.forwards
    batchers = {"thinker.decode": decode_rows}
    prefill_tokens = 512  # ~ two 2-s audio+video chunks per tick
    REBUILD_KEYS = ("voice", "system_prompt", "window", "fps")  # baked into the conversation

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.asr = Transcriptions(self.ck, self._emit_transcript)  # input transcriptions, per session in order

    def build(self, options, sid):
        feed = _WireFeed(self.send, sid) if options.voice is not None else None
        c = Conversation(self.ck, system_prompt=options.system_prompt or SYSTEM_PROMPT, fps=options.fps,
                         window=parse_window(options.window, video=True), feed=feed)
        c.keep_audio = options.transcribe  # the turn's audio blocks are kept for its transcription
        return c

    def update(self, s):
        s.state.keep_audio = s.options.transcribe

    def close(self, s):
        if s.sid not in self.slots:  # the session closed (a rebuild keeps its transcriptions: they own their cache)
            self.asr.drop(s.sid)
            cache = getattr(getattr(s.state, "thinker", None), "cache", None)
            if hasattr(cache, "release_row"):  # its row of the batch pool goes now, not when the GC gets to it
                cache.release_row()

    # ------------------------------------------------------------------ input transcription
    def tasks(self):
        """The replies' tasks, plus the head transcription of each session: their decode steps go into
        the same batched forward (the transcriptions last when a batch is full: :meth:`priority`)."""
        yield from super().tasks()
        yield from self.asr.tasks()

    def priority(self, key) -> float:
        return math.inf if isinstance(key, Transcription) else 0.0

    def _ended(self, key, error):
        if isinstance(key, Transcription):
            return self.asr.ended(key, error)
        return super()._ended(key, error)

    def _emit_transcript(self, t: Transcription, text: str, final: bool, error: str | None) -> None:
        self.send("client", wire.Transcript(session=t.sid, item=t.item, seq=len(t.texts) + final, text=text,
                                            final=final, error=error, usage=t.usage if final else {}))

    def _first_token(self, sid: str) -> bool:
        """A reply of ``sid`` waits for its first token (its transcription waits meanwhile)."""
        s = self.slots.get(sid)
        r = getattr(s.state, "reply", None) if s is not None else None
        return r is not None and r.n_decoded == 0

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

    def cost(self, msg):
        return int(msg.embeds.shape[0]) if isinstance(msg, wire.Embeds) else 0

    def handle(self, s, msg):
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
                c.append_audio(msg.embeds)
            else:
                c.append_video(msg.embeds, msg.grid)
        elif isinstance(msg, wire.Commit):
            c.end_turn(msg.text, item_id=msg.item)
            blocks = c.take_turn_audio()
            self._ack(s, msg.req)
            if msg.transcribe is not None:
                sid = s.sid
                self.asr.start(sid, msg.transcribe, blocks, hold=lambda: self._first_token(sid))
        elif isinstance(msg, wire.Clear):
            c.abort_turn()
            self._ack(s, msg.req)
        elif isinstance(msg, wire.Truncate):
            self._ack(s, msg.req, c.truncate_to_played(msg.played_samples))
        elif isinstance(msg, wire.AddItem):  # an ItemError (unknown id, busy...) answers the req, state unchanged
            c.add_message(msg.item, msg.role, msg.text, after=msg.after)
            self._ack(s, msg.req)
        elif isinstance(msg, wire.DeleteItem):
            c.delete_item(msg.item)
            self._ack(s, msg.req)
        elif isinstance(msg, wire.Respond):
            o = s.options
            try:
                _check_voice(self.ck, msg.voice)  # before any work: a reply in a voice the checkpoint lacks fails
                r = c.begin_reply(msg.max_new_tokens or o.max_new_tokens, o.temperature, o.seed,
                                  instructions=msg.instructions, tools=msg.tools, tool_choice=msg.tool_choice,
                                  out_of_band=msg.out_of_band)
            except Exception as e:  # noqa: BLE001 -- e.g. a tool_choice naming no tool: this reply fails, not the session
                self.send("client", wire.ReplyError(session=s.sid, epoch=msg.epoch, code=error_code(e),
                                                    message=f"{self.name}: {e}"))
                return
            speak = c.feed is not None and msg.audio and not r.forced  # a forced call is never spoken
            if speak:
                self.send("talker", msg)
            s.start(self._reply(s, c, r, msg.epoch, speak, msg.item), msg.epoch)

    def _reply(self, s: Slot, c: Conversation, r, epoch: int, speak: bool, item: str | None = None) -> Generator:
        """The text side of a reply, one token per scheduler tick (batched with the other sessions).
        ``speak``: its steps go to the Talker (until a tool call begins: a call is not spoken); ``item``:
        the conversation item the reply becomes."""
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
                                                  embed=step.embed, hidden=step.hidden))
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
            c.end_reply(cancelled, item_id=item)
        text, calls = r.result()
        done = wire.Done(session=s.sid, epoch=epoch, part="text", cancelled=cancelled, text=text,
                         reply_tokens=len(r.ids), speech=speak, stats={"end_of_input_s": end_of_input_s},
                         usage=r.usage(), tool_calls=[{"name": k.name, "arguments": k.arguments} for k in calls])
        # the turn's transcript reaches the client before its reply's end (held there, not in this task:
        # the session's next ops need not wait for it)
        self.asr.after(s.sid, lambda: self.send("client", done))

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
    speech_s = 0.0  # seconds of speech coded (codes sent / codes per second)

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

    def handle(self, s, msg):
        talker = s.state
        if talker is None:
            raise RuntimeError("this session has no voice: the talker has nothing to do")
        if isinstance(msg, wire.PromptRows):
            talker.feed_prompt(msg.embeds, msg.hidden, msg.positions, msg.next_position)
        elif isinstance(msg, wire.TruncatePrompt):
            talker.truncate_prompt(msg.n_tokens)
        elif isinstance(msg, wire.Respond):
            s.task_epoch, s.t_first_code = msg.epoch, None
            talker.set_voice(self.ck.voices[msg.voice or s.options.voice])  # (an unknown voice: refused by the thinker)
        elif isinstance(msg, wire.Step):
            from omnistream.model.thinker import ThinkerStep

            self._send_codes(s, msg.epoch, talker.feed(ThinkerStep(msg.token, msg.embed, msg.hidden)))
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
            self.speech_s += len(codes) / SpeechRates.from_checkpoint(self.ck).codes_per_second
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
    """Token2Wav's batched call: DiT windows / BigVGAN spans of all sessions, equal shapes stacked.

    Where torch runs one intra-op thread on a CPU of 2+ cores (``serve``'s engine threads on 2 cores,
    each stage of ``split`` there), a batch of 4+ rows runs as two halves on two threads, so the DiT
    also uses the time the other core's work leaves idle (a spoken reply's codes come early, its DiT
    windows take the rest of the reply). Measured with 3-s replies on 2 cores (benchmarks/capacity.py,
    in process): 3 -> 4 sessions at real time with the block-sparse DiT, first audio unchanged."""
    import torch

    from omnistream.model.token2wav_jobs import run_jobs

    cpu = jobs[0].stream.device.type == "cpu"
    return run_jobs(jobs, threads=2 if cpu and torch.get_num_threads() == 1 and (os.cpu_count() or 1) >= 2 else 1)


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
    speech_s = 0.0  # seconds of speech sent

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

    def handle(self, s, msg):
        v: _Voice = s.state
        if isinstance(msg, wire.Respond):
            from omnistream.model.token2wav import StreamingToken2Wav

            spk = self.ck.voices[msg.voice or s.options.voice]  # this reply's voice, else the session's
            v.t2w = StreamingToken2Wav.from_config(self.ck.token2wav, spk["cond"], spk["ref_mel"], seed=s.options.seed,
                                                   block_sparse=s.options.block_sparse_dit)
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
                self.speech_s += pcm.shape[0] / SAMPLE_RATE
                v.t_first = v.t_first or time.perf_counter()
                self.send("client", wire.AudioChunk(session=s.sid, epoch=v.epoch, seq=v.seq, sample_rate=SAMPLE_RATE,
                                                    pcm=pcm))
        if v.ended:
            self.send("client", wire.Done(session=s.sid, epoch=v.epoch, part="audio",
                                          cancelled=t2w.cancelled or s.stale(v.epoch)))
            v.t2w = None


WORKER_TYPES = {w.name: w for w in (EncodersWorker, ThinkerWorker, TalkerWorker, Token2WavWorker)}
