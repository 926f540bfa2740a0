"""Streaming audio front end vs. the offline oracles: WhisperFeatureExtractor and the audio tower."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

from omnistream.encoders.audio import (
    AudioStream,
    PcmConverter,
    PcmError,
    StreamingAudioEncoder,
    StreamingLogMel,
    measure_clamp_rule,
    to_mono_16k,
)


@pytest.fixture(scope="module")
def fe(tiny):
    return tiny.feature_extractor


@pytest.fixture(scope="module")
def tower(tiny):
    return tiny.thinker.model.audio_tower


def offline_features(fe, x: np.ndarray, full: bool = False) -> torch.Tensor:
    """The processor's path: padding="max_length", features cut to the attention-mask sum.

    ``full=False`` pads to a shorter max_length (a multiple of the hop, >= n + 800 samples) to
    keep the test fast; test_short_padding_oracle_equals_default checks that it changes nothing.
    """
    kw = {} if full else {"max_length": ((len(x) + 800) // 160 + 1) * 160}
    out = fe(x, sampling_rate=16000, padding="max_length", return_attention_mask=True, **kw)
    n = int(out["attention_mask"].sum())
    return torch.from_numpy(out["input_features"][0, :, :n])  # (128, n)


def offline_tower(tower, mel: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return tower(input_features=mel, feature_lens=torch.tensor([mel.shape[1]])).last_hidden_state


def loud_noise(n: int, seed: int) -> np.ndarray:
    """White noise at 0.3 RMS: all mel bins sit within 8 decades of the maximum, so the
    whole-utterance clamp never binds (asserted on the oracle where it matters)."""
    return (np.random.default_rng(seed).standard_normal(n) * 0.3).astype(np.float32)


def speechlike(seconds: float, seed: int = 0, rms: float = 0.1) -> np.ndarray:
    """Noise stand-in for speech: one-pole low-passed noise with a ~3.7 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    w = rng.standard_normal(n)
    y = np.empty(n)
    acc = 0.0
    for i in range(n):  # low-pass: falling spectrum like voiced speech
        acc = 0.95 * acc + w[i]
        y[i] = acc
    t = np.arange(n) / 16000
    y *= np.clip(0.6 * np.sin(2 * np.pi * 3.7 * t + rng.uniform(0, 6)) + 0.4, 0, None) ** 2
    return (y / np.sqrt(np.mean(y**2)) * rms).astype(np.float32)


def pieces(rng, total: int, lo: int, hi: int) -> list[int]:
    out, done = [], 0
    while done < total:
        out.append(min(int(rng.integers(lo, hi + 1)), total - done))
        done += out[-1]
    return out


def stream_mel(fe, x: np.ndarray, sizes: list[int], **kw) -> torch.Tensor:
    sm, outs, i = StreamingLogMel(fe, **kw), [], 0
    for k in sizes:
        outs.append(sm.push(x[i : i + k]))
        i += k
    return torch.cat(outs + [sm.finish()], dim=1)


def test_short_padding_oracle_equals_default(fe):
    x = loud_noise(12345, 0)
    assert torch.equal(offline_features(fe, x), offline_features(fe, x, full=True))


