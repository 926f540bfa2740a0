"""One conversation, in process: streaming encoders feeding an incrementally prefilled Thinker.

:class:`OmniChat` is what a live session does with a microphone and a camera: audio pieces of any
size and frames at any rate go in as they arrive; every complete 2-s audio block and every
2-frame video patch is encoded and appended to the Thinker's KV cache at once, with TMRoPE
positions, so when the user stops talking only the last partial block is left to encode.
Audio with video uses the model's "audio in video" layout: per 2-s chunk, the video tokens then
the audio tokens (:mod:`omnistream.encoders.tmrope` holds tokens back until their slot is known).

``run_chat`` is the ``omnistream chat`` command on top of it.
"""

from __future__ import annotations

import heapq
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from omnistream.encoders.audio import AudioStream
from omnistream.encoders.vision import VideoStream, iter_video_frames
from omnistream.engine.conversation import SYSTEM_PROMPT, Conversation
from omnistream.engine.tools import ToolCall, check_tool_choice, check_tools, tool_response
from omnistream.engine.turns import SAMPLE_RATE, TextDeltas, TurnStats, parse_window
from omnistream.model.talker import StreamingTalker, TalkerConfig
from omnistream.model.token2wav import DEFAULT as TOKEN2WAV_DEFAULT
from omnistream.model.token2wav import StreamingConfig, StreamingToken2Wav

__all__ = ["SYSTEM_PROMPT", "OmniChat", "ReplyEvent", "TextDeltas", "TurnStats", "media_events", "parse_window",
           "run_chat"]


@dataclass
class ReplyEvent:
    """One piece of a streamed reply: a text delta, a 24 kHz float32 PCM chunk or a function call."""

    kind: str  # "text" | "audio" | "call"
    text: str = ""
    pcm: np.ndarray | None = None
    call: ToolCall | None = None  # kind "call": a function call the reply made (name, arguments JSON text)


class _TalkerRows:
    """The in-process :class:`~omnistream.engine.conversation.TalkerFeed`: rows go straight into the Talker."""

    def __init__(self, talker: StreamingTalker):
        self.talker = talker

    def prompt_rows(self, embeds, hidden, positions, next_position) -> None:
        self.talker.feed_prompt(embeds, hidden, positions, next_position)

    def truncate_prompt(self, n_tokens: int) -> None:
        self.talker.truncate_prompt(n_tokens)


