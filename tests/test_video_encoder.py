"""Streaming video encoder: layout, resampling, exactness vs the offline tower, sources, errors.

Oracles are independent of the code under test where it matters: transformers' Qwen2-VL PIL
image processor for the patch layout and resize, a re-derivation of transformers' Qwen2-VL
*video* processor patchify (which itself needs torchvision) for the whole-video layout, the
vision tower run once on the whole video for exactness, and brute-force nearest-frame search
for resampling.
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from omnistream.checkpoints import VisionPreprocessing
from omnistream.encoders.vision import (
    FrameResampler,
    StreamingVideoEncoder,
    VideoError,
    VideoStream,
    patchify,
    preprocess_frame,
    smart_resize,
    synthetic_frames,
    target_size,
)

PREP = VisionPreprocessing()


def video_processor_patchify(frames: torch.Tensor, prep) -> tuple[torch.Tensor, list[int]]:
    """Transcription of transformers' Qwen2VLVideoProcessor.patchify for one video.

    frames: (T, 3, h, w) normalized. Pads an odd T by repeating the last frame, as upstream.
    """
    videos = frames[None]  # (1, T, C, h, w)
    b, t, c, h, w = videos.shape
    if pad := -t % prep.temporal_patch_size:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        t += pad
    p, m, tp = prep.patch_size, prep.merge_size, prep.temporal_patch_size
    gt, gh, gw = t // tp, h // p, w // p
    x = videos.reshape(b, gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]


def offline_embeds(visual, frames: list[np.ndarray], prep) -> torch.Tensor:
    """The vision tower run once on the whole video (grid_t = number of temporal patches)."""
    size = target_size(*frames[0].shape[:2], prep)
    x = torch.stack([preprocess_frame(f, size, prep) for f in frames])  # (T, 3, h, w)
    pixels, grid = video_processor_patchify(x, prep)
    with torch.no_grad():
        return visual(pixels, grid_thw=torch.tensor([grid])).pooler_output


# --------------------------------------------------------------------------- layout


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, (300, 2)).tolist() + [(56, 56), (28, 5000), (70, 90)]:
        if max(h, w) / min(h, w) > 200:
            continue
        for mn, mx in [(3136, 12845056), (128 * 28 * 28, 768 * 28 * 28)]:
            assert smart_resize(h, w, 28, mn, mx) == ref(h, w, 28, mn, mx)
    with pytest.raises(VideoError):
        smart_resize(10, 5000)


def _processor_video_bounds() -> tuple[int, int]:
    """The per-frame pixel bounds transformers' Qwen2_5OmniProcessor gives its video processor."""
    from transformers import Qwen2_5OmniProcessor

    size = Qwen2_5OmniProcessor.videos_kwargs["size"]
    return size["shortest_edge"], size["longest_edge"]


@pytest.mark.parametrize("hw", [(720, 1280), (1080, 1920), (480, 640), (84, 112), (2160, 3840), (1280, 720), (28, 900)])
def test_video_frames_use_the_processors_video_pixel_bounds(hw):
    # the video processor's module needs torchvision (not installable here); its smart_resize is the
    # same function as the PIL image processor's, which test_smart_resize_matches_transformers pins
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    lo, hi = _processor_video_bounds()
    assert (PREP.video_min_pixels, PREP.video_max_pixels) == (lo, hi)
    expected = ref(*hw, factor=28, min_pixels=lo, max_pixels=hi)
    assert target_size(*hw, PREP) == expected
    if hw == (720, 1280):
        assert expected == (560, 1008)  # not the image bounds' 728x1288
        assert target_size(*hw, PREP, video=False) == (728, 1288)
    enc = StreamingVideoEncoder(torch.nn.Identity(), PREP)
    enc.push(np.zeros((*hw, 3), np.uint8), 0.0)  # the stream's grid is fixed by the first frame
    assert enc.size == expected


def test_a_checkpoints_video_processor_overrides_the_bounds(tiny_dir, tmp_path):
    import json
    import shutil

    from omnistream.checkpoints import load_omni

    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    (d / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 64 * 28 * 28,
                                                                   "longest_edge": 256 * 28 * 28}}))
    prep = load_omni(d, talker=False).vision
    assert (prep.video_min_pixels, prep.video_max_pixels) == (64 * 28 * 28, 256 * 28 * 28)
    assert prep.max_pixels == PREP.max_pixels  # the image bounds are untouched
    assert target_size(720, 1280, prep) == smart_resize(720, 1280, 28, 64 * 28 * 28, 256 * 28 * 28)