@pytest.mark.parametrize("n", [1, 7, 200, 201, 399, 1600, 5003, 20000])
def test_logmel_matches_offline_for_any_chunking(fe, n):
    x = loud_noise(n, n)
    ref = offline_features(fe, x)
    assert ref.min() > ref.max() - 2.0 + 1e-3  # (x+4)/4 units: the offline clamp did not bind
    rng = np.random.default_rng(n)
    chunkings = [[1] * n if n <= 5003 else [7] * (n // 7) + [n % 7], [160] * (n // 160) + [n % 160],
                 [399] * (n // 399) + [n % 399], pieces(rng, n, 1, 3000), [n]]
    for sizes in chunkings:
        got = stream_mel(fe, x, sizes)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5


def test_logmel_emits_frames_as_soon_as_window_complete(fe):
    sm = StreamingLogMel(fe)
    assert sm.push(loud_noise(200, 1)).shape == (128, 0)  # frame 0 needs sample 200 (reflection)
    assert sm.push(loud_noise(1, 2)).shape == (128, 1)
    assert sm.push(loud_noise(159, 3)).shape == (128, 1)  # frame 1 needs samples up to 359
    assert sm.push(loud_noise(159, 4)).shape == (128, 0)  # 519 samples: frame 2 needs 520
    assert sm.push(loud_noise(1, 5)).shape == (128, 1)
    assert sm.finish().shape == (128, 1)  # ceil(520 / 160) = 4 frames in all


def test_tower_blockwise_equals_offline(tower):
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    totals = [1, 3, 37, 199, 200, 400, 600, 523, 871] + [int(t) for t in rng.integers(1, 900, 4)]
    for total in totals:
        mel = torch.randn(128, total, generator=g)
        ref = offline_tower(tower, mel)
        assert ref.shape[0] == StreamingAudioEncoder.n_tokens(total)
        for lo, hi in [(1, 5), (1, 450), (150, 700)]:
            enc, outs, i = StreamingAudioEncoder(tower), [], 0
            for k in pieces(rng, total, lo, hi):
                blocks = enc.push(mel[:, i : i + k])
                i += k
                assert all(b.shape[0] == 50 for b in blocks)  # full blocks leave at once
                assert enc._n_pending < 200
                outs += blocks
            outs += enc.finish()
            got = torch.cat(outs) if outs else ref[:0]
            assert got.shape == ref.shape
            assert (got - ref).abs().max() <= 1e-5 if ref.numel() else True


@pytest.mark.parametrize("n", [100, 3200, 31999, 32000, 64160, 75001])
def test_frame_and_token_counts_match_processor(tiny, fe, n):
    x = loud_noise(n, n)
    n_feat = offline_features(fe, x).shape[1]  # the attention-mask sum
    n_tok = int(_get_feat_extract_output_lengths(torch.tensor(n_feat)))
    stream = AudioStream.from_checkpoint(tiny)
    blocks = [b for i in range(0, n, 4000) for b in stream.push(x[i : i + 4000])] + stream.finish()
    assert sum(b.n_frames for b in blocks) == n_feat
    assert sum(b.n_tokens for b in blocks) == n_tok
    assert [b.start_s for b in blocks] == [2.0 * i for i in range(len(blocks))]
    assert [b.final for b in blocks] == [False] * (len(blocks) - 1) + [True]
    dim = tiny.thinker.model.audio_tower.proj.out_features
    assert all(b.embeds.shape == (b.n_tokens, dim) for b in blocks)


BAD = [
    (np.array([0.1, np.nan, 0.2], np.float32), "NaN/inf"),
    (np.array([0.1, np.inf], np.float64), "NaN/inf"),
    (np.zeros(100, np.int32), "dtype int32"),
    (np.zeros(100, bool), "dtype bool"),
    (np.zeros((10, 2, 2), np.float32), "3 dimensions"),
    (np.zeros((100, 9), np.float32), "9 channels"),
    (np.full(100, 3000.0, np.float32), "int16-scaled"),
    ("not audio", "numpy array, got str"),
]


def test_bad_input_rejected_and_stream_continues(tiny, fe, tower):
    a, b = loud_noise(17000, 1), loud_noise(30001, 2)
    stream = AudioStream.from_checkpoint(tiny)
    blocks = stream.push(a[:9000])
    for bad, msg in BAD:
        with pytest.raises(PcmError, match=msg) as e:
            stream.push(bad)
        assert "expected" in str(e.value)
    with pytest.raises(PcmError, match="sample rate changed"):
        stream.push(a[:10], sample_rate=48000)
    blocks += stream.push(a[9000:]) + stream.push(b) + stream.finish()
    ref = offline_tower(tower, offline_features(fe, np.concatenate([a, b])))
    got = torch.cat([blk.embeds for blk in blocks])
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="reset"):
        stream.push(a)
    stream.reset()  # a fresh stream on the same object
    ref_a = offline_tower(tower, offline_features(fe, a))
    got_a = torch.cat([blk.embeds for blk in stream.push(a) + stream.finish()])
    assert got_a.shape == ref_a.shape and (got_a - ref_a).abs().max() <= 1e-5


def test_empty_pcm_is_fine(tiny):
    assert to_mono_16k(np.zeros(0, np.int16), 48000).shape == (0,)
    stream = AudioStream.from_checkpoint(tiny)
    assert stream.push(np.zeros((0, 2), np.float32)) == [] and stream.finish() == []


def test_stereo_int16_48k_downmixed_and_resampled(tiny, caplog):
    sr, secs = 48000, 2.5
    t = np.arange(int(sr * secs)) / sr
    left = 0.6 * np.sin(2 * np.pi * 1000 * t)
    right = 0.2 * np.sin(2 * np.pi * 1000 * t) + 0.4 * np.sin(2 * np.pi * 5000 * t)
    pcm = np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)  # (n, 2)
    conv, parts = PcmConverter("mic"), []
    with caplog.at_level(logging.INFO, logger="omnistream.encoders.audio"):
        for i in range(0, len(pcm), 960):  # 20 ms pieces
            parts.append(conv(pcm[i : i + 960], sr))
        parts.append(conv.flush())
    y = np.concatenate(parts)
    assert y.dtype == np.float32 and len(y) == int(16000 * secs)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y)))) / (np.hanning(len(y)).sum() / 2)
    freqs = np.fft.rfftfreq(len(y), 1 / 16000)
    assert freqs[np.argmax(spec)] == pytest.approx(1000, abs=1)
    # the mean of the channels: 0.4 at 1 kHz and 0.2 at 5 kHz
    assert spec[np.argmin(abs(freqs - 1000))] == pytest.approx(0.4, rel=2e-3)
    assert spec[np.argmin(abs(freqs - 5000))] == pytest.approx(0.2, rel=2e-3)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("downmixing 2-channel" in m for m in msgs) == 1
    assert sum("resampling 48000 Hz -> 16000 Hz" in m for m in msgs) == 1
    assert np.abs(y - to_mono_16k(pcm, sr)).max() <= 1e-4  # chunked == whole stream