class OmniChat:
    """A multi-turn conversation over a loaded :class:`~omnistream.checkpoints.OmniCheckpoint`.

    The simple in-process Python API over the conversation core
    (:class:`~omnistream.engine.conversation.Conversation`, which owns the turn rules: system
    prompt, media segments cut every ``segment_s`` with a window, stop tokens, truncation); this
    class adds the streaming encoders, the Talker and Token2Wav, run synchronously.

    With ``voice`` set (a name from the checkpoint's speaker dictionary) replies are spoken too:
    the Talker's KV cache follows the Thinker's as the user turn streams in (so at the end of the
    turn only the last rows are left), the Talker runs one step behind the reply text, and
    Token2Wav turns codec tokens into PCM chunk by chunk (``token2wav`` sets the chunking).
    Without a voice the Talker and Token2Wav are never touched (text-only mode).
    ``window`` (a :class:`~omnistream.memory.window_cache.WindowConfig`) bounds the Thinker's KV
    cache to attention sinks + a sliding window of recent tokens (StreamingLLM).
    """

    def __init__(self, ck, system_prompt: str | None = SYSTEM_PROMPT, fps: float = 2.0, *,
                 voice: str | None = None, talker_config: TalkerConfig | None = None,
                 token2wav: StreamingConfig = TOKEN2WAV_DEFAULT, window=None, segment_s: float | None = 60.0):
        self.ck = ck
        self.tok = ck.tokenizer
        self.fps = fps
        self.voice = voice
        self.talker = StreamingTalker.from_checkpoint(ck, voice, talker_config) if voice else None
        self.conv = Conversation(ck, system_prompt=system_prompt, fps=fps, window=window, segment_s=segment_s,
                                 feed=_TalkerRows(self.talker) if self.talker is not None else None)
        self.thinker = self.conv.thinker
        self.token2wav_config = token2wav
        self._audio: AudioStream | None = None
        self._video: VideoStream | None = None
        self._cancel = threading.Event()
        self._t2w: StreamingToken2Wav | None = None
        self.reply_codes: list[int] = []  # codec tokens of the last reply
        self.reply_ids: list[int] = []  # text tokens of the last reply (stop token excluded)
        self.reply_calls: list[ToolCall] = []  # function calls of the last reply

    @property
    def stats(self) -> TurnStats:
        return self.conv.stats

    @property
    def segments_cut(self) -> int:
        return self.conv.segments_cut

    # ------------------------------------------------------------------ a user turn
    def begin_turn(self, *, audio: bool, video: bool) -> None:
        """Open a user turn that will stream ``audio`` and/or ``video``."""
        self.conv.begin_turn(audio=audio, video=video)
        self._audio = AudioStream.from_checkpoint(self.ck) if audio else None
        self._video = VideoStream.from_checkpoint(self.ck, fps=self.fps) if video else None

    def push_audio(self, pcm: np.ndarray, sample_rate: int = 16000) -> None:
        """A PCM piece of any length; bad input raises PcmError and the turn goes on."""
        t = time.perf_counter()
        blocks = self._audio.push(pcm, sample_rate)
        self.stats.encode_s += time.perf_counter() - t
        self.stats.audio_s += len(pcm) / sample_rate
        for b in blocks:
            self.conv.append_audio(b.embeds)

    def push_frame(self, frame: np.ndarray, t_s: float) -> None:
        """An RGB frame (H, W, 3) taken at ``t_s``; bad frames raise VideoError, the turn goes on."""
        t = time.perf_counter()
        patches = self._video.push_frame(frame, t_s)
        self.stats.encode_s += time.perf_counter() - t
        self.stats.video_frames += 1
        self.stats.video_s = max(self.stats.video_s, t_s)
        for p in patches:
            self.conv.append_video(p.embeds, p.grid_thw)

    def end_turn(self, text: str | None = None) -> None:
        """The user stopped: encode what is left (video first), close the segment, add the text."""
        t0 = time.perf_counter()
        if self._video is not None:
            t = time.perf_counter()
            patches = self._video.finish()
            self.stats.encode_s += time.perf_counter() - t
            for p in patches:
                self.conv.append_video(p.embeds, p.grid_thw)
        if self._audio is not None:
            t = time.perf_counter()
            blocks = self._audio.finish()
            self.stats.encode_s += time.perf_counter() - t
            for b in blocks:
                self.conv.append_audio(b.embeds)
        self._audio = self._video = None
        self.conv.end_turn(text)
        self.conv.turn_end_t = t0
        self.stats.end_of_input_s = time.perf_counter() - t0

    def abort_turn(self) -> None:
        """Forget the open user turn (``input_audio_buffer.clear``): the Thinker's and Talker's
        caches are cut back to where it began, as if it never happened."""
        self.conv.abort_turn()
        self._audio = self._video = None

    def say(self, text: str) -> None:
        """A typed user turn (no media)."""
        self.begin_turn(audio=False, video=False)
        self.end_turn(text)

    def function_output(self, output: str) -> None:
        """What a function the last reply called returned (its JSON text, say): it joins the
        conversation as Qwen's ``<tool_response>`` user turn; the next :meth:`reply` answers after it."""
        self.say(tool_response(output))

    def add_message(self, item_id: str, role: str, text: str, *, after: str | None = None) -> None:
        """Insert a ``role`` message (user, assistant, system) anywhere: at the end (``after`` None),
        first (``"root"``) or after item ``after``; the Thinker's and Talker's caches are cut back
        and the items after it prefilled again (:meth:`Conversation.add_message`, ``ItemError``)."""
        self.conv.add_message(item_id, role, text, after=after)

    def delete_item(self, item_id: str) -> None:
        """Take an item out of the conversation (:meth:`Conversation.delete_item`)."""
        self.conv.delete_item(item_id)

    @property
    def items(self) -> list[str]:
        """The conversation's item ids in order (closed turns, replies and inserted messages)."""
        return self.conv.item_ids()

    def reply(self, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
              speak: bool | None = None, *, instructions: str | None = None, tools: list[dict] | None = None,
              tool_choice: str | dict = "auto") -> Iterator[ReplyEvent]:
        """Stream the assistant's reply: text deltas (valid UTF-8), when speaking PCM chunks, and at
        the end one ``call`` event per function call it made (also in :attr:`reply_calls`).

        ``instructions`` and ``tools`` (Realtime-style definitions ``{type: "function", name,
        description, parameters}``) apply to this reply only; ``tool_choice`` is ``auto``, ``none``,
        ``required`` or ``{"type": "function", "name": N}`` -- the last two constrain decoding to a
        valid call, which is never spoken. A bad definition or choice raises ValueError before
        anything is decoded. ``cancel()`` (from any thread) stops the reply within one Token2Wav
        chunk; afterwards :meth:`truncate_to_played` keeps only what the user heard.
        """
        speak = self.talker is not None if speak is None else speak
        if speak and self.talker is None:
            raise ValueError("this chat has no voice: construct OmniChat(..., voice='Chelsie') to speak")
        tools = check_tools(tools) if tools else []
        choice = check_tool_choice(tool_choice, tools)
        self._cancel.clear()
        t0 = time.perf_counter()
        r = self.conv.begin_reply(max_new_tokens, temperature, seed, instructions=instructions, tools=tools,
                                  tool_choice=choice)
        speak = speak and not r.forced  # a forced call is not spoken (nor is the rest of one begun freely)
        s = self.stats
        self.reply_codes, self.reply_calls = [], []
        if speak:
            v = self.ck.voices[self.voice]
            self._t2w = StreamingToken2Wav.from_config(
                self.ck.token2wav, v["cond"], v["ref_mel"], self.token2wav_config, seed=seed
            )
        try:
            for step, text in self.conv.decode(r):
                if r.n_decoded == 1:
                    s.ttft_s = time.perf_counter() - self.conv.turn_end_t
                if text:
                    yield ReplyEvent("text", text=text)
                if speak and not r.calling:
                    yield from self._speak(self.talker.push(step))
                if self._cancel.is_set():
                    break
            if text := r.flush():  # what was held back as a partial UTF-8 sequence
                yield ReplyEvent("text", text=text)
            if speak:
                if not self._cancel.is_set():
                    for code in self.talker.finish():
                        yield from self._speak([code])
                        if self._cancel.is_set():
                            break
                if not self._cancel.is_set():
                    yield from self._audio_events(self._t2w.finish())
        finally:
            if speak:
                self.talker.end_turn()
            self.conv.end_reply(cancelled=self._cancel.is_set())
        self.reply_ids = r.ids
        if not self._cancel.is_set():  # a cut-off call is not a call
            self.reply_calls = r.calls
            for call in self.reply_calls:
                yield ReplyEvent("call", call=call)
        s.codec_tokens = len(self.reply_codes)
        s.decode_s = time.perf_counter() - t0

    def _speak(self, codes: list[int]) -> Iterator[ReplyEvent]:
        if not codes or self._cancel.is_set():
            return
        self.reply_codes.extend(codes)
        self.stats.code_times.extend([time.perf_counter()] * len(codes))
        yield from self._audio_events(self._t2w.push(codes))

    def _audio_events(self, chunks) -> Iterator[ReplyEvent]:
        for pcm in chunks:
            if not self.stats.first_audio_s:
                self.stats.first_audio_s = time.perf_counter() - self.conv.turn_end_t
            self.stats.audio_out_s += len(pcm) / SAMPLE_RATE
            yield ReplyEvent("audio", pcm=pcm)

    def cancel(self) -> None:
        """Barge-in: stop the running reply (thread-safe); Token2Wav aborts its current chunk."""
        self._cancel.set()
        if self._t2w is not None:
            self._t2w.cancel()
        if self.talker is not None:
            self.talker.cancel()

    def truncate_to_played(self, played_samples: int) -> int:
        """Keep only the part of the last reply the user heard (``played_samples`` of 24 kHz PCM);
        see :meth:`Conversation.truncate_to_played`. Returns the number of reply tokens kept."""
        kept = self.conv.truncate_to_played(played_samples)
        self.reply_ids = self.reply_ids[:kept]
        return kept


