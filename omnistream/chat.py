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
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from omnistream.encoders.audio import AudioStream
from omnistream.encoders.vision import VideoStream, iter_video_frames
from omnistream.memory.window_cache import AUDIO_TOKENS_PER_SECOND
from omnistream.talker.talker import StreamingTalker, TalkerConfig
from omnistream.talker.thinker import StreamingThinker
from omnistream.talker.token2wav import DEFAULT as TOKEN2WAV_DEFAULT
from omnistream.talker.token2wav import SAMPLE_RATE, StreamingConfig, StreamingToken2Wav

SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


@dataclass
class TurnStats:
    """Where the time of one turn went (seconds, wall clock)."""

    audio_s: float = 0.0  # seconds of audio received
    video_frames: int = 0  # frames received (before resampling)
    video_s: float = 0.0  # time of the last frame received
    audio_blocks: int = 0
    video_patches: int = 0
    encode_s: float = 0.0  # encoders, while streaming and at end of turn
    prefill_s: float = 0.0  # Thinker forwards over encoded chunks and prompt text
    end_of_input_s: float = 0.0  # end of turn -> the prompt fully prefilled
    ttft_s: float = 0.0  # end of turn -> first reply token
    first_audio_s: float = 0.0  # end of turn -> first PCM chunk of the reply
    decode_s: float = 0.0  # end of turn -> reply complete (text and speech)
    reply_tokens: int = 0
    codec_tokens: int = 0
    audio_out_s: float = 0.0  # seconds of speech produced
    cancelled: bool = False
    code_times: list = field(default_factory=list)  # perf_counter() when each codec token was ready

    @property
    def rtf(self) -> float:
        """Reply compute time per second of speech produced (< 1: faster than real time)."""
        return self.decode_s / self.audio_out_s if self.audio_out_s else math.nan


@dataclass
class ReplyEvent:
    """One piece of a streamed reply: a text delta or a 24 kHz float32 PCM chunk."""

    kind: str  # "text" | "audio"
    text: str = ""
    pcm: np.ndarray | None = None


class TextDeltas:
    """Reply text as it decodes: whole UTF-8 characters only (byte-level BPE can split one across
    tokens), decoding only the not-yet-shown tokens so each step costs O(1)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.shown = 0  # tokens whose text was emitted (it ended on a whole character)

    def push(self, token: int) -> str:
        """Add a token; returns the new text, or "" while a character is incomplete."""
        self.ids.append(token)
        text = self.tok.decode(self.ids[self.shown:], skip_special_tokens=True)
        if not text or text.endswith("\ufffd"):
            return ""
        self.shown = len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is still held back (at the end of the reply)."""
        text = self.tok.decode(self.ids[self.shown:], skip_special_tokens=True)
        self.shown = len(self.ids)
        return text


