"""Media files in and out through PyAV: decode audio of any container, write test videos.

Streaming front ends take PCM and frames; this module is the bridge from files (WAV, FLAC, MP3,
MP4 soundtracks, ...) for the CLI, the demo and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


class MediaError(ValueError):
    """A media file is missing, corrupt or has no stream of the wanted kind."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path``: ``(pcm (n, channels) float32 in [-1, 1], rate)``."""
    import av

    path = str(path)
    if not path.startswith(("rtsp://", "http://", "https://")) and not Path(path).exists():
        raise MediaError(f"audio file {path} does not exist")
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise MediaError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            pieces = []
            for frame in container.decode(stream):
                a = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
                if frame.format.is_planar:
                    a = a.T
                else:
                    a = a.reshape(-1, len(frame.layout.channels))
                if a.dtype == np.int16:
                    a = a.astype(np.float32) / 32768.0
                elif a.dtype == np.int32:
                    a = a.astype(np.float32) / 2147483648.0
                pieces.append(a.astype(np.float32, copy=False))
            rate = stream.rate
    except MediaError:
        raise
    except Exception as e:  # av raises many error types (InvalidDataError, ...)
        raise MediaError(f"cannot decode audio from {path}: {type(e).__name__}: {e}") from e
    if not pieces:
        raise MediaError(f"{path}: audio stream holds no samples")
    return np.concatenate(pieces, axis=0), int(rate)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int = 30) -> Path:
    """Encode RGB uint8 frames ``(H, W, 3)`` to an MP4 (H.264 where available, else MPEG-4)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames)
    h, w = first.shape[:2]
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for img in _chain(first, frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[: h - h % 2, : w - w % 2]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _chain(first, rest):
    yield first
    yield from rest


def write_wav(path: str | Path, pcm: np.ndarray, rate: int = 24000) -> Path:
    """Write mono float32 PCM in [-1, 1] as a 16-bit WAV (what players and `sox` read)."""
    import wave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767.0).round().astype("<i2").tobytes())
    return path