@pytest.mark.parametrize("sr", [8000, 22050, 44100])
def test_resampled_sine_is_clean(sr):
    t = np.arange(sr) / sr
    y = to_mono_16k(np.sin(2 * np.pi * 1000 * t).astype(np.float32) * 0.5, sr)
    ideal = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(len(y)) / 16000)
    assert len(y) == 16000 and np.abs(y - ideal)[400:-400].max() < 1e-4


def test_clamp_rule_measured(fe):
    speech = speechlike(3.0)
    with_silence = np.concatenate([np.zeros(8000, np.float32), speech])
    quiet_start = measure_clamp_rule(fe, with_silence)
    no_silence = measure_clamp_rule(fe, speech)
    print("clamp rule, 0.5 s silence + 3 s:", quiet_start)
    print("clamp rule, 3 s no silence:", no_silence)
    for m in (quiet_start, no_silence):
        assert 0 <= m["frac_bins_differing"] <= 1 and m["mean_abs_diff"] <= m["max_abs_diff"]
    assert quiet_start["frames_differing"] > 0  # leading silence is clamped below the offline level
    # streaming values never exceed offline ones when the floor is below the true maximum
    ref = offline_features(fe, with_silence)
    got = stream_mel(fe, with_silence, [160] * (len(with_silence) // 160))
    assert (got - ref).max() <= 1e-5
    # and with the pure running maximum (no floor) the differences can only grow
    no_floor = measure_clamp_rule(fe, with_silence, clamp_floor=-np.inf)
    print("clamp rule without floor, 0.5 s silence + 3 s:", no_floor)
    assert no_floor["max_abs_diff"] >= quiet_start["max_abs_diff"]