def media_events(audio: tuple[np.ndarray, int] | None, video_source: str | None, piece_s: float = 0.04):
    """Merge an audio clip (cut in ``piece_s`` pieces) and a video's frames into one time-ordered
    stream of ``(t_s, "audio", pcm, rate)`` / ``(t_s, "frame", frame, None)`` events, as a live
    microphone and camera would deliver them (an event's time is when its data is complete)."""
    def audio_events():
        pcm, rate = audio
        step = max(1, int(rate * piece_s))
        for i in range(0, len(pcm), step):
            piece = pcm[i : i + step]
            yield ((i + len(piece)) / rate, 0, "audio", piece, rate)

    def video_events():
        for frame, t in iter_video_frames(video_source):
            yield (t, 1, "frame", frame, None)

    streams = []
    if audio is not None:
        streams.append(audio_events())
    if video_source is not None:
        streams.append(video_events())
    for t, _, kind, data, rate in heapq.merge(*streams, key=lambda e: (e[0], e[1])):
        yield t, kind, data, rate


def run_chat(args) -> int:
    """``omnistream chat``: stream the given inputs through one turn and print the reply."""
    from omnistream.checkpoints import load_omni
    from omnistream.encoders.media import read_audio

    if not (args.audio or args.video or args.text):
        raise ValueError("give at least one input: --audio FILE, --video FILE or --text '...'")
    speak = bool(args.out or args.voice)
    t = time.perf_counter()
    ck = load_omni(args.model, talker=speak, device=args.device, dtype=getattr(args, "dtype", "auto"),
                   attn_implementation=getattr(args, "attn", "sdpa"))
    print(f"loaded {args.model} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    voice = args.voice or "Chelsie"
    if speak and voice not in ck.voices:
        raise ValueError(f"unknown voice {voice!r}; available voices: {', '.join(sorted(ck.voices))}")
    talker_config = TalkerConfig(max_new_tokens=int(args.max_speech_s * SAMPLE_RATE / 480), seed=args.seed)
    chat = OmniChat(ck, system_prompt=args.system or SYSTEM_PROMPT, voice=voice if speak else None,
                    talker_config=talker_config, window=parse_window(args.window, video=bool(args.video)))
    audio = read_audio(args.audio) if args.audio else None
    chat.begin_turn(audio=audio is not None, video=args.video is not None)
    start = time.perf_counter()
    for t_s, kind, data, rate in media_events(audio, args.video):
        if args.realtime:  # a live source delivers data no sooner than it exists
            time.sleep(max(0.0, start + t_s - time.perf_counter()))
        if kind == "audio":
            chat.push_audio(data, rate)
        else:
            chat.push_frame(data, t_s)
    chat.end_turn(args.text)
    print("assistant: ", end="", flush=True)
    pcm = []
    for ev in chat.reply(args.max_new_tokens, args.temperature, seed=args.seed):
        if ev.kind == "text":
            print(ev.text, end="", flush=True)
        elif ev.kind == "audio":
            pcm.append(ev.pcm)
    print()
    s = chat.stats
    if speak:
        from omnistream.encoders.media import write_wav

        out = args.out or "reply.wav"
        write_wav(out, np.concatenate(pcm) if pcm else np.zeros(0, np.float32), SAMPLE_RATE)
        print(f"wrote {s.audio_out_s:.2f}s of speech ({s.codec_tokens} codec tokens) to {out}: "
              f"time to first audio {s.first_audio_s * 1000:.0f} ms, real-time factor {s.rtf:.3f}",
              file=sys.stderr)
    media_s = max(s.audio_s, s.video_s)
    print(
        f"\n{s.audio_s:.2f}s audio in {s.audio_blocks} blocks, {s.video_frames} frames in {s.video_patches} "
        f"video patches; encode {s.encode_s:.3f}s, prefill {s.prefill_s:.3f}s while streaming\n"
        f"end of input -> prompt ready {s.end_of_input_s * 1000:.0f} ms, time to first token "
        f"{s.ttft_s * 1000:.0f} ms, reply ({s.reply_tokens} tokens{', speech' if speak else ''}) in {s.decode_s:.2f}s"
        + (f", streaming real-time factor {(s.encode_s + s.prefill_s) / media_s:.3f}" if media_s else ""),
        file=sys.stderr,
    )
    return 0