@pytest.mark.parametrize("hw", [(84, 112), (70, 90), (130, 61), (100, 140), (57, 139), (20, 30)])
def test_patch_layout_matches_qwen2vl_image_processor(hw):
    pytest.importorskip("PIL")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(
        min_pixels=PREP.min_pixels,
        max_pixels=PREP.max_pixels,
        image_mean=list(PREP.image_mean),
        image_std=list(PREP.image_std),
    )
    level = 1 / 255 / min(PREP.image_std)  # one uint8 level after normalization
    for seed in range(2):
        img = next(iter(synthetic_frames(1, *hw, seed=seed)))[0]  # (H, W, 3)
        ref = proc(images=[img], return_tensors="np")
        ours, grid = patchify([img, img], PREP, video=False)  # an image = a temporal patch of 2 equal frames
        assert grid.tolist() == ref["image_grid_thw"].tolist()
        assert ours.dtype == torch.float32 and ours.shape == ref["pixel_values"].shape
        diff = np.abs(ours.numpy() - ref["pixel_values"])
        if tuple(hw) == smart_resize(*hw, 28, PREP.min_pixels, PREP.max_pixels):  # no resize: layout only
            assert diff.max() <= 1e-5
        else:  # torch's antialiased bicubic vs PIL's fixed point: a level, rarely
            assert diff.max() <= 1.01 * level
            assert (diff > 1e-5).mean() < 0.01


def test_streaming_layout_equals_video_processor_layout():
    """Per-pair flattening concatenated == the video processor's grid_t > 1 layout."""
    frames = [f for f, _ in synthetic_frames(6, 84, 140, seed=3)]
    size = target_size(84, 140, PREP, video=False)  # small: the layout, not the resize, is under test
    x = torch.stack([preprocess_frame(f, size, PREP) for f in frames])
    whole, grid = video_processor_patchify(x, PREP)
    pairs = [patchify(frames[i : i + 2], PREP, size) for i in range(0, 6, 2)]
    assert grid == [3, 6, 10] and all(g.tolist() == [[1, 6, 10]] for _, g in pairs)
    assert torch.equal(torch.cat([p for p, _ in pairs]), whole)


# --------------------------------------------------------------------------- resampling


def nearest_oracle(times: list, fps) -> list[int]:
    """Brute force: for s_k = t0 + k/fps <= t_last, the index of the nearest time (ties: earlier)."""
    t0, out, k = times[0], [], 0
    while (s := t0 + Fraction(k) / fps) <= times[-1]:
        out.append(min(range(len(times)), key=lambda i: (abs(times[i] - s), i)))
        k += 1
    return out


def run_resampler(times, fps=2.0) -> tuple[list[int], list[float]]:
    r = FrameResampler(fps)
    picked = [r.push(i, float(t)) for i, t in enumerate(times)]
    flat = [x for p in picked for x in p]
    return [i for i, _ in flat], [s for _, s in flat]


@pytest.mark.parametrize(
    "in_fps, n, expected",
    [
        (30, 90, [0, 15, 30, 45, 60, 75]),
        (25, 75, [0, 12, 25, 37, 50, 62]),  # 0.5 s falls between frames 12 and 13: earlier wins
        (1, 4, [0, 0, 1, 1, 2, 2, 3]),  # slower than 2 fps: frames repeat, the clock is kept
    ],
)
def test_resampler_regular(in_fps, n, expected):
    times = [Fraction(i, in_fps) for i in range(n)]
    assert nearest_oracle(times, 2) == expected
    idx, samples = run_resampler(times)
    assert idx == expected
    assert samples == pytest.approx([k / 2 for k in range(len(expected))])


def test_resampler_irregular_and_offset():
    rng = np.random.default_rng(7)
    for trial in range(20):
        gaps = rng.exponential(1 / 20, size=int(rng.integers(2, 200)))
        times = [Fraction(float(x)).limit_denominator(10**6) for x in 3.7 + np.cumsum(gaps)]
        idx, samples = run_resampler(times)
        assert idx == nearest_oracle(times, 2)
        assert samples[0] == pytest.approx(float(times[0]))  # the clock starts at the first frame


def test_resampler_rejects_bad_timestamps_and_continues():
    r = FrameResampler(2.0)
    assert len(r.push("a", 0.0)) == 1
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(VideoError):
            r.push("x", bad)
    assert [f for f, _ in r.push("b", 1.0)] == ["a", "b"]  # 0.5 s: tie -> the earlier frame


# --------------------------------------------------------------------------- exactness


