"""The building blocks of a conversation's turns, kept apart from the turn rules that use them.

:class:`omnistream.engine.conversation.Conversation` owns the rules (framing, decoding, truncation);
what it composes them from lives here, because each is also used on its own elsewhere:

* :class:`SpeechRates`: how reply text, codec tokens and PCM line up (truncation to what was heard;
  the talker's speech limit in codes);
* :func:`parse_window`: a session's cache choice (``auto``, ``none``, tokens, seconds) as a ``WindowConfig``;
* :class:`TurnStats`: where one turn's time went (``OmniChat.stats``; the thinker worker reads its end of input);
* :class:`TextDeltas`: reply text as whole UTF-8 characters (also input transcription's text);
* :class:`SegmentCutter`: a long media turn cut into segments of at most ``segment_s`` seconds.

None of them touches a model: they are plain bookkeeping, testable without a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SAMPLE_RATE", "SegmentCutter", "SpeechRates", "TextDeltas", "TurnStats", "parse_window"]

SAMPLE_RATE = 24000  # Token2Wav's output rate (BigVGAN at 24 kHz)


@dataclass(frozen=True)
class SpeechRates:
    """How reply text, codec tokens and PCM line up, read from the checkpoint's Token2Wav config.

    One codec token is ``repeats`` mel frames (the DiT's ``repeats``) of ``hop`` samples each (the
    product of BigVGAN's ``upsample_rates``): 2 x 240 = 480 samples = 20 ms at 24 kHz in
    Qwen2.5-Omni, so 50 codes per second.
    """

    samples_per_code: int = 480
    sample_rate: int = SAMPLE_RATE

    @property
    def codes_per_second(self) -> float:
        return self.sample_rate / self.samples_per_code

    @classmethod
    def from_checkpoint(cls, ck) -> SpeechRates:
        """From the checkpoint's config (present even when Token2Wav itself was not loaded)."""
        t2w = getattr(ck.config, "token2wav_config", None)
        if t2w is None:
            return cls()
        repeats = int(t2w.dit_config.repeats)
        hop = math.prod(t2w.bigvgan_config.upsample_rates)
        return cls(samples_per_code=repeats * hop)


def parse_window(spec: str | None, video: bool = False):
    """A session's cache choice -> a ``WindowConfig`` or None (the growing cache).

    ``None``, ``""`` or ``"none"``: the growing cache (exact; memory grows with the session).
    ``"auto"``: sinks + a window sized from the model's context (``WindowConfig.resolve``), what
    ``serve`` uses by default so an hour-long call stays bounded. A token count (``"8192"``) or
    seconds of media (``"600s"``: 25 audio tokens/s, plus 64 merged video tokens per 1-s patch).
    """
    if not spec or spec == "none":
        return None
    from omnistream.memory.window_config import WindowConfig

    try:
        if spec == "auto":
            return WindowConfig()
        if spec.endswith("s"):
            return WindowConfig.from_seconds(float(spec[:-1]), tokens_per_second=25 + (64 if video else 0))
        return WindowConfig(window_tokens=int(spec))
    except ValueError as e:
        raise ValueError(f"window {spec!r}: give auto, none, a token count like 8192 or seconds like 600s ({e})") \
            from e


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


class SegmentCutter:
    """Cuts a long media turn into segments of at most ``segment_s`` seconds.

    Why: inside ONE open audio-in-video segment TMRoPE keeps the video tokens' h/w positions at the
    segment start while time advances, so the position span inside a sliding window grows with the
    turn and no shift bounds it; cut segments bound it by about two segments. Audio blocks (2 s)
    and video patches (``2 / fps`` s) that would overflow the open segment are held back until
    every stream of the turn has one, then the cut is made (so each segment gets both audio and
    video); turns shorter than ``segment_s`` are untouched. ``segment_s=None``: never cut.
    """

    def __init__(self, segment_s: float | None, streams: tuple[str, ...], feed, cut):
        self.segment_s, self.streams = segment_s, streams
        self.feed, self.cut = feed, cut  # feed(kind, item); cut(): close the segment and open the next
        self.held: dict[str, list] = {k: [] for k in streams}
        self.seg_s: dict[str, float] = {k: 0.0 for k in streams}
        self.cuts = 0

    def push(self, kind: str, item, seconds: float) -> None:
        if self.segment_s is None:
            self.feed(kind, item)
            return
        self._place(kind, item, seconds)
        while all(self.held[k] for k in self.streams):  # every stream overflows: cut
            self.cut()
            self.cuts += 1
            self.seg_s = {k: 0.0 for k in self.streams}
            for k in self.streams:
                queue, self.held[k] = self.held[k], []
                for it, sec in queue:
                    self._place(k, it, sec)

    def _place(self, kind: str, item, seconds: float) -> None:
        if self.held[kind] or (self.seg_s[kind] > 0 and self.seg_s[kind] + seconds > self.segment_s + 1e-6):
            self.held[kind].append((item, seconds))
        else:
            self.feed(kind, item)
            self.seg_s[kind] += seconds

    def flush(self) -> None:
        """End of turn: what is still held goes into the open segment (the other stream ended)."""
        for k in ("video", "audio"):
            for it, _ in self.held.get(k, []):
                self.feed(k, it)
            self.held[k] = []