class OmniChat:
    """A multi-turn conversation over a loaded :class:`~omnistream.checkpoints.OmniCheckpoint`.

    With ``voice`` set (a name from the checkpoint's speaker dictionary) replies are spoken too:
    the Talker's KV cache follows the Thinker's as the user turn streams in (so at the end of the
    turn only the last rows are left), the Talker runs one step behind the reply text, and
    Token2Wav turns codec tokens into PCM chunk by chunk (``token2wav`` sets the chunking).
    Without a voice the Talker and Token2Wav are never touched (text-only mode).
    ``window`` (a :class:`~omnistream.memory.window_cache.WindowConfig`) bounds the Thinker's KV
    cache to attention sinks + a sliding window of recent tokens (StreamingLLM).

    ``segment_s`` (60 s; only with a ``window``): a long media turn is cut into media segments of
    at most ``segment_s`` seconds (the open segment is closed and a new one opened, as if the user
    had sent consecutive clips). Why: inside ONE open audio-in-video segment TMRoPE keeps the video
    tokens' h/w positions at the segment start while time advances, so the position span inside
    the window grows with the turn and no shift bounds it; cut segments bound it by about two
    segments. Audio blocks (2 s) and video patches (``2 / fps`` s) that would overflow the open
    segment are held back until every stream of the turn has one, then the cut is made (so each
    segment gets both audio and video); turns shorter than ``segment_s`` are untouched.
    """

    def __init__(self, ck, system_prompt: str | None = SYSTEM_PROMPT, fps: float = 2.0, *,
                 voice: str | None = None, talker_config: TalkerConfig | None = None,
                 token2wav: StreamingConfig = TOKEN2WAV_DEFAULT, window=None, segment_s: float | None = 60.0):
        self.ck = ck
        self.tok = ck.tokenizer
        self.fps = fps
        self.voice = voice
        if segment_s is not None and not segment_s > 0:
            raise ValueError(f"segment_s must be > 0 or None, not {segment_s!r}")
        self.segment_s = segment_s if window is not None else None
        self.segments_cut = 0  # media segments closed early by segment_s (this conversation)
        self._held: dict[str, list] = {"audio": [], "video": []}
        self._seg_s: dict[str, float] = {"audio": 0.0, "video": 0.0}
        if window is None:  # the growing cache: exact, memory grows with the session
            self.thinker = StreamingThinker(ck.thinker, tokenizer=ck.tokenizer, record=voice is not None)
        else:  # sinks + sliding window: bounded memory for hours-long sessions
            from omnistream.memory.window_cache import window_thinker

            self.thinker = window_thinker(ck.thinker, window, tokenizer=ck.tokenizer, record=voice is not None)
        self.talker = StreamingTalker.from_checkpoint(ck, voice, talker_config) if voice else None
        self.token2wav_config = token2wav
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = {self.im_end, self.tok.convert_tokens_to_ids("<|endoftext|>")}
        self._audio: AudioStream | None = None
        self._video: VideoStream | None = None
        self._cancel = threading.Event()
        self._t2w: StreamingToken2Wav | None = None
        self._last_reply: tuple[int, int] | None = None  # (reply start, reply text tokens)
        self._reply_end = 0  # Thinker length when the last reply (or its truncation) closed
        self.stats = TurnStats()
        self.reply_codes: list[int] = []  # codec tokens of the last reply
        self.reply_ids: list[int] = []  # text tokens of the last reply (stop token excluded)
        self._turn_end = time.perf_counter()
        if system_prompt:
            self._text(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")

    def _text(self, s: str) -> None:
        t = time.perf_counter()
        self.thinker.append_text(self.tok(s, add_special_tokens=False).input_ids)
        self._sync()
        self.stats.prefill_s += time.perf_counter() - t

    def _sync(self) -> None:
        """Feed what the Thinker just prefilled to the Talker's cache (speech mode only)."""
        if self.talker is not None and not self.talker.started:
            self.talker.sync(self.thinker)

    # ------------------------------------------------------------------ a user turn
    def begin_turn(self, *, audio: bool, video: bool) -> None:
        """Open a user turn that will stream ``audio`` and/or ``video``."""
        self.stats = TurnStats()
        self._turn_start = self.thinker.n_tokens
        self._text("<|im_start|>user\n")
        self._audio = AudioStream.from_checkpoint(self.ck) if audio else None
        self._video = VideoStream.from_checkpoint(self.ck, fps=self.fps) if video else None
        self._held = {"audio": [], "video": []}
        self._seg_s = {"audio": 0.0, "video": 0.0}
        self._open_segment()

    def _open_segment(self) -> None:
        spg = 2.0 / self.fps  # seconds per temporal patch of 2 frames
        audio, video = self._audio is not None, self._video is not None
        if audio and video:
            self.thinker.begin_video(spg, with_audio=True)
        elif video:
            self.thinker.begin_video(spg)
        elif audio:
            self.thinker.begin_audio()

    def _media(self, kind: str, item, seconds: float) -> None:
        """Append one audio block / video patch to the open segment, cutting it every ``segment_s``."""
        if self.segment_s is None:
            self._feed(kind, item)
            return
        held = self._held[kind]
        if held or (self._seg_s[kind] > 0 and self._seg_s[kind] + seconds > self.segment_s + 1e-6):
            held.append((item, seconds))
        else:
            self._feed(kind, item)
            self._seg_s[kind] += seconds
        active = [k for k, st in (("audio", self._audio), ("video", self._video)) if st is not None]
        while all(self._held[k] for k in active):  # every stream overflows: close and reopen the segment
            self.thinker.end_segment()
            self._open_segment()
            self.segments_cut += 1
            self._seg_s = {"audio": 0.0, "video": 0.0}
            for k in active:
                queue, self._held[k] = self._held[k], []
                for it, sec in queue:
                    if self._held[k] or (self._seg_s[k] > 0 and self._seg_s[k] + sec > self.segment_s + 1e-6):
                        self._held[k].append((it, sec))
                    else:
                        self._feed(k, it)
                        self._seg_s[k] += sec

    def _feed(self, kind: str, item) -> None:
        if kind == "audio":
            self.thinker.append_audio_block(item.embeds)
        else:
            self.thinker.append_video_patch(item.embeds, item.grid_thw)

    def _flush_held(self) -> None:
        """End of turn: what is still held back goes into the open segment (no cut: the other stream ended)."""
        for k in ("video", "audio"):
            for it, _ in self._held[k]:
                self._feed(k, it)
            self._held[k] = []

    def push_audio(self, pcm: np.ndarray, sample_rate: int = 16000) -> None:
        """A PCM piece of any length; bad input raises PcmError and the turn goes on."""
        t = time.perf_counter()
        blocks = self._audio.push(pcm, sample_rate)
        self.stats.encode_s += time.perf_counter() - t
        self.stats.audio_s += len(pcm) / sample_rate
        self._append_audio(blocks)

    def push_frame(self, frame: np.ndarray, t_s: float) -> None:
        """An RGB frame (H, W, 3) taken at ``t_s``; bad frames raise VideoError, the turn goes on."""
        t = time.perf_counter()
        patches = self._video.push_frame(frame, t_s)
        self.stats.encode_s += time.perf_counter() - t
        self.stats.video_frames += 1
        self.stats.video_s = max(self.stats.video_s, t_s)
        self._append_video(patches)

    def _append_audio(self, blocks) -> None:
        t = time.perf_counter()
        for b in blocks:
            self._media("audio", b, b.embeds.shape[0] / AUDIO_TOKENS_PER_SECOND)
        self._sync()
        self.stats.audio_blocks += len(blocks)
        self.stats.prefill_s += time.perf_counter() - t

    def _append_video(self, patches) -> None:
        t = time.perf_counter()
        for p in patches:
            self._media("video", p, 2.0 / self.fps)
        self._sync()
        self.stats.video_patches += len(patches)
        self.stats.prefill_s += time.perf_counter() - t

    def end_turn(self, text: str | None = None) -> None:
        """The user stopped: encode what is left, close the media segment, add the text."""
        t0 = time.perf_counter()
        if self._video is not None:
            t = time.perf_counter()
            patches = self._video.finish()
            self.stats.encode_s += time.perf_counter() - t
            self._append_video(patches)
        if self._audio is not None:
            t = time.perf_counter()
            blocks = self._audio.finish()
            self.stats.encode_s += time.perf_counter() - t
            self._append_audio(blocks)
        if self._audio is not None or self._video is not None:
            t = time.perf_counter()
            self._flush_held()
            self.thinker.end_segment()
            self._sync()
            self.stats.prefill_s += time.perf_counter() - t
        self._text(f"{text or ''}<|im_end|>\n<|im_start|>assistant\n")
        self.stats.end_of_input_s = time.perf_counter() - t0
        self._turn_end = t0
        self._audio = self._video = self._turn_start = None

    def abort_turn(self) -> None:
        """Forget the open user turn (``input_audio_buffer.clear``): the Thinker's and Talker's
        caches are cut back to where it began, as if it never happened."""
        start = getattr(self, "_turn_start", None)
        if start is None:
            return
        self.thinker.truncate(start)
        if self.talker is not None and self.talker.n_prompt > start:
            self.talker.truncate_prompt(start)
        self._audio = self._video = self._turn_start = None
        self._held = {"audio": [], "video": []}

    def say(self, text: str) -> None:
        """A typed user turn (no media)."""
        self.begin_turn(audio=False, video=False)
        self.end_turn(text)

    def reply(self, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
              speak: bool | None = None) -> Iterator[ReplyEvent]:
        """Stream the assistant's reply: text deltas (valid UTF-8) and, when speaking, PCM chunks.

        ``cancel()`` (from any thread) stops it within one Token2Wav chunk; afterwards
        :meth:`truncate_to_played` keeps only what the user heard.
        """
        speak = self.talker is not None if speak is None else speak
        if speak and self.talker is None:
            raise ValueError("this chat has no voice: construct OmniChat(..., voice='Chelsie') to speak")
        self._cancel.clear()
        s, t0 = self.stats, time.perf_counter()
        reply_start = self.thinker.n_tokens
        deltas = TextDeltas(self.tok)
        ids = deltas.ids
        self.reply_codes = []
        if speak:
            v = self.ck.voices[self.voice]
            self._t2w = StreamingToken2Wav.from_config(
                self.ck.token2wav, v["cond"], v["ref_mel"], self.token2wav_config, seed=seed
            )
        ended = False
        steps = self.thinker.decode(max_new_tokens, self.stop_ids, do_sample=temperature > 0,
                                    temperature=temperature, seed=seed)
        for step in steps:
            if not ids and not ended:
                s.ttft_s = time.perf_counter() - self._turn_end
            if step.token in self.stop_ids:
                ended = True
            else:
                if text := deltas.push(step.token):
                    yield ReplyEvent("text", text=text)
            if speak:
                yield from self._speak(self.talker.push(step))
            if self._cancel.is_set():
                break
        if text := deltas.flush():  # what was held back as a partial UTF-8 sequence
            yield ReplyEvent("text", text=text)
        if speak:
            if not self._cancel.is_set():
                for code in self.talker.finish():
                    yield from self._speak([code])
                    if self._cancel.is_set():
                        break
            if not self._cancel.is_set():
                yield from self._audio_events(self._t2w.finish())
            self.talker.end_turn()
        s.cancelled = self._cancel.is_set()
        if not ended:  # length limit or cancel: close the turn ourselves
            self._text("<|im_end|>")
        self._text("\n")
        self._last_reply = (reply_start, len(ids))
        self._reply_end = self.thinker.n_tokens
        self.reply_ids = ids
        s.reply_tokens = len(ids)
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
                self.stats.first_audio_s = time.perf_counter() - self._turn_end
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
        """Keep only the part of the last reply the user heard (``played_samples`` of 24 kHz PCM).

        The Talker generates codec token k from reply text token k (one code = 2 mel frames =
        480 samples), so the user heard about ``ceil(played / 480)`` text tokens. The Thinker's
        context is cut there and the turn closed, so the next turn sees only what was played.
        Returns the number of reply tokens kept.
        """
        if self._last_reply is None:
            raise RuntimeError("no reply to truncate")
        if self.thinker.n_tokens != self._reply_end:  # cutting now would cut the user's new turn
            raise RuntimeError("the conversation has moved on since the last reply (a new turn began); "
                               "truncate it before the next turn starts")
        start, n_text = self._last_reply
        samples_per_code = 480 if self._t2w is None else self._t2w.hop * self._t2w.repeats
        kept = min(n_text, math.ceil(max(0, played_samples) / samples_per_code))
        self.thinker.truncate(start + kept)
        if self.talker is not None and self.talker.n_prompt > start + kept:
            self.talker.truncate_prompt(start + kept)
        self._text("<|im_end|>\n")
        self._last_reply = (start, kept)
        self._reply_end = self.thinker.n_tokens
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


def parse_window(spec: str | None, video: bool = False):
    """``--window``: a token count ("8192") or seconds of media ("600s"); None keeps the growing cache."""
    if not spec:
        return None
    from omnistream.memory.window_cache import WindowConfig

    try:
        if spec.endswith("s"):  # 25 audio tokens/s, plus 64 merged video tokens per 1-s patch
            return WindowConfig.from_seconds(float(spec[:-1]), tokens_per_second=25 + (64 if video else 0))
        return WindowConfig(window_tokens=int(spec))
    except ValueError as e:
        raise ValueError(f"--window {spec!r}: give a token count like 8192 or seconds like 600s ({e})") from e


def run_chat(args) -> int:
    """``omnistream chat``: stream the given inputs through one turn and print the reply."""
    from omnistream.checkpoints import load_omni
    from omnistream.encoders.media import read_audio

    if not (args.audio or args.video or args.text):
        raise ValueError("give at least one input: --audio FILE, --video FILE or --text '...'")
    speak = bool(args.out or args.voice)
    t = time.perf_counter()
    ck = load_omni(args.model, talker=speak, device=args.device)
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
        else:
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
