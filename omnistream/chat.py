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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from omnistream.encoders.audio import AudioStream
from omnistream.encoders.vision import VideoStream, iter_video_frames
from omnistream.talker.thinker import StreamingThinker

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
    decode_s: float = 0.0
    reply_tokens: int = 0
    extra: dict = field(default_factory=dict)


class OmniChat:
    """A multi-turn conversation over a loaded :class:`~omnistream.checkpoints.OmniCheckpoint`."""

    def __init__(self, ck, system_prompt: str | None = SYSTEM_PROMPT, fps: float = 2.0):
        self.ck = ck
        self.tok = ck.tokenizer
        self.fps = fps
        self.thinker = StreamingThinker(ck.thinker, tokenizer=ck.tokenizer)
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = {self.im_end, self.tok.convert_tokens_to_ids("<|endoftext|>")}
        self._audio: AudioStream | None = None
        self._video: VideoStream | None = None
        self.stats = TurnStats()
        if system_prompt:
            self._text(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")

    def _text(self, s: str) -> None:
        t = time.perf_counter()
        self.thinker.append_text(self.tok(s, add_special_tokens=False).input_ids)
        self.stats.prefill_s += time.perf_counter() - t

    # ------------------------------------------------------------------ a user turn
    def begin_turn(self, *, audio: bool, video: bool) -> None:
        """Open a user turn that will stream ``audio`` and/or ``video``."""
        self.stats = TurnStats()
        self._text("<|im_start|>user\n")
        self._audio = AudioStream.from_checkpoint(self.ck) if audio else None
        self._video = VideoStream.from_checkpoint(self.ck, fps=self.fps) if video else None
        spg = 2.0 / self.fps  # seconds per temporal patch of 2 frames
        if audio and video:
            self.thinker.begin_video(spg, with_audio=True)
        elif video:
            self.thinker.begin_video(spg)
        elif audio:
            self.thinker.begin_audio()

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
            self.thinker.append_audio_block(b.embeds)
        self.stats.audio_blocks += len(blocks)
        self.stats.prefill_s += time.perf_counter() - t

    def _append_video(self, patches) -> None:
        t = time.perf_counter()
        for p in patches:
            self.thinker.append_video_patch(p.embeds, p.grid_thw)
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
            self.thinker.end_segment()
            self.stats.prefill_s += time.perf_counter() - t
        self._text(f"{text or ''}<|im_end|>\n<|im_start|>assistant\n")
        self.stats.end_of_input_s = time.perf_counter() - t0
        self._turn_end = t0
        self._audio = self._video = None

    def reply(self, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None) -> Iterator[str]:
        """Stream the assistant's text as it is generated (deltas that are valid UTF-8)."""
        ids: list[int] = []
        shown = ""
        t = time.perf_counter()
        for tok in self.thinker.generate(max_new_tokens, self.stop_ids, temperature=temperature, seed=seed):
            if not ids:
                self.stats.ttft_s = time.perf_counter() - self._turn_end
            if tok in self.stop_ids:
                break
            ids.append(tok)
            text = self.tok.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        else:
            self._text("<|im_end|>")  # hit the length limit: close the turn ourselves
        self._text("\n")
        self.stats.reply_tokens = len(ids)
        self.stats.decode_s = time.perf_counter() - t


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
    t = time.perf_counter()
    ck = load_omni(args.model, talker=False, device=args.device)
    print(f"loaded {args.model} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    chat = OmniChat(ck, system_prompt=args.system or SYSTEM_PROMPT)
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
    for delta in chat.reply(args.max_new_tokens, args.temperature):
        print(delta, end="", flush=True)
    print()
    s = chat.stats
    media_s = max(s.audio_s, s.video_s)
    print(
        f"\n{s.audio_s:.2f}s audio in {s.audio_blocks} blocks, {s.video_frames} frames in {s.video_patches} "
        f"video patches; encode {s.encode_s:.3f}s, prefill {s.prefill_s:.3f}s while streaming\n"
        f"end of input -> prompt ready {s.end_of_input_s * 1000:.0f} ms, time to first token "
        f"{s.ttft_s * 1000:.0f} ms, {s.reply_tokens} tokens in {s.decode_s:.2f}s"
        + (f", streaming real-time factor {(s.encode_s + s.prefill_s) / media_s:.3f}" if media_s else ""),
        file=sys.stderr,
    )
    return 0
