"""Streaming audio front end for Qwen2.5-Omni: PCM -> 16 kHz mono -> log-mel -> audio-tower blocks.

The offline processor needs the whole utterance before it can emit one audio token. Here every
stage is incremental, so embeddings for each 2 s block are ready as soon as the block is heard:

* :class:`PcmConverter` / :func:`to_mono_16k` validate, downmix and resample raw PCM.
* :class:`StreamingLogMel` emits Whisper log-mel frames as soon as their STFT window is complete.
* :class:`StreamingAudioEncoder` runs the real audio tower on each complete 200-frame block.
  The tower attends within 200-frame chunks only, restarts its positional embedding per chunk
  and never pools across a chunk boundary, so block-wise output equals the offline output.
* :class:`AudioStream` ties them together and yields :class:`AudioBlock` s.

Everything except Whisper's whole-utterance clamp ``max(x, x.max() - 8)`` matches the offline
``WhisperFeatureExtractor`` + tower exactly (float rounding only); see :class:`StreamingLogMel`
for the streaming clamp rule and :func:`measure_clamp_rule` for its measured effect.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

TARGET_RATE = 16000
MAX_CHANNELS = 8
# Floats up to this magnitude pass (resampler / codec overshoot above 1.0 is normal); larger
# values almost always mean int16-scaled floats, which would silently wreck the features.
MAX_FLOAT_ABS = 2.0
# Initial floor of the running maximum used by the streaming clamp (log10 mel-power units).
DEFAULT_CLAMP_FLOOR = 0.0


class PcmError(ValueError):
    """A PCM piece was rejected; the message says what was wrong and what is expected."""


def _as_frames(pcm) -> np.ndarray:
    """Validate one PCM piece and return it as float32 ``(n, channels)`` in [-1, 1]-ish scale.

    Validation happens fully before any stream state changes, so a rejected piece can simply
    be dropped and the stream continues.
    """
    if isinstance(pcm, torch.Tensor):
        pcm = pcm.detach().cpu().numpy()
    if not isinstance(pcm, np.ndarray):
        raise PcmError(f"PCM must be a numpy array, got {type(pcm).__name__}; expected float32/float64 "
                       "samples in [-1, 1] or int16, shape (n,) or (n, channels)")
    if pcm.dtype not in (np.float32, np.float64, np.int16):
        raise PcmError(f"unsupported PCM dtype {pcm.dtype}; expected float32/float64 in [-1, 1] or int16")
    if pcm.ndim not in (1, 2):
        raise PcmError(f"PCM has {pcm.ndim} dimensions (shape {pcm.shape}); expected (n,) or (n, channels)")
    x = pcm[:, None] if pcm.ndim == 1 else pcm  # (n, C)
    if not 1 <= x.shape[1] <= MAX_CHANNELS:
        raise PcmError(f"PCM shape {pcm.shape} means {x.shape[1]} channels; expected (n, channels) with "
                       f"1..{MAX_CHANNELS} channels (transpose a (channels, n) array)")
    if pcm.dtype == np.int16:
        return x.astype(np.float32) / np.float32(32768.0)
    if x.size and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise PcmError(f"PCM holds {bad} NaN/inf sample(s); expected finite samples in [-1, 1]")
    if x.size and (peak := float(np.abs(x).max())) > MAX_FLOAT_ABS:
        raise PcmError(f"float PCM peaks at {peak:.4g}; expected samples in [-1, 1] "
                       "(int16-scaled floats? divide by 32768)")
    return x.astype(np.float32, copy=False)


class PolyphaseResampler:
    """Kaiser-windowed-sinc rational resampler with streaming state.

    Output sample ``n`` sits at input time ``n * M / L`` (``L/M`` = out/in rate reduced), and is
    the dot product of the ``2W`` nearest inputs with a windowed sinc whose cutoff is below both
    Nyquists. The input is taken as zero before the first and after the last sample, so pushing a
    stream in pieces gives the same samples as resampling it whole (latency: ``W`` input samples).
    """

    def __init__(self, in_rate: int, out_rate: int = TARGET_RATE, zeros: int = 16, rolloff: float = 0.945,
                 beta: float = 8.6):
        g = math.gcd(in_rate, out_rate)
        self.L, self.M = out_rate // g, in_rate // g
        self.fc = rolloff * min(1.0, self.L / self.M)  # cutoff, fraction of input Nyquist
        self.W = int(math.ceil(zeros / self.fc))  # half width in input samples
        self.beta = beta
        # Precompute one filter per phase unless that table would be huge (odd rate pairs).
        self._table = self._taps(np.arange(self.L)) if self.L * 2 * self.W <= 4_000_000 else None
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(self.W, np.float64)  # inputs from absolute index _x0 on
        self._x0 = -self.W
        self._n_in = 0
        self._n_out = 0

    def _taps(self, phases: np.ndarray) -> np.ndarray:
        d = phases[:, None] / self.L + (self.W - 1) - np.arange(2 * self.W)[None, :]  # (P, 2W)
        win = np.i0(self.beta * np.sqrt(np.clip(1.0 - (d / self.W) ** 2, 0.0, None))) / np.i0(self.beta)
        return self.fc * np.sinc(self.fc * d) * win

    def _emit(self, n_end: int) -> np.ndarray:
        out = []
        for s in range(self._n_out, n_end, 8192):  # bounded memory for long pieces
            n = np.arange(s, min(s + 8192, n_end), dtype=np.int64)
            base, ph = (n * self.M) // self.L, (n * self.M) % self.L
            idx = (base - self.W + 1 - self._x0)[:, None] + np.arange(2 * self.W)[None, :]  # (n, 2W)
            h = self._table[ph] if self._table is not None else self._taps(ph)
            out.append((self._buf[idx] * h).sum(axis=1))
        if n_end > self._n_out:
            self._n_out = n_end
            keep = (self._n_out * self.M) // self.L - self.W + 1  # first input still needed
            self._buf, self._x0 = self._buf[keep - self._x0:], keep
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def push(self, x: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf, x.astype(np.float64)])
        self._n_in += len(x)
        # Output n is ready once input base(n) + W is present: (n*M)//L <= n_in - 1 - W.
        ready = ((self._n_in - self.W) * self.L + self.M - 1) // self.M if self._n_in >= self.W else 0
        return self._emit(max(ready, self._n_out))

    def flush(self) -> np.ndarray:
        total = -(-self._n_in * self.L // self.M)  # ceil(n_in * L / M)
        self._buf = np.concatenate([self._buf, np.zeros(2 * self.W + 1)])
        return self._emit(total)


class PcmConverter:
    """Per-stream PCM normaliser: validate, downmix (mean of channels), resample to 16 kHz.

    Downmixing and resampling each log ONE line per stream (not per chunk). The sample rate is
    fixed for a stream; a change raises :class:`PcmError` (call :meth:`reset` for a new stream).
    """

    def __init__(self, name: str = "audio"):
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.rate: int | None = None
        self._resampler: PolyphaseResampler | None = None
        self._logged_downmix = False

    def __call__(self, pcm, sample_rate: int = TARGET_RATE) -> np.ndarray:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or not (
            1000 <= sample_rate <= 384000
        ):
            raise PcmError(f"sample_rate {sample_rate!r} is invalid; expected an int in 1000..384000 Hz")
        if self.rate is not None and sample_rate != self.rate:
            raise PcmError(f"sample rate changed mid-stream from {self.rate} to {sample_rate} Hz; "
                           "call reset() to start a new stream")
        x = _as_frames(pcm)  # (n, C) float32; raises before any state changes
        if self.rate is None:
            self.rate = int(sample_rate)
            if self.rate != TARGET_RATE:
                self._resampler = PolyphaseResampler(self.rate, TARGET_RATE)
                r = self._resampler
                log.info("%s: resampling %d Hz -> %d Hz (Kaiser windowed-sinc, %d taps, %d phases)",
                         self.name, self.rate, TARGET_RATE, 2 * r.W, r.L)
        if x.shape[1] > 1 and not self._logged_downmix:
            self._logged_downmix = True
            log.info("%s: downmixing %d-channel PCM to mono (mean of channels)", self.name, x.shape[1])
        mono = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float64).astype(np.float32)  # (n,)
        return self._resampler.push(mono) if self._resampler else np.ascontiguousarray(mono)

    def flush(self) -> np.ndarray:
        """The resampler's last samples (empty at 16 kHz). The stream is over afterwards."""
        return self._resampler.flush() if self._resampler else np.zeros(0, np.float32)


