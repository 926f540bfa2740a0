"""Microphone and speaker through `sounddevice` (PortAudio), and `file:PATH` stand-ins for tests/replays.

* Devices are chosen by index or by (a substring of) their name, as PortAudio lists them; a device that
  is not there raises `AudioDeviceError` listing every device present with its index and channels, so
  the fix is in the error message (a robot's USB microphone re-enumerates under another name, say).
* `MicSource` delivers mono float32 blocks from PortAudio's callback through a bounded queue (the oldest
  block is dropped if the consumer falls behind, and counted: a live conversation wants the present).
* `FileSource` replays an audio file (anything PyAV decodes) in blocks, paced at real time by default,
  then reports the end; `FileSink` collects what the speaker would play and writes a WAV on close.

`sounddevice` is imported only when a real device is used (`_sounddevice`): it needs the PortAudio
library (`libportaudio2`), which the code paths with file: endpoints do not, so a machine without it
imports the robot package and replays files fine; asking it for a real device is one configuration error
that names the package to install, not an `OSError` traceback from inside sounddevice.
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("omnistream.robot.audio")


class AudioDeviceError(ValueError):
    """The requested audio device does not exist (the message lists the devices present); a ValueError
    because it is a configuration problem, reported by the CLI as one line."""


def _sounddevice():
    """The sounddevice module, or AudioDeviceError naming the missing system library."""
    try:
        import sounddevice
    except OSError as e:  # sounddevice raises OSError at import when libportaudio is not installed
        raise AudioDeviceError(f"real audio devices need the PortAudio library ({e}): install libportaudio2 "
                               "(apt-get install libportaudio2), or use file: endpoints") from None
    return sounddevice


def list_devices() -> list[dict]:
    sd = _sounddevice()
    return [dict(d, index=i) for i, d in enumerate(sd.query_devices())]


def describe_devices(devices: list[dict]) -> str:
    if not devices:
        return "no audio devices at all (is the device plugged in, and can PortAudio see ALSA/PulseAudio?)"
    return "; ".join(f"[{d['index']}] {d['name']} (in {d['max_input_channels']}, out {d['max_output_channels']})"
                     for d in devices)


def resolve_device(spec: str | int, kind: str = "input", devices: list[dict] | None = None) -> int:
    """Index of the device `spec` (an index or a name substring, case-insensitive) with `kind` channels."""
    devices = list_devices() if devices is None else devices
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    usable = [d for d in devices if d.get(key, 0) > 0]
    s = str(spec).strip()
    if s.lstrip("-").isdigit():
        idx = int(s)
        match = [d for d in usable if d["index"] == idx]
    else:
        match = [d for d in usable if s.lower() in str(d["name"]).lower()]
    if len(match) == 1:
        return int(match[0]["index"])
    why = "matches several" if match else "not found"
    raise AudioDeviceError(f"{kind} audio device {spec!r} {why}; {kind} devices present: "
                           f"{describe_devices(match or usable)}" + ("" if usable or not devices else
                                                                    f" (all devices: {describe_devices(devices)})"))


class FileSource:
    """Blocks of a decoded file, mono float32 at the file's rate, paced at real time if `realtime`."""

    def __init__(self, path: str | Path, block_s: float = 0.04, realtime: bool = True):
        from omnistream.encoders.media import read_audio

        pcm, self.rate = read_audio(path)  # MediaError names a missing/corrupt file
        self.pcm = pcm.mean(axis=1).astype(np.float32)  # (n,)
        self.block = max(1, round(block_s * self.rate))
        self.realtime = realtime
        self.pos = 0
        self._t0: float | None = None

    def read(self) -> np.ndarray | None:
        """The next block, or None at the end of the file."""
        if self.pos >= len(self.pcm):
            return None
        if self.realtime:
            self._t0 = self._t0 or time.monotonic()
            wait = self._t0 + self.pos / self.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        out = self.pcm[self.pos:self.pos + self.block]
        self.pos += self.block
        return out

    def close(self) -> None:
        pass


class MicSource:
    """A PortAudio input stream; `read` returns the next block (or None after `timeout_s` of nothing)."""

    def __init__(self, device: str | int, rate: int = 16000, block_s: float = 0.04, max_queue_s: float = 2.0):
        sd = _sounddevice()

        self.device = resolve_device(device, "input")
        self.rate = rate
        self.dropped = 0
        self.q: queue.Queue = queue.Queue(maxsize=max(1, int(max_queue_s / block_s)))

        def callback(indata, frames, t, status):
            if status:
                log.debug("microphone: %s", status)
            block = indata.mean(axis=1).astype(np.float32).copy()
            try:
                self.q.put_nowait(block)
            except queue.Full:  # the consumer fell behind: keep the present
                self.dropped += 1
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    pass
                self.q.put_nowait(block)

        self.stream = sd.InputStream(device=self.device, channels=1, samplerate=rate,
                                     blocksize=int(block_s * rate), dtype="float32", callback=callback)
        self.stream.start()

    def read(self, timeout_s: float = 1.0) -> np.ndarray | None:
        try:
            return self.q.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


class FileSink:
    """Collects played PCM and writes it as a WAV on close (and on every `flush`)."""

    def __init__(self, path: str | Path, rate: int = 24000):
        self.path, self.rate = Path(path), rate
        self.pieces: list[np.ndarray] = []

    def write(self, pcm: np.ndarray) -> None:
        self.pieces.append(np.asarray(pcm, np.float32).reshape(-1))

    @property
    def samples(self) -> int:
        return sum(len(p) for p in self.pieces)

    def flush(self) -> None:
        from omnistream.encoders.media import write_wav

        write_wav(self.path, np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.float32), self.rate)

    def close(self) -> None:
        self.flush()


class SpeakerSink:
    """A PortAudio output stream (blocking writes pace the caller at real time)."""

    def __init__(self, device: str | int, rate: int = 24000):
        sd = _sounddevice()

        self.device = resolve_device(device, "output")
        self.rate = rate
        self.stream = sd.OutputStream(device=self.device, channels=1, samplerate=rate, dtype="float32")
        self.stream.start()

    def write(self, pcm: np.ndarray) -> None:
        self.stream.write(np.asarray(pcm, np.float32).reshape(-1, 1))

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


def open_source(spec: str, **kw):
    """`file:PATH` or a microphone (sounddevice name or index)."""
    if spec.startswith("file:"):
        return FileSource(spec[5:], **{k: v for k, v in kw.items() if k in ("block_s", "realtime")})
    return MicSource(spec, **{k: v for k, v in kw.items() if k in ("rate", "block_s")})


def open_sink(spec: str, rate: int = 24000):
    """`file:PATH` (a WAV written on close) or a speaker (sounddevice name or index)."""
    if spec.startswith("file:"):
        return FileSink(spec[5:], rate)
    return SpeakerSink(spec, rate)
