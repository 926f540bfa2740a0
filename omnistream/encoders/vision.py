"""Streaming video encoder for the Qwen2.5-Omni vision tower.

Why streaming is exact: the Qwen2.5-Omni vision encoder attends only *within* one temporal
patch (two consecutive frames). Both its window attention and its full-attention blocks get one
``cu_seqlens`` segment per temporal patch (``transformers.vision_utils``), and its rotary
positions are (h, w) only, repeated over t. So running the tower on each temporal patch as soon
as its two frames exist gives the same merged tokens as running it once on the whole video with
``grid_t`` = number of temporal patches. The tests check this to 1e-5 in fp32.

Why our own preprocessing: transformers' Qwen2-VL *video* processor needs torchvision, which
has no wheel matching the CPU torch build used here. We therefore reimplement its steps with
torch/numpy and the checkpoint's ``VisionPreprocessing`` settings:

* ``smart_resize`` -- the same rule as Qwen2-VL (sides multiples of 28, pixel count clamped),
  with the *video* pixel bounds ``Qwen2_5OmniProcessor`` passes to its video processor (128*28*28
  to 768*28*28 pixels per frame, or the checkpoint's video_preprocessor_config.json), not the
  image bounds of preprocessor_config.json: a 720x1280 frame becomes 560x1008, as transformers
  makes it, not 728x1288.
* resize with ``F.interpolate(mode="bicubic", antialias=True)``: torch's antialiased bicubic
  uses the same separable kernel (a = -0.5, support scaled when downsampling) as PIL's BICUBIC,
  which the processor uses. The result is rounded and clamped to uint8 levels, because both
  processor backends resize uint8 images and get uint8 back. Remaining differences to PIL are
  at most a level or two per pixel (fixed-point arithmetic in PIL); the test measures it.
* rescale by 1/255, normalize with image_mean/std, and flatten in exactly the processor's
  ``(grid_t*grid_h*grid_w, C*temporal_patch*patch*patch)`` order, with merge-size grouping.

Frame rate: the model sees video at a fixed rate (2 fps for Qwen2.5-Omni); ``FrameResampler``
turns any input rate, including irregular timestamps, into that rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_EPS = 1e-6  # seconds; absorbs float noise in timestamps such as 13 * 0.04


class VideoError(ValueError):
    """A frame, a timestamp or a video source is unusable. The message says which and why."""


# --------------------------------------------------------------------------- preprocessing


def smart_resize(h: int, w: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """Qwen2-VL's resize rule: sides become multiples of ``factor`` (patch * merge = 28), the area
    is kept within [min_pixels, max_pixels], the aspect ratio as close as possible.

    Same code as ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``
    (including Python's round-half-to-even), but raising ``VideoError`` for extreme aspects.
    """
    if h <= 0 or w <= 0:
        raise VideoError(f"frame size {h}x{w} is empty")
    if max(h, w) / min(h, w) > 200:
        raise VideoError(f"absolute aspect ratio must be smaller than 200, got {max(h, w) / min(h, w):.1f}")
    h_bar = round(h / factor) * factor
    w_bar = round(w / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


def target_size(h: int, w: int, prep, *, video: bool = True) -> tuple[int, int]:
    """The resized (height, width) the processor would give a video frame (``video=False``: an
    image) of size h x w: the video and image processors clamp the pixel count differently."""
    lo, hi = (prep.video_min_pixels, prep.video_max_pixels) if video else (prep.min_pixels, prep.max_pixels)
    return smart_resize(h, w, prep.patch_size * prep.merge_size, lo, hi)


def check_frame(frame) -> np.ndarray:
    """Validate one frame and return it as (H, W, 3) uint8 or float32 pixel levels 0..255.

    Accepted: uint8 (H, W, 3) RGB, or float (H, W, 3) RGB in [0, 1] (torch tensors too).
    Everything else raises VideoError *before* any stream state changes, so a caller can
    catch it and keep pushing good frames.
    """
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    if not isinstance(frame, np.ndarray):
        raise VideoError(f"frame must be a numpy array or torch tensor, got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise VideoError(f"frame must be (H, W, 3) RGB, got shape {tuple(frame.shape)}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise VideoError(f"frame is empty: shape {tuple(frame.shape)}")
    if frame.dtype == np.uint8:
        return frame
    if np.issubdtype(frame.dtype, np.floating):
        if not np.isfinite(frame).all():
            raise VideoError("float frame contains NaN or Inf")
        lo, hi = float(frame.min()), float(frame.max())
        if lo < 0.0 or hi > 1.0:
            raise VideoError(f"float frames must be RGB in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return frame.astype(np.float32) * 255.0
    raise VideoError(f"frame dtype must be uint8 (or float in [0, 1]), got {frame.dtype}")


def _resize_like_pil(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float levels -> (3, h, w): PIL-style BICUBIC in two separable passes.

    PIL rounds and clips to uint8 after each pass, so the pass order matters wherever the
    kernel overshoots (sharp edges, noise). Pillow 13 runs the vertical pass first when the
    image shrinks vertically by more than it does horizontally, else the horizontal pass first
    (measured: this rule reproduces PIL on 354 of 359 random size pairs where the order
    matters; natural images differ by at most a level or two either way).
    """
    (H, W), (h, w) = x.shape[1:], size
    mids = [(H, w), (h, w)] if not (H / h > W / w and H > h) else [(h, W), (h, w)]
    x = x[None]  # (1, 3, H, W)
    for mid in mids:
        if tuple(x.shape[2:]) != mid:
            x = F.interpolate(x, size=mid, mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)
    return x[0]


def preprocess_frame(frame: np.ndarray, size: tuple[int, int], prep) -> torch.Tensor:
    """Resize, rescale and normalize one checked frame; returns (3, h, w) float32."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float()  # (3, H, W), 0..255
    if tuple(x.shape[1:]) != tuple(size):
        # bicubic + antialias = PIL's BICUBIC kernel; round/clamp = the processor's uint8 output
        x = _resize_like_pil(x, size)  # (3, h, w), integer levels 0..255
    mean = torch.tensor(prep.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(prep.image_std, dtype=torch.float32)[:, None, None]
    return (x * (1.0 / 255.0) - mean) / std  # (3, h, w)


def flatten_patches(pair: torch.Tensor, prep) -> torch.Tensor:
    """(T=temporal_patch, 3, h, w) normalized frames -> (gh*gw, 3*T*p*p), the processor's order.

    Row order: merge blocks in raster order, and inside each block the merge x merge patches in
    raster order (what the vision tower's merger expects). Column order: channel, then frame,
    then the p x p pixels -- the Conv3d patch embedding's (C, T, p, p) kernel layout.
    """
    tp, c, h, w = pair.shape
    p, m = prep.patch_size, prep.merge_size
    gh, gw = h // p, w // p
    x = pair.reshape(tp, c, gh // m, m, p, gw // m, m, p)  # (T, C, bh, mh, ph, bw, mw, pw)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (bh, bw, mh, mw, C, T, ph, pw)
    return x.reshape(gh * gw, c * tp * p * p).contiguous()


def patchify(frames, prep, size: tuple[int, int] | None = None, *, video: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One temporal patch of 2 RGB frames (H, W, 3) -> (patches (gh*gw, 1176) fp32, grid_thw (1, 3)).

    ``size`` overrides the smart_resize target (used when a stream changes frame size). An image
    is a temporal patch whose two frames are the same image (pass ``video=False``: image bounds).
    """
    frames = [check_frame(f) for f in frames]
    if len(frames) != prep.temporal_patch_size:
        raise VideoError(f"a temporal patch has {prep.temporal_patch_size} frames, got {len(frames)}")
    if size is None:
        size = target_size(frames[0].shape[0], frames[0].shape[1], prep, video=video)
    pair = torch.stack([preprocess_frame(f, size, prep) for f in frames])  # (2, 3, h, w)
    grid = torch.tensor([[1, size[0] // prep.patch_size, size[1] // prep.patch_size]])
    return flatten_patches(pair, prep), grid


# --------------------------------------------------------------------------- resampling


class FrameResampler:
    """Turn frames at any rate (regular or not) into frames at ``target_fps``.

    Rule: sample times are ``s_k = t0 + k / target_fps`` (t0 = first frame's timestamp, so a
    stream that starts at pts 5.3 s is not padded with copies of its first frame). Each sample
    time takes the input frame whose timestamp is nearest; a tie goes to the earlier frame.
    Sample times after the last frame's timestamp are not emitted (there is no frame for them
    yet), so a 3 s clip at 30 fps (last frame 2.967 s) gives s = 0, 0.5, ..., 2.5: 6 frames.
    A slower input than target_fps repeats frames (the model's clock is kept).

    The choice for s_k is final once a frame at or after s_k has arrived, so each emitted frame
    is delayed by at most one input frame interval.
    """

    def __init__(self, target_fps: float = 2.0):
        if not target_fps > 0:
            raise VideoError(f"target_fps must be > 0, got {target_fps}")
        self.fps = float(target_fps)
        self.t0: float | None = None
        self.k = 0  # next sample number
        self._prev = None  # (frame, t) of the last input frame

    def push(self, frame, t_s: float) -> list[tuple[object, float]]:
        """Add one input frame; return the (frame, sample_time_s) pairs that became final."""
        t = float(t_s)
        if not math.isfinite(t):
            raise VideoError(f"timestamp must be finite, got {t_s!r}")
        if self._prev is not None and t <= self._prev[1]:
            raise VideoError(f"timestamps must increase: got {t:.6f} s after {self._prev[1]:.6f} s")
        if self.t0 is None:
            self.t0 = t
        out = []
        while (s := self.t0 + self.k / self.fps) <= t + _EPS:
            prev = self._prev
            if prev is not None and (s - prev[1]) <= (t - s) + _EPS:
                out.append((prev[0], s))
            else:
                out.append((frame, s))
            self.k += 1
        self._prev = (frame, t)
        return out


# --------------------------------------------------------------------------- encoder


@dataclass
class VideoPatch:
    """The vision tower's merged tokens for one temporal patch (two model-rate frames)."""

    embeds: torch.Tensor  # (tokens, out_hidden_size), tokens = h*w / merge**2
    grid_thw: tuple[int, int, int]  # (1, h, w) in patch units
    start_s: float  # sample time of the first frame (input timeline)
    index: int  # temporal patch number, 0-based
    padded: bool = False  # the second frame repeats the first (odd frame count at finish)


class StreamingVideoEncoder:
    """Encode a live video stream with the real vision tower, one temporal patch at a time.

    ``push`` validates a frame, resamples to ``fps``, preprocesses the frames that become final
    and runs the tower as soon as a pair is complete. ``finish`` pads an odd leftover frame by
    repeating it, as the Qwen2-VL video processor does (``videos[:, -1:]`` repeated up to a
    multiple of temporal_patch_size).

    The token grid is fixed by the first frame (the LLM's positions and any cached patches
    assume it). A frame of another size is resized straight to that grid -- one interpolation,
    not two -- and the change is logged once per new size.
    """

    def __init__(self, visual: torch.nn.Module, prep, fps: float = 2.0):
        if prep.temporal_patch_size != 2:
            raise ValueError(f"temporal_patch_size {prep.temporal_patch_size} != 2 is not supported")
        self.visual = visual
        self.prep = prep
        self.resampler = FrameResampler(fps)
        self.size: tuple[int, int] | None = None  # resized (h, w), fixed by the first frame
        self.first_hw: tuple[int, int] | None = None
        self._seen_sizes: set[tuple[int, int]] = set()
        self._pending: list[tuple[torch.Tensor, float]] = []  # (3, h, w) normalized, sample time
        self.index = 0
        self.n_frames = 0  # model-rate frames so far

    def push(self, frame, t_s: float) -> list[VideoPatch]:
        """Add one RGB frame (H, W, 3) at time ``t_s``; return the patches it completed."""
        f = check_frame(frame)
        if f is frame:  # the resampler may hold it for a while; callers often reuse buffers
            f = f.copy()
        hw = (int(f.shape[0]), int(f.shape[1]))
        size = self.size or target_size(*hw, self.prep)  # raises VideoError on absurd aspect
        chosen = self.resampler.push(f, t_s)  # raises on bad timestamps before changing state
        if self.size is None:
            self.size, self.first_hw = size, hw
            self._seen_sizes.add(hw)
        elif hw not in self._seen_sizes:
            self._seen_sizes.add(hw)
            log.info("video frame size changed from %dx%d to %dx%d; resizing to the first frame's "
                     "grid %dx%d", *self.first_hw, *hw, *self.size)
        out = []
        for fr, s in chosen:
            # the tower's grid is fixed by the first frame; later sizes resize straight to it
            self._pending.append((preprocess_frame(fr, self.size, self.prep), s))
            self.n_frames += 1
            if len(self._pending) == 2:
                out.append(self._encode())
        return out

    def finish(self) -> list[VideoPatch]:
        """End of stream: encode a leftover odd frame, paired with a copy of itself."""
        if not self._pending:
            return []
        self._pending.append(self._pending[-1])
        return [self._encode(padded=True)]

    def _encode(self, padded: bool = False) -> VideoPatch:
        pair = torch.stack([x for x, _ in self._pending])  # (2, 3, h, w)
        start = self._pending[0][1]
        self._pending = []
        patches = flatten_patches(pair, self.prep)  # (gh*gw, 1176)
        grid = (1, self.size[0] // self.prep.patch_size, self.size[1] // self.prep.patch_size)
        embeds = encode_patches(self.visual, patches, torch.tensor([grid]))
        vp = VideoPatch(embeds=embeds, grid_thw=grid, start_s=start, index=self.index, padded=padded)
        self.index += 1
        return vp


def encode_patches(visual: torch.nn.Module, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Run the vision tower as ``get_video_features`` does; returns merged tokens (N, out_hidden).

    The result is cloned outside inference mode so callers may use it anywhere (inference
    tensors cannot be saved for backward, e.g. in a fine-tuning or adapter step downstream).
    """
    p = next(visual.parameters())
    with torch.inference_mode():
        out = visual(patches.to(device=p.device, dtype=p.dtype), grid_thw=grid_thw.to(p.device))
    return out.pooler_output.clone()  # (gh*gw / merge**2, out_hidden_size)


# --------------------------------------------------------------------------- sources


def iter_video_frames(source, *, timeout_s: float = 10.0) -> Iterator[tuple[np.ndarray, float]]:
    """Decode a file or URL (rtsp://, http://, ...) with PyAV; yield (RGB uint8 (H, W, 3), t_s).

    Timestamps come from the frames' pts; when a container has none, from index / average rate.
    Frames whose timestamp does not increase are dropped (one log line), so the result can go
    straight into ``FrameResampler``. Every failure (missing file, not a video, truncated data,
    unreachable URL) raises VideoError naming the source.
    """
    import av

    src = str(source)
    opts = {"rtsp_transport": "tcp"} if src.startswith("rtsp://") else {}
    try:
        container = av.open(src, options=opts, timeout=timeout_s)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot open video {src}: {type(e).__name__}: {e}") from e
    with container:
        if not container.streams.video:
            raise VideoError(f"{src} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else 30.0
        last, n, dropped = -math.inf, 0, 0
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else n / rate
                n += 1
                if t <= last:
                    dropped += 1
                    continue
                last = t
                yield frame.to_ndarray(format="rgb24"), float(t)  # (H, W, 3) uint8
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"decoding {src} failed after {n} frames: {type(e).__name__}: {e}") from e
        if n == 0:
            raise VideoError(f"{src}: no decodable video frames (empty or corrupt)")
        if dropped:
            log.info("%s: dropped %d frames with non-increasing timestamps", src, dropped)


class VideoStream:
    """Convenience wrapper: a StreamingVideoEncoder over a loaded checkpoint's vision tower."""

    def __init__(self, encoder: StreamingVideoEncoder):
        self.encoder = encoder

    @classmethod
    def from_checkpoint(cls, ck, fps: float = 2.0) -> VideoStream:
        return cls(StreamingVideoEncoder(ck.thinker.model.visual, ck.vision, fps=fps))

    def push_frame(self, frame, t_s: float) -> list[VideoPatch]:
        return self.encoder.push(frame, t_s)

    def push_file(self, path, time_offset_s: float = 0.0) -> list[VideoPatch]:
        """Push every frame of a file or URL (timestamps shifted by ``time_offset_s``).

        Returns the completed patches; call ``finish()`` at the end of the stream.
        """
        out: list[VideoPatch] = []
        for frame, t in iter_video_frames(path):
            out += self.encoder.push(frame, t + time_offset_s)
        return out

    def finish(self) -> list[VideoPatch]:
        return self.encoder.finish()


# --------------------------------------------------------------------------- synthetic video


def synthetic_frames(n_frames: int, h: int, w: int, fps: float = 30.0, seed: int = 0) -> Iterable:
    """Yield (frame (h, w, 3) uint8, t_s) of moving coloured shapes over a gradient background.

    Deterministic for a seed; used by tests, the demo and the benchmark where no camera exists.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # (h, w)
    base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), 0.5 + 0.0 * xx], -1) * 120  # (h, w, 3)
    shapes = [
        dict(c=rng.uniform(0, 1, 2) * (h, w), v=rng.uniform(-40, 40, 2), r=rng.uniform(0.08, 0.25) * min(h, w),
             col=rng.integers(0, 256, 3), disc=bool(rng.integers(0, 2)))
        for _ in range(3)
    ]
    for i in range(n_frames):
        t = i / fps
        img = base.copy()
        for s in shapes:
            cy, cx = (s["c"] + s["v"] * t) % (h, w)
            if s["disc"]:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= s["r"] ** 2
            else:
                mask = (abs(yy - cy) <= s["r"]) & (abs(xx - cx) <= s["r"])
            img[mask] = s["col"]
        noise = rng.integers(0, 8, (h, w, 3))
        yield np.clip(img + noise, 0, 255).astype(np.uint8), t  # (h, w, 3)