def to_mono_16k(pcm, sample_rate: int) -> np.ndarray:
    """Convert one whole PCM array to float32 mono 16 kHz (see :class:`PcmConverter`)."""
    conv = PcmConverter()
    y = conv(pcm, sample_rate)
    return np.concatenate([y, conv.flush()])


class StreamingLogMel:
    """Incremental Whisper log-mel (``WhisperFeatureExtractor._torch_extract_fbank_features``).

    Frame ``i`` is centred on sample ``160 i`` (torch.stft ``center=True``, reflect padding at the
    stream start) and is emitted by :meth:`push` once samples up to ``160 i + 199`` have arrived.
    :meth:`finish` zero-pads the end, as the offline ``padding="max_length"`` path does, and emits
    the rest, so the total is ``ceil(n_samples / 160)`` frames, the offline attention-mask sum.

    Clamp rule. Offline, ``log_spec = max(log_spec, log_spec.max() - 8)`` uses the maximum over the
    whole utterance, which a stream does not know yet. Here frame ``i`` is clamped with
    ``max(clamp_floor, max of frames 0..i) - 8`` (a running maximum including frame ``i``, so the
    result does not depend on how the PCM is chunked). ``clamp_floor`` (default 0.0 log10 units,
    about the peak mel level of speech-like noise at -35 dBFS RMS; at -20 dBFS the peak is ~1.5)
    keeps leading silence (log10 = -10) from sitting 8+ decades below the eventual clamp level;
    ``clamp_floor=-inf`` is the pure running maximum. A floor above the utterance's true maximum
    (very quiet input) clamps more than offline. While the running maximum is below
    the final one, streaming values are at most offline values; once the loudest frame has passed
    they are identical. When the offline clamp does not bind, the outputs are identical as long as
    the running threshold does not bind either. :func:`measure_clamp_rule` gives the difference.
    """

    def __init__(self, feature_extractor, clamp_floor: float = DEFAULT_CLAMP_FLOOR):
        fe = feature_extractor
        self.n_fft, self.hop = int(fe.n_fft), int(fe.hop_length)
        self.n_mels = int(fe.feature_size)
        self.clamp_floor = float(clamp_floor)
        self._window = torch.hann_window(self.n_fft)  # (400,) periodic, as offline
        self._filters = np.ascontiguousarray(np.asarray(fe.mel_filters, np.float64).T)  # (128, 201)
        self.reset()

    def reset(self) -> None:
        self.n_samples = 0  # samples pushed so far
        self.n_frames = 0  # frames emitted so far
        self._run_max = self.clamp_floor
        self._head = np.zeros(0, np.float32)  # first samples, until the reflect prefix is known
        self._buf: np.ndarray | None = None  # padded signal from padded index hop * n_frames on

    def _start(self, head: np.ndarray) -> None:
        pad = self.n_fft // 2  # reflect: padded[-k] = x[k], k = 1..200
        self._buf = np.concatenate([head[1 : pad + 1][::-1], head])

    def _frames(self, n: int) -> torch.Tensor:
        # After the STFT, numpy float64 rather than torch: a push usually completes 1-2 frames,
        # and torch's intra-op threads cost milliseconds per tiny op (the mel matmul) on a busy
        # CPU (measured ~8 ms/frame on 2 contended cores).
        seg = torch.from_numpy(np.ascontiguousarray(self._buf[: (n - 1) * self.hop + self.n_fft]))
        # the offline float32 STFT itself, so low-power bins round the same way
        stft = torch.stft(seg, self.n_fft, self.hop, window=self._window, center=False, return_complex=True)
        power = np.abs(stft.numpy()).astype(np.float64) ** 2  # (201, n)
        logm = np.log10(np.maximum(self._filters @ power, 1e-10))  # (128, n)
        run = np.maximum(np.maximum.accumulate(logm.max(axis=0)), self._run_max)  # (n,)
        self._run_max = float(run[-1])
        self._buf = self._buf[n * self.hop :]
        self.n_frames += n
        return torch.from_numpy(((np.maximum(logm, run[None, :] - 8.0) + 4.0) / 4.0).astype(np.float32))

    def _emit_ready(self, limit: int | None = None) -> torch.Tensor:
        n = (len(self._buf) - self.n_fft) // self.hop + 1 if len(self._buf) >= self.n_fft else 0
        if limit is not None:
            n = limit
        return self._frames(n) if n > 0 else torch.zeros(self.n_mels, 0)

    def push(self, pcm16k: np.ndarray) -> torch.Tensor:
        """Take float32 mono 16 kHz samples; return the newly complete frames ``(128, n_new)``."""
        x = np.asarray(pcm16k, dtype=np.float32)
        if x.ndim != 1:
            raise PcmError(f"StreamingLogMel takes mono (n,) samples, got shape {x.shape}")
        self.n_samples += len(x)
        if self._buf is None:
            self._head = np.concatenate([self._head, x])
            if len(self._head) <= self.n_fft // 2:
                return torch.zeros(self.n_mels, 0)
            self._start(self._head)
            self._head = np.zeros(0, np.float32)
        else:
            self._buf = np.concatenate([self._buf, x])
        return self._emit_ready()

    def finish(self) -> torch.Tensor:
        """Zero-pad the end and emit the remaining frames ``(128, n_rest)``; then :meth:`reset`."""
        total = -(-self.n_samples // self.hop)  # ceil(n / 160)
        if self._buf is None:  # at most 200 samples: the reflection reaches the zero padding
            z = np.concatenate([self._head, np.zeros(self.n_fft // 2 + 1, np.float32)])
            self._buf = np.concatenate([z[1 : self.n_fft // 2 + 1][::-1], self._head])
        self._buf = np.concatenate([self._buf, np.zeros(self.n_fft, np.float32)])
        out = self._emit_ready(limit=total - self.n_frames)
        self.reset()
        return out


class StreamingAudioEncoder:
    """Runs the real Qwen2.5-Omni audio tower block by block as mel frames arrive.

    A block is ``2 * n_window`` = 200 frames (2 s) and gives 50 tokens; a partial last block of
    ``L`` frames gives ``((L-1)//2 + 1 - 2)//2 + 1``. The tower itself splits its input into such
    chunks (attention limited by cu_seqlens, positional embedding restarting per chunk, avg-pool
    pairs inside a chunk), so calling it per block reproduces the offline output.
    """

    def __init__(self, audio_tower):
        self.tower = audio_tower
        self.block = 2 * int(audio_tower.n_window)
        self.n_mels = int(audio_tower.num_mel_bins)
        self.reset()

    def reset(self) -> None:
        self._pending: list[torch.Tensor] = []  # (128, k) pieces not yet encoded
        self._n_pending = 0
        self.frames_done = 0  # frames already encoded

    @staticmethod
    def n_tokens(n_frames: int) -> int:
        return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1 if n_frames > 0 else 0

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """One block ``(128, L)``, L <= 200 -> ``(tokens, output_dim)`` through the tower."""
        p = next(self.tower.parameters())
        with torch.inference_mode():
            out = self.tower(input_features=mel.to(p.device, p.dtype),
                             feature_lens=torch.tensor([mel.shape[1]], device=p.device))
        return out.last_hidden_state

    def _take(self, n: int) -> torch.Tensor:
        mel = torch.cat(self._pending, dim=1)  # (128, n_pending)
        rest = mel[:, n:]
        self._pending, self._n_pending = ([rest] if rest.shape[1] else []), rest.shape[1]
        return mel[:, :n]

    def push_blocks(self, mel: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """Like :meth:`push`, returning ``(start_frame, n_frames, embeds)`` per block."""
        if mel.ndim != 2 or mel.shape[0] != self.n_mels:
            raise ValueError(f"mel must be ({self.n_mels}, n), got {tuple(mel.shape)}")
        if mel.shape[1]:
            self._pending.append(mel)
            self._n_pending += mel.shape[1]
        out = []
        while self._n_pending >= self.block:
            out.append((self.frames_done, self.block, self.encode(self._take(self.block))))
            self.frames_done += self.block
        return out

    def finish_blocks(self) -> list[tuple[int, int, torch.Tensor]]:
        n = self._n_pending
        if n == 0:
            return []
        mel = self._take(n)
        p = next(self.tower.parameters())  # L <= 2 frames pools to no token: skip the tower
        emb = self.encode(mel) if self.n_tokens(n) > 0 else p.new_zeros(0, self.tower.proj.out_features)
        out = [(self.frames_done, n, emb)]
        self.frames_done += n
        return out

    def push(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """Take mel frames ``(128, n)``; return one ``(50, D)`` tensor per newly complete block."""
        return [e for _, _, e in self.push_blocks(mel)]

    def finish(self) -> list[torch.Tensor]:
        """Encode the partial last block (if any): ``[(tokens, D)]`` or ``[]``."""
        return [e for _, _, e in self.finish_blocks()]


@dataclass
class AudioBlock:
    """Encoded audio for one tower block (2 s, or the shorter last one)."""

    embeds: torch.Tensor  # (n_tokens, D)
    n_tokens: int
    start_s: float  # block start time in the stream, seconds
    n_frames: int  # mel frames in the block (10 ms each)
    final: bool  # True on the block returned by finish()


class AudioStream:
    """PCM in, audio-tower embeddings out, one :class:`AudioBlock` per completed 2 s block."""

    def __init__(self, feature_extractor, audio_tower, *, clamp_floor: float = DEFAULT_CLAMP_FLOOR,
                 name: str = "audio"):
        self.pcm = PcmConverter(name)
        self.mel = StreamingLogMel(feature_extractor, clamp_floor=clamp_floor)
        self.encoder = StreamingAudioEncoder(audio_tower)
        self.frame_s = self.mel.hop / TARGET_RATE
        self._finished = False

    @classmethod
    def from_checkpoint(cls, ck, **kwargs) -> AudioStream:
        return cls(ck.feature_extractor, ck.thinker.model.audio_tower, **kwargs)

    def reset(self) -> None:
        self.pcm.reset(), self.mel.reset(), self.encoder.reset()
        self._finished = False

    def _blocks(self, items, final: bool) -> list[AudioBlock]:
        return [AudioBlock(e, e.shape[0], s * self.frame_s, n, final) for s, n, e in items]

    def push(self, pcm, sample_rate: int = TARGET_RATE) -> list[AudioBlock]:
        """Add a PCM piece (any supported dtype/rate/channels); return blocks completed by it."""
        if self._finished:
            raise RuntimeError("AudioStream.push after finish(); call reset() to start a new stream")
        mono = self.pcm(pcm, sample_rate)  # (n,) float32 16 kHz; PcmError leaves state untouched
        return self._blocks(self.encoder.push_blocks(self.mel.push(mono)), final=False)

    def finish(self) -> list[AudioBlock]:
        """End the stream: flush resampler and log-mel, encode the partial last block."""
        if self._finished:
            return []
        self._finished = True
        items = self.encoder.push_blocks(self.mel.push(self.pcm.flush()))
        items += self.encoder.push_blocks(self.mel.finish())
        items += self.encoder.finish_blocks()
        blocks = self._blocks(items, final=False)
        if blocks:
            blocks[-1].final = True
        return blocks


def measure_clamp_rule(feature_extractor, pcm: np.ndarray, clamp_floor: float = DEFAULT_CLAMP_FLOOR,
                       chunk: int = 160) -> dict:
    """Difference of the streaming clamp rule from offline features on 16 kHz mono ``pcm``.

    Offline: ``feature_extractor(pcm, padding="max_length")`` cut to the attention-mask sum.
    Returns max/mean abs diff and the fraction of (bin, frame) values that differ (> 1e-5).
    """
    x = np.asarray(pcm, dtype=np.float32)
    off = feature_extractor(x, sampling_rate=TARGET_RATE, padding="max_length", return_attention_mask=True)
    n = int(off["attention_mask"].sum())
    ref = torch.from_numpy(np.asarray(off["input_features"])[0, :, :n])  # (128, n)
    sm = StreamingLogMel(feature_extractor, clamp_floor=clamp_floor)
    got = torch.cat([sm.push(x[i : i + chunk]) for i in range(0, len(x), chunk)] + [sm.finish()], dim=1)
    d = (got[:, :n] - ref).abs()
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "frac_bins_differing": float((d > 1e-5).float().mean()), "n_frames": n,
            "frames_differing": int((d > 1e-5).any(dim=0).sum()), "offline_max": float(ref.max() * 4 - 4)}
