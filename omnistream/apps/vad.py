"""Server-side voice activity detection with silero-vad, for ``turn_detection: server_vad``.

The server feeds every ``input_audio_buffer.append`` (pcm16 at 24 kHz) to :class:`ServerVad`;
it resamples to 16 kHz (the rate silero-vad was trained at), runs the model over 512-sample
windows (32 ms) and returns ``speech_started`` / ``speech_stopped`` events whose times are in
milliseconds of all audio appended during the session, like the OpenAI Realtime API's
``audio_start_ms`` / ``audio_end_ms``.

Decisions follow silero's own ``VADIterator``: speech starts at the first window whose
probability reaches ``threshold``; it ends once no window has reached ``threshold - 0.15`` for
``silence_duration_ms`` (the hysteresis keeps a word's soft tail from splitting the turn).
``audio_start_ms`` includes ``prefix_padding_ms`` before the detected start (the audio the
server keeps and hands to the model, so the first syllable is not clipped); ``audio_end_ms`` is
where the silence was confirmed, so it includes the silence, as in the OpenAI API.

The silero JIT model ships inside the ``silero-vad`` pip package (no download); each session has
its own copy because the model carries the recurrent state of its stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from omnistream.encoders.audio import PolyphaseResampler

VAD_RATE = 16000
WINDOW = 512  # samples at 16 kHz (32 ms): the window silero-vad v5+ takes at this rate
_lock = threading.Lock()


class VadUnavailable(RuntimeError):
    """silero-vad is not installed: server VAD cannot run (use turn_detection: null)."""


def load_model():
    """A fresh silero-vad JIT model (its own recurrent state)."""
    try:
        from silero_vad import load_silero_vad
    except ImportError as e:
        raise VadUnavailable("server VAD needs the silero-vad package: pip install silero-vad "
                             "(or set turn_detection to null and commit turns yourself)") from e
    with _lock:  # torch.jit.load is not re-entrant across threads; loading from the package is ~80 ms
        return load_silero_vad(onnx=False)


@dataclass
class VadEvent:
    kind: str  # "speech_started" | "speech_stopped"
    ms: int  # audio_start_ms (prefix padding included) or audio_end_ms


class ServerVad:
    """Streaming speech start/stop detection over appended audio of any piece size."""

    def __init__(self, threshold: float = 0.5, silence_duration_ms: int = 500, prefix_padding_ms: int = 300,
                 in_rate: int = 24000, model=None):
        self.threshold = float(threshold)
        self.neg_threshold = max(self.threshold - 0.15, 0.01)
        self.silence_duration_ms = int(silence_duration_ms)
        self.prefix_padding_ms = int(prefix_padding_ms)
        self.in_rate = in_rate
        self.model = model if model is not None else load_model()
        self.resampler = PolyphaseResampler(in_rate, VAD_RATE) if in_rate != VAD_RATE else None
        self.reset()

    def reset(self) -> None:
        """Forget the stream's state (``input_audio_buffer.clear``); time keeps counting."""
        self.model.reset_states()
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples not yet in a full window
        self.in_speech = False
        self._silence_start: int | None = None  # 16 kHz sample where the current silence began
        self.last_prob = 0.0
        if not hasattr(self, "_pos"):
            self._pos = 0  # 16 kHz samples run through the model since the session began

    def configure(self, threshold: float, silence_duration_ms: int, prefix_padding_ms: int) -> None:
        self.threshold, self.neg_threshold = float(threshold), max(float(threshold) - 0.15, 0.01)
        self.silence_duration_ms, self.prefix_padding_ms = int(silence_duration_ms), int(prefix_padding_ms)

    def skip(self, n_in: int) -> None:
        """Advance the clock over ``n_in`` input samples that are not analysed (VAD switched off)."""
        self._pos += round(n_in * VAD_RATE / self.in_rate)

    def push(self, pcm: np.ndarray) -> list[VadEvent]:
        """Append pcm (int16 or float32 in [-1, 1], mono, ``in_rate``); return the events it completed."""
        x = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32, copy=False)
        if self.resampler is not None:
            x = self.resampler.push(x)
        buf = np.concatenate([self._pending, x]) if len(self._pending) else x
        n = len(buf) // WINDOW
        self._pending = buf[n * WINDOW:].copy()
        events: list[VadEvent] = []
        if n == 0:
            return events
        windows = torch.from_numpy(np.ascontiguousarray(buf[: n * WINDOW])).view(n, WINDOW)  # (n, 512)
        with torch.inference_mode():
            for w in windows:  # the model is recurrent: one window at a time, in order
                p = float(self.model(w, VAD_RATE))
                self._step(p, events)
        return events

    def _step(self, p: float, events: list[VadEvent]) -> None:
        start, end = self._pos, self._pos + WINDOW  # this window, in 16 kHz samples
        self._pos = end
        self.last_prob = p
        if p >= self.threshold:
            self._silence_start = None
            if not self.in_speech:
                self.in_speech = True
                ms = max(0, start * 1000 // VAD_RATE - self.prefix_padding_ms)
                events.append(VadEvent("speech_started", int(ms)))
            return
        if not self.in_speech:
            return
        if p < self.neg_threshold and self._silence_start is None:
            self._silence_start = start
        if self._silence_start is not None and (end - self._silence_start) * 1000 >= \
                self.silence_duration_ms * VAD_RATE:
            self.in_speech = False
            self._silence_start = None
            events.append(VadEvent("speech_stopped", int(end * 1000 // VAD_RATE)))