def test_streaming_equals_offline_tower(tiny):
    visual = tiny.thinker.model.visual
    rng = np.random.default_rng(11)
    for case in range(6):
        h, w = (int(v) for v in rng.integers(56, 141, 2))
        while h % 28 == 0 or w % 28 == 0:
            h, w = (int(v) for v in rng.integers(56, 141, 2))
        n = int(rng.integers(1, 10))
        frames = [f for f, _ in synthetic_frames(n, h, w, seed=case)]
        enc = StreamingVideoEncoder(visual, tiny.vision, fps=2.0)
        got = []
        for k, f in enumerate(frames):  # at model rate: every frame is kept
            new = enc.push(f, k * 0.5)
            assert len(new) == (1 if k % 2 else 0)  # a patch as soon as its pair is complete
            got += new
        got += enc.finish()
        assert [p.index for p in got] == list(range(math.ceil(n / 2)))
        assert [p.start_s for p in got] == pytest.approx([i * 1.0 for i in range(len(got))])
        assert [p.padded for p in got] == [False] * (n // 2) + [True] * (n % 2)
        gh, gw = (s // 14 for s in smart_resize(h, w, 28, PREP.video_min_pixels, PREP.video_max_pixels))
        assert all(p.grid_thw == (1, gh, gw) for p in got)
        stream = torch.cat([p.embeds for p in got])  # (tokens, out_hidden)
        ref = offline_embeds(visual, frames, tiny.vision)
        assert stream.shape == ref.shape == (math.ceil(n / 2) * gh * gw // 4, visual.config.out_hidden_size)
        assert (stream - ref).abs().max().item() <= 1e-5, (h, w, n)


def test_bad_frames_raise_and_stream_continues(tiny):
    visual = tiny.thinker.model.visual
    good = [f for f, _ in synthetic_frames(5, 70, 90, seed=5)]
    enc = StreamingVideoEncoder(visual, tiny.vision)
    nan = good[0].astype(np.float32) / 255
    nan[3, 4, 1] = np.nan
    bad = [
        (good[0].astype(np.int16), "dtype"),
        (good[0][..., :2], "(H, W, 3)"),
        (np.dstack([good[0], good[0][..., :1]]), "(H, W, 3)"),
        (good[0][..., 0], "(H, W, 3)"),
        (nan, "NaN"),
        (good[0].astype(np.float32), "[0, 1]"),
        (good[0][:0], "empty"),
        ("not a frame", "numpy array"),
    ]
    got = []
    for k, f in enumerate(good):
        for b, words in bad:
            with pytest.raises(VideoError, match=re.escape(words)):
                enc.push(b, k * 0.5 + 0.1)
        if k:
            with pytest.raises(VideoError, match="increase"):
                enc.push(f, (k - 1) * 0.5)
        # float frames in [0, 1] are valid and equal their uint8 source
        got += enc.push(f.astype(np.float32) / 255 if k == 2 else f, k * 0.5)
    got += enc.finish()
    ref = offline_embeds(visual, good, tiny.vision)
    assert (torch.cat([p.embeds for p in got]) - ref).abs().max().item() <= 1e-5


def test_frame_size_change_resizes_to_first_grid(tiny, caplog):
    enc = StreamingVideoEncoder(tiny.thinker.model.visual, tiny.vision)
    a = [f for f, _ in synthetic_frames(2, 84, 112, seed=1)]
    b = [f for f, _ in synthetic_frames(4, 120, 200, seed=2)]
    with caplog.at_level(logging.INFO, logger="omnistream.encoders.vision"):
        out = enc.push(a[0], 0.0) + enc.push(a[1], 0.5)
        for k, f in enumerate(b):
            out += enc.push(f, 1.0 + 0.5 * k)
    gh, gw = (s // 14 for s in smart_resize(84, 112, 28, PREP.video_min_pixels, PREP.video_max_pixels))
    assert (gh, gw) == (20, 28)  # 84x112 is below the video minimum: upscaled to 280x392, as the processor does
    assert len(out) == 3 and all(p.grid_thw == (1, gh, gw) for p in out)
    assert sum("size changed" in r.getMessage() for r in caplog.records) == 1


# --------------------------------------------------------------------------- files


def write_mp4(path, seconds=3.0, fps=30, h=80, w=96):
    av = pytest.importorskip("av")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    frames = list(synthetic_frames(int(seconds * fps), h, w, fps=fps, seed=9))
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f, _ in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return frames


def test_push_file_mp4(tiny, tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(path)  # 90 frames at 30 fps, last at 2.967 s
    stream = VideoStream.from_checkpoint(tiny, fps=2.0)
    patches = stream.push_file(path) + stream.finish()
    n_model_frames = len(nearest_oracle([Fraction(i, 30) for i in range(90)], 2))  # 6
    assert len(patches) == math.ceil(n_model_frames / 2) == 3
    assert [p.start_s for p in patches] == pytest.approx([0.0, 1.0, 2.0], abs=1e-3)
    gh, gw = (s // 14 for s in smart_resize(80, 96, 28, PREP.video_min_pixels, PREP.video_max_pixels))
    assert all(p.grid_thw == (1, gh, gw) and p.embeds.shape == (gh * gw // 4, 64) for p in patches)
    assert torch.isfinite(torch.cat([p.embeds for p in patches])).all()


def test_bad_sources_raise_video_error(tiny, tmp_path):
    good = tmp_path / "good.mp4"
    write_mp4(good, seconds=1.0)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    missing = tmp_path / "nope" / "missing.mp4"
    stream = VideoStream.from_checkpoint(tiny)
    for p in (truncated, garbage, missing):
        with pytest.raises(VideoError, match=re.escape(str(p))):
            stream.push_file(p)
    assert len(stream.push_file(good) + stream.finish()) == 1  # still usable afterwards
