"""The input audio buffer of one Realtime session, with server VAD.

With ``turn_detection: server_vad`` only speech (and its prefix padding) reaches the model, so a
long silence does not fill the context: appended audio is kept in a short history until the VAD
says speech started, then streamed into the user turn until it says speech stopped. Without
turn detection every appended sample joins the turn.

:meth:`InputBuffer.append` is plain synchronous state + the silero model and returns what the
session must do, in order (:class:`Step` s: audio to push into the turn, ``speech_started``,
``speech_stopped``), so the session can run it on a worker thread -- the VAD costs ~30 ms per
second of audio, and a 15 MiB append holds minutes -- and then apply the steps on the event
loop. One session's appends are awaited one after the other, so its order is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnistream.apps.realtime_config import SAMPLE_RATE  # pcm16 in, as the OpenAI Realtime API


@dataclass
class Step:
    """One thing the session does after an append: ``kind`` "audio" (``pcm`` joins the open
    turn), "speech_started" or "speech_stopped" (``ms``: audio_start_ms / audio_end_ms)."""

    kind: str
    pcm: np.ndarray | None = None  # (n,) int16 at 24 kHz
    ms: int = 0


class InputBuffer:
    """Appended audio -> turn audio + VAD steps. Times are samples of all audio appended in the
    session (``audio_pos``), as the protocol's ``audio_start_ms`` / ``audio_end_ms``."""

    def __init__(self):
        self.vad = None  # a ServerVad once turn detection is on
        self.audio_pos = 0  # 24 kHz samples appended during the session
        self.hist = np.zeros(0, np.int16)  # VAD mode: recent audio from hist_pos on, not yet in a turn
        self.hist_pos = 0
        self.speaking = False  # the VAD is inside speech: appended audio joins the turn
        self.turn_from = 0  # VAD mode: first sample of the current turn not yet handed out

    def set_vad(self, vad) -> None:
        """Turn detection starts: the VAD's clock begins at the audio appended so far."""
        self.vad = vad
        vad.skip(self.audio_pos)

    def append(self, pcm: np.ndarray, td) -> list[Step]:
        """Take appended pcm ((n,) int16); ``td`` is the session's TurnDetection or None (manual)."""
        steps: list[Step] = []
        if len(pcm) == 0:
            return steps
        self.audio_pos += len(pcm)
        if td is None or self.vad is None:
            if self.vad is not None:
                self.vad.skip(len(pcm))
            steps.append(Step("audio", pcm))
            return steps
        self.hist = np.concatenate([self.hist, pcm])
        for e in self.vad.push(pcm):
            p = e.ms * SAMPLE_RATE // 1000
            if e.kind == "speech_started":
                self.turn_from = max(p, self.hist_pos)
                self.speaking = True
                steps.append(Step("speech_started", ms=e.ms))
            elif self.speaking:
                self._take(min(p, self.audio_pos), steps)
                self.speaking = False
                steps.append(Step("speech_stopped", ms=e.ms))
                self._drop(p)
        if self.speaking:
            self._take(self.audio_pos, steps)
            self._drop(self.audio_pos)
        else:  # keep enough for the prefix padding of a start detected up to a window late
            self._drop(self.audio_pos - (td.prefix_padding_ms + 300) * SAMPLE_RATE // 1000)
        return steps

    def flush(self, reset_vad: bool = True) -> np.ndarray | None:
        """End speech now (a commit, a reply or typed text mid-speech; VAD switched off): the
        speech not yet handed out, or None. The VAD starts afresh unless ``reset_vad`` is False."""
        if not self.speaking:
            return None
        steps: list[Step] = []
        self._take(self.audio_pos, steps)
        if reset_vad and self.vad is not None:
            self.vad.reset()
        self.speaking = False
        return steps[0].pcm if steps else None

    def clear(self) -> None:
        """``input_audio_buffer.clear``: forget the speech so far and the VAD's state."""
        if self.vad is not None:
            self.vad.reset()
        self.speaking = False
        self._drop(self.audio_pos)
        self.turn_from = self.audio_pos

    def _take(self, end: int, steps: list[Step]) -> None:
        a, b = self.turn_from - self.hist_pos, end - self.hist_pos
        if b > a:
            steps.append(Step("audio", self.hist[max(a, 0):b]))
            self.turn_from = end

    def _drop(self, before: int) -> None:
        k = min(max(before - self.hist_pos, 0), len(self.hist))
        if k:
            self.hist = self.hist[k:].copy()
            self.hist_pos += k
