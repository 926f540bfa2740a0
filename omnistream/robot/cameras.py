"""Cameras read latest-only in a background thread: V4L2 devices, RTSP/HTTP streams and files through
PyAV, and (in zmq_robot.py, built on `ThreadedCamera`) a robot process's published camera; `devices.open_camera`
picks one for a source string.

A robot acts on what it sees *now*: a reader thread decodes continuously and keeps only the newest frame
(older ones are dropped and counted), and `read_latest(max_age_s)` returns None when even the newest is
too old -- the navigation loop treats that as "camera lost" and stops the base.

When the stream is lost (device unplugged, network down, end of a file, decoder error) the reader
reconnects with exponential back-off (`backoff_s` doubling up to `max_backoff_s`, reset by the first
good frame), forever: a robot has no one to restart its camera. A file therefore replays (paced at its
own frame rate, as a live camera would deliver it), which is what the tests and replays use.

Sources: ``/dev/videoN`` (or ``v4l2:/dev/videoN``), ``rtsp://...``, ``http(s)://...`` (MJPEG, HLS),
``file:PATH`` or a plain path.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from omnistream.robot.interfaces import Camera

log = logging.getLogger("omnistream.robot.camera")


class ThreadedCamera(Camera):
    """Reader thread + latest frame + stats; subclasses implement `_open` and `_frames`."""

    def __init__(self, name: str, backoff_s: float = 0.5, max_backoff_s: float = 10.0):
        self.name = name
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.width = self.height = 0
        self._lock = threading.Lock()
        self._latest: tuple[np.ndarray, float, float] | None = None  # frame, monotonic capture, wall capture
        self._unread = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames = 0  # frames decoded
        self.read = 0  # frames handed to read_latest callers
        self.overwritten = 0  # decoded frames replaced before anyone read them (latest-only at work)
        self.reconnects = 0
        self.backoffs: list[float] = []  # the waits before each reconnect (the tests check the back-off)
        self.last_error: str | None = None
        self.is_open = False

    # subclasses -------------------------------------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _frames(self):
        """Yield (rgb (H, W, 3) uint8, wall capture time) until the stream ends; raise on errors."""
        raise NotImplementedError

    def _close(self) -> None:
        pass

    # the reader -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()

    def disconnect(self, timeout_s: float = 1.0) -> None:
        """Stop the reader; bounded: a reader stuck opening a stream (a daemon thread) is left behind."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        delay = self.backoff_s
        first = True
        while not self._stop.is_set():
            if not first:
                self.reconnects += 1
                self.backoffs.append(delay)
                log.warning("camera %s: %s; reconnecting in %.2f s", self.name, self.last_error, delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.max_backoff_s)
            first = False
            try:
                self._open()
                self.is_open = True
                for rgb, wall in self._frames():
                    self._put(rgb, wall)
                    delay = self.backoff_s  # a good frame: the next loss starts the back-off over
                    if self._stop.is_set():
                        break
                self.last_error = "stream ended"
            except Exception as e:  # noqa: BLE001 - any decoder/network error is a lost stream, never a crash
                self.last_error = f"{type(e).__name__}: {e}"
            finally:
                self.is_open = False
                try:
                    self._close()
                except Exception as e:  # noqa: BLE001
                    log.debug("camera %s: close failed: %s", self.name, e)

    def _put(self, rgb: np.ndarray, wall: float) -> None:
        age = max(0.0, time.time() - wall)
        with self._lock:
            if self._unread:
                self.overwritten += 1
            self._latest = (rgb, time.monotonic() - age, wall)
            self._unread = True
            self.frames += 1
            self.height, self.width = rgb.shape[:2]

    def read_latest(self, max_age_s: float | None = None, wait_s: float = 0.0):
        end = time.monotonic() + wait_s
        while True:
            with self._lock:
                got = self._latest
                fresh = got is not None and (max_age_s is None or time.monotonic() - got[1] <= max_age_s)
                if fresh:
                    if self._unread:
                        self.read += 1
                    self._unread = False
                    return got[0], got[1]
            if time.monotonic() >= end:
                return None
            time.sleep(0.005)

    @property
    def capture_wall_time(self) -> float | None:
        with self._lock:
            return self._latest[2] if self._latest else None

    @property
    def connected(self) -> bool:
        return self.is_open

    def stats(self) -> dict:
        return {"frames": self.frames, "read": self.read, "overwritten": self.overwritten,
                "reconnects": self.reconnects, "last_error": self.last_error, "open": self.is_open}


def parse_source(source: str) -> tuple[str, str | None, dict]:
    """(url/path for av.open, format, options) for a camera source string."""
    src = source.removeprefix("file:")
    src = src.removeprefix("v4l2:")
    if src.startswith("/dev/video"):
        return src, "v4l2", {}
    if src.startswith("rtsp://"):
        return src, None, {"rtsp_transport": "tcp", "timeout": "5000000"}  # microseconds
    if src.startswith(("http://", "https://")):
        return src, None, {"timeout": "5000000", "reconnect": "0"}  # we reconnect, with back-off
    return src, None, {}


class AvCamera(ThreadedCamera):
    """PyAV camera: devices and live streams as fast as they come, files paced at their frame rate."""

    def __init__(self, source: str, *, width: int | None = None, height: int | None = None, fps: float | None = None,
                 realtime_files: bool = True, **kw):
        super().__init__(source, **kw)
        self.source = source
        self.url, self.format, self.options = parse_source(source)
        if self.format == "v4l2":
            if width and height:
                self.options["video_size"] = f"{width}x{height}"
            if fps:
                self.options["framerate"] = str(fps)
        self.live = self.format == "v4l2" or "://" in self.url
        self.realtime_files = realtime_files
        self._container = None

    def _open(self) -> None:
        import av

        self._container = av.open(self.url, format=self.format, options=self.options, timeout=5.0)
        if not self._container.streams.video:
            raise RuntimeError(f"{self.url} has no video stream")

    def _frames(self):
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = None
        for frame in self._container.decode(stream):
            if self._stop.is_set():
                return
            if not self.live and self.realtime_files and frame.time is not None:
                t0 = t0 if t0 is not None else time.monotonic() - frame.time
                wait = t0 + frame.time - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
            yield frame.to_ndarray(format="rgb24"), time.time()

    def _close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
