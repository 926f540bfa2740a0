"""Streaming Token2Wav: 24 kHz PCM from Talker codec tokens while the Talker is still speaking.

transformers' ``Qwen2_5OmniToken2WavModel`` decodes a whole reply at once: the DiT integrates an
ODE (RK4 over ``num_steps`` sway-warped time points, classifier-free guidance) from one noise
tensor ``randn(1, 2 * n_codes, 80)`` to a mel spectrogram, and BigVGAN turns the mel into 240
samples per frame. Nothing can be played until the last code exists.

Why chunking works at all: the DiT is local. Each layer attends only inside its block of
``block_size`` mel frames plus one block back (``look_backward_layers``) and/or one block ahead
(``look_ahead_layers``); positions are rotary (relative); the speaker encoder, the time embedding
and the CFG mix do not depend on length. So a chunk of codes decoded over a window
``[chunk start - left, chunk end + right)`` with *the same slice of the same initial noise* gives
nearly the offline mel for the chunk's frames; the residual error comes from the window edges and
grows with every ODE evaluation (36 at 10 steps), which is why left/right context matters and why
window starts are best put on DiT block boundaries (then the block masks inside the window are the
offline ones). BigVGAN is a stack of convolutions, so a mel span vocoded with some mel context on
each side gives nearly the offline samples of that span.

:class:`StreamingToken2Wav` runs exactly this, with every context size a setting
(:class:`StreamingConfig`; presets :data:`QWEN_REFERENCE` and :data:`DEFAULT`). The noise comes
from :class:`SeededNoise`, drawn per code position in order, so frame ``f``'s noise never depends on
how many codes exist yet, and it equals ``torch.manual_seed(seed); torch.randn(1, 2n, 80)``, the
draw transformers' ``sample`` makes. :func:`decode_offline` is the one-chunk special case of the
same code path and reproduces transformers' offline decode exactly (its BigVGAN run on the same
conv backend, see :func:`batch_invariant_convs`).

Batched across sessions (one engine core serving many replies): a stream's work is planned as jobs --
:class:`DiTJob` (one window: codes, noise slice) and :class:`VocoderJob` (one mel span) -- by
:meth:`StreamingToken2Wav.pending`, run by :func:`run_jobs`, which stacks the jobs of equal shape of
all streams into one forward (per-row codes, noise, conditioning and speaker features; the block
masks depend on the window length only), and handed back with :meth:`StreamingToken2Wav.accept`,
which returns the PCM chunks. :func:`step_batch` is the scheduler's tick over it::

    pcm = step_batch(streams, new_codes={st: [codes...]}, finals={st_done})  # {stream: [pcm chunks]}

Every stream gets the chunks it would get alone: same boundaries, and on CPU the same samples bit
for bit, because the batch-dependent roundings are designed out (the time-step path of the DiT runs
on a batch-1 shape, the vocoder on batch-invariant convs). ``push``/``finish`` are the batch-1 case.
A stream offers one job per round (its chunk's vocoder span before its next window), so a burst of
k ready chunks takes k rounds of a tick; steady streaming has one chunk per tick.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from omnistream.model.token2wav_jobs import DiTJob, VocoderJob, run_jobs

SAMPLE_RATE = 24000


@dataclass(frozen=True)
class StreamingConfig:
    """Where chunks start and how much context each DiT window / vocoder span gets.

    Sizes are in codec tokens (one code = ``repeats`` = 2 mel frames) except the vocoder context,
    which is in mel frames (one frame = 240 samples = 10 ms).
    """

    chunk_codes: int  # codes per DiT chunk after the first
    left_codes: int  # codes of left context in each DiT window
    right_codes: int  # codes of right context (look-ahead) in each DiT window
    vocoder_context_frames: int  # mel frames of context on each side of a vocoded span
    first_chunk_codes: int | None = None  # None: same as chunk_codes
    block_align: bool = False  # move each window start down to a DiT block boundary
    merge_tail: bool = False  # at the end of a reply, the last chunk takes every code its window holds

    def __post_init__(self):
        for name in ("chunk_codes", "left_codes", "right_codes", "vocoder_context_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (1 if name == "chunk_codes" else 0):
                raise ValueError(f"StreamingConfig.{name} must be a non-negative int (chunk >= 1), got {v!r}")
        fc = self.first_chunk_codes
        if fc is not None and (not isinstance(fc, int) or fc < 1):
            raise ValueError(f"StreamingConfig.first_chunk_codes must be an int >= 1, got {self.first_chunk_codes!r}")

    @property
    def first_codes(self) -> int:
        return self.first_chunk_codes or self.chunk_codes

    @property
    def first_packet_codes(self) -> int:
        """Codes needed before the first PCM chunk can be produced (in a reply long enough).

        That is the end of the first DiT chunk after which more than ``vocoder_context_frames`` mel
        frames exist (the vocoder holds its right context back), plus that chunk's look-ahead.
        With a first chunk longer than the vocoder context it is ``first_codes + right_codes``.
        """
        end, frames_per_code = self.first_codes, 2  # Qwen2.5-Omni's 50 Hz codec: 2 mel frames per code
        while end * frames_per_code <= self.vocoder_context_frames:
            end += self.chunk_codes
        return end + self.right_codes


# Qwen's own streaming Token2Wav (Qwen2Code2wav in the Qwen2.5-Omni release and vLLM-Omni):
# bs_mel = 24 frames, chunk = 3 * bs_mel = 72 frames (36 codes), past cache 2 * bs_mel (24 codes),
# future cache bs_mel (12 codes), BigVGAN past/future 20 frames. All windows start on block
# boundaries by construction. The first packet needs 36 + 12 = 48 codes.
QWEN_REFERENCE = StreamingConfig(chunk_codes=36, left_codes=24, right_codes=12, vocoder_context_frames=20)

# Ours, chosen by measurement (tiny checkpoint, 200 codes, 2 voices; table in the module's tests
# and the report): the first chunk is one DiT block (12 codes) smaller and that block pays for twice
# Qwen's look-ahead (24 codes), the dominant term; left context is doubled (free for latency), and
# windows start on DiT block boundaries (misaligned windows cost ~35-50 dB on the tiny model). Same
# 48-code first packet with the same DiT work and less vocoder work (48 vs 72 frames); every later
# chunk keeps Qwen's 36-code cadence. The vocoder context stays at Qwen's 20 frames: 32 measured
# no better. ``merge_tail``: a reply that ends inside a chunk's look-ahead is finished by that
# chunk's window, which already spans every code left (Qwen's scheme runs a second window over the
# same codes for the last few): one DiT window and one vocoder span fewer on about 40% of replies
# and on every reply of 25-47 codes, whose whole audio then comes in one piece.
DEFAULT = StreamingConfig(
    chunk_codes=36, left_codes=48, right_codes=24, vocoder_context_frames=20,
    first_chunk_codes=24, block_align=True, merge_tail=True,
)


class SeededNoise:
    """The DiT's initial noise for a reply of unknown length, grown one code at a time.

    Drawing ``(1, repeats, mel_dim)`` per code from one ``torch.Generator`` consumes the stream in
    the same order as a single ``randn(1, repeats * n, mel_dim)`` (CPU normal fills in 16-value
    groups and ``repeats * mel_dim`` is a multiple of 16), so the noise of frame f is the same
    whatever the reply length and it equals transformers' draw after ``torch.manual_seed(seed)``.
    """

    def __init__(self, seed: int | None = None, *, generator: torch.Generator | None = None,
                 repeats: int = 2, mel_dim: int = 80, dtype: torch.dtype = torch.float32):
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else int(seed))
        self.generator, self.repeats, self.mel_dim, self.dtype = generator, repeats, mel_dim, dtype
        self._parts: list[torch.Tensor] = []  # each (1, repeats, mel_dim)
        self._cat: torch.Tensor | None = None

    def __len__(self) -> int:  # codes covered
        return len(self._parts)

    def frames(self, n_codes: int) -> torch.Tensor:
        """Noise of the first ``n_codes`` codes: (1, repeats * n_codes, mel_dim)."""
        while len(self._parts) < n_codes:
            self._parts.append(torch.randn(1, self.repeats, self.mel_dim, generator=self.generator, dtype=self.dtype))
            self._cat = None
        if self._cat is None or self._cat.shape[1] != self.repeats * len(self._parts):
            empty = torch.zeros(1, 0, self.mel_dim, dtype=self.dtype)
            self._cat = torch.cat(self._parts, dim=1) if self._parts else empty
        return self._cat[:, : self.repeats * n_codes]


class _FixedNoise:
    """A noise tensor given in advance (e.g. the exact draw of an offline run)."""

    def __init__(self, noise: torch.Tensor, repeats: int):
        if noise.dim() != 3 or noise.shape[0] != 1:
            raise ValueError(f"noise must be (1, frames, mel_dim), got {tuple(noise.shape)}")
        self.noise, self.repeats = noise, repeats

    def frames(self, n_codes: int) -> torch.Tensor:
        if self.repeats * n_codes > self.noise.shape[1]:
            raise ValueError(f"noise covers {self.noise.shape[1] // self.repeats} codes, the reply has {n_codes}")
        return self.noise[:, : self.repeats * n_codes]


@dataclass
class Token2WavOutput:
    mel: torch.Tensor  # (1, 80, frames)
    pcm: np.ndarray  # (240 * frames,) float32, 24 kHz


class StreamingToken2Wav:
    """Codes in (``push``), 24 kHz float32 PCM chunks out, as soon as each chunk is decidable.

    A DiT chunk ``[a, b)`` runs when codes up to ``b + right_codes`` exist (or at ``finish``);
    its mel frames are appended, and every mel frame that has ``vocoder_context_frames`` of mel
    after it is vocoded and returned. The work is planned as jobs (:meth:`pending`), run by
    :func:`run_jobs` (which batches jobs of many streams) and taken back by :meth:`accept`; ``push``
    and ``finish`` run the same jobs one at a time. Not thread-safe except :meth:`cancel`, which
    may be called from any thread and stops work at the next DiT evaluation.
    """

    def __init__(self, token2wav, conditioning, reference_mel, *, chunk_codes: int, left_codes: int,
                 right_codes: int, vocoder_context_frames: int, first_chunk_codes: int | None = None,
                 block_align: bool = False, merge_tail: bool = False, num_steps: int = 10, guidance_scale: float = 0.5,
                 sway_coefficient: float | None = -1.0, seed: int | None = None,
                 generator: torch.Generator | None = None, noise: torch.Tensor | SeededNoise | None = None,
                 return_numpy: bool = True, block_sparse: bool = False):
        self.config = StreamingConfig(chunk_codes, left_codes, right_codes, vocoder_context_frames,
                                      first_chunk_codes, block_align, merge_tail)
        if guidance_scale < 1e-5:
            raise ValueError("guidance_scale 0 (no CFG) is not supported by the streaming DiT")
        self.dit = token2wav.code2wav_dit_model
        self.vocoder = token2wav.code2wav_bigvgan_model
        dcfg = self.dit.config
        self.repeats, self.mel_dim, self.block_size = dcfg.repeats, dcfg.mel_dim, dcfg.block_size
        self.num_codes = dcfg.num_embeds - 1  # the last embedding row is not a speech code
        self.hop = math.prod(self.vocoder.config.upsample_rates)  # 240 samples per mel frame
        self.max_frames = dcfg.max_position_embeddings
        self.device = next(self.dit.parameters()).device  # a GPU runs the DiT; noise is drawn on CPU
        cond = torch.as_tensor(conditioning).float()
        self.cond = cond.reshape(1, -1).to(self.device)  # (1, enc_emb_dim)
        ref = torch.as_tensor(reference_mel).float()
        self.ref_mel = ref.reshape(1, -1, self.mel_dim).to(self.device)  # (1, T_ref, 80)
        self.num_steps, self.guidance_scale, self.sway = num_steps, guidance_scale, sway_coefficient
        # Off by default: DiT attention over the allowed key blocks only, the DiT 1.4x (batch 1) to 2x
        # (batch 8) faster on CPU, the same maths in another float rounding order (mel ~2e-6 from the
        # default; the tiny random BigVGAN amplifies that to ~6e-5 in PCM). See token2wav_jobs._BlockAttention.
        self.block_sparse = bool(block_sparse)
        if isinstance(noise, torch.Tensor):
            self.noise = _FixedNoise(noise.to(self.ref_mel.dtype), self.repeats)
        elif noise is not None:
            self.noise = noise
        else:
            self.noise = SeededNoise(seed, generator=generator, repeats=self.repeats, mel_dim=self.mel_dim,
                                     dtype=self.ref_mel.dtype)
        self.return_numpy = return_numpy
        self._spk: torch.Tensor | None = None  # cached speaker-encoder output, see _speaker_features
        self.codes: list[int] = []
        self._next_chunk = 0  # first code not yet covered by a DiT chunk
        self._mel_parts: list[torch.Tensor] = []  # each (1, 80, frames)
        self._mel_frames = 0
        self._vocoded = 0  # mel frames already turned into PCM
        self._vocode_due: bool | None = None  # after a DiT chunk: a vocoder pass is due (value: final)
        self._flushed = False  # the final vocoder pass was planned
        self._finished = False
        self._cancel = threading.Event()
        # Work counters (first-packet cost and real-time factor measurements).
        self.dit_evals = 0
        self.dit_frame_evals = 0  # sum over evaluations of window frames (x2 for CFG not counted)
        self.vocoder_frames = 0
        self.samples_out = 0
        self.first_packet: dict | None = None  # codes / dit_frame_evals / vocoder_frames at first PCM

    @classmethod
    def from_config(cls, token2wav, conditioning, reference_mel, config: StreamingConfig = None, **kw):
        c = config or DEFAULT
        return cls(token2wav, conditioning, reference_mel, chunk_codes=c.chunk_codes, left_codes=c.left_codes,
                   right_codes=c.right_codes, vocoder_context_frames=c.vocoder_context_frames,
                   first_chunk_codes=c.first_chunk_codes, block_align=c.block_align, merge_tail=c.merge_tail, **kw)

    # ---------------------------------------------------------------- public API
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def mel(self) -> torch.Tensor:
        """All mel frames decided so far: (1, 80, frames)."""
        if not self._mel_parts:
            return torch.zeros(1, self.mel_dim, 0)
        return torch.cat(self._mel_parts, dim=2)

    def push(self, codes) -> list:
        """Add codes; return the PCM chunks that became decidable. Bad codes: ValueError, none added."""
        self.feed(codes)
        return [] if self.cancelled else self._run()

    def feed(self, codes) -> None:
        """Add codes without running anything: the caller runs :meth:`pending`'s jobs (batched)."""
        new = self._checked(codes)
        if not self.cancelled:
            self.codes.extend(new)

    def finish(self) -> list:
        """No more codes: decode the tail with whatever right context exists and flush the vocoder."""
        if self._finished:
            return []
        self._finished = True
        return [] if self.cancelled else self._run()

    def close_input(self) -> None:
        """No more codes (the batched path's :meth:`finish`): the tail's jobs come from :meth:`pending`."""
        self._finished = True

    def cancel(self) -> None:
        """Stop: pending codes are dropped, the running DiT chunk aborts at its next evaluation."""
        self._cancel.set()

    def pending(self) -> list:
        """The stream's next job -- a :class:`DiTJob` or a :class:`VocoderJob` -- or [] when it must wait
        for codes (or is done, or cancelled).

        Only one job at a time: each DiT chunk's vocoder pass comes before the next chunk's window,
        which keeps a stream's PCM chunk boundaries (and its cancel points) those of solo use. Calling
        it again before :meth:`accept` returns the same job. Whether the reply is final is the stream's
        own state (:meth:`finish`, or ``finals`` of :func:`step_batch`)."""
        if self.cancelled:
            return []
        while True:
            if self._vocode_due is not None:
                job = self._plan_vocode(self._vocode_due)
                if job is not None:
                    return [job]
                self._vocode_due = None  # every frame that has its right context is vocoded already
            n, a = len(self.codes), self._next_chunk
            if a < n:
                b = self._chunk_end(a)
                if b + self.config.right_codes <= n:  # the chunk has its look-ahead
                    return [self._plan_dit(a, b)]
                if self._finished:  # the reply ended inside the chunk's look-ahead: its window ends at n
                    return [self._plan_dit(a, n if self.config.merge_tail else min(b, n))]
            if not self._finished or self._flushed:
                return []
            self._flushed, self._vocode_due = True, True  # the tail: vocode every frame left

    def accept(self, job, result) -> list:
        """Take back ``job``'s result from :func:`run_jobs`; return the PCM chunks it completes.

        ``result`` None (the job was dropped) or a cancelled stream: nothing changes, []."""
        if job.stream is not self:
            raise ValueError("accept(): the job belongs to another stream")
        if result is None or self.cancelled:
            return []
        if isinstance(job, DiTJob):
            if job.a != self._next_chunk:
                raise ValueError(f"accept(): stale DiT job for codes [{job.a}, {job.b}), next is {self._next_chunk}")
            r = self.repeats
            # a copy: the slice is a view of the whole batch's ODE trajectory, which it would keep alive
            self._mel_parts.append(result[:, :, (job.a - job.ws) * r : (job.b - job.ws) * r].clone())
            self._mel_frames += (job.b - job.a) * r
            self._next_chunk = job.b
            self._vocode_due = self._finished and job.b == len(self.codes)
            return []
        if job.start != self._vocoded:
            raise ValueError(f"accept(): stale vocoder job from frame {job.start}, {self._vocoded} vocoded")
        pcm = result[(job.start - job.s) * self.hop : (job.end - job.s) * self.hop].float().clone()  # not a batch view
        self.vocoder_frames += job.e - job.s
        self._vocoded, self._vocode_due = job.end, None
        self.samples_out += pcm.numel()
        if self.first_packet is None:
            self.first_packet = {"codes": len(self.codes), "dit_frame_evals": self.dit_frame_evals,
                                 "vocoder_frames": self.vocoder_frames, "samples": pcm.numel()}
        return [pcm.numpy() if self.return_numpy else pcm]

    # ---------------------------------------------------------------- internals
    def _checked(self, codes) -> list[int]:
        """``codes`` as ints, or ValueError (RuntimeError after finish); nothing is added here."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        new = self._validate(codes)
        if self.repeats * (len(self.codes) + len(new)) > self.max_frames:
            raise ValueError(f"reply longer than the DiT's {self.max_frames // self.repeats} codes")
        return new

    def _validate(self, codes) -> list[int]:
        if isinstance(codes, (torch.Tensor, np.ndarray)):
            codes = codes.reshape(-1).tolist()
        elif isinstance(codes, Integral) and not isinstance(codes, bool):
            codes = [codes]
        out = []
        for i, c in enumerate(codes):
            if isinstance(c, bool) or not isinstance(c, Integral):
                raise ValueError(f"codec token #{i} is {c!r} ({type(c).__name__}), not an int")
            if not 0 <= int(c) < self.num_codes:
                raise ValueError(f"codec token #{i} = {int(c)} is outside [0, {self.num_codes}) (a special/eos code?)")
            out.append(int(c))
        return out

    def _chunk_end(self, start: int) -> int:
        return start + (self.config.first_codes if start == 0 else self.config.chunk_codes)

    def _run(self) -> list:
        """Solo use: run this stream's jobs one by one (batch 1) until it has to wait."""
        out = []
        while jobs := self.pending():
            out.extend(self.accept(jobs[0], run_jobs(jobs)[0]))
        return out

    def _plan_dit(self, a: int, b: int) -> DiTJob:
        """The DiT window around codes [a, b): codes and noise of [ws, we)."""
        c, r = self.config, self.repeats
        ws = max(0, a - c.left_codes)
        if c.block_align and self.block_size % r == 0:
            block_codes = self.block_size // r
            ws = ws // block_codes * block_codes
        we = min(len(self.codes), b + c.right_codes)
        noise = self.noise.frames(we)[:, ws * r : we * r].to(self.device)  # (1, W, 80)
        code = torch.tensor([self.codes[ws:we]], dtype=torch.long, device=self.device)  # (1, W / r)
        return DiTJob(self, a, b, ws, code, noise)

    def _plan_vocode(self, final: bool) -> VocoderJob | None:
        """The vocoder span for every mel frame that has its right context (all of them when final)."""
        ctx, total = self.config.vocoder_context_frames, self._mel_frames
        end = total if final else total - ctx
        if end <= self._vocoded:
            return None
        s = max(0, self._vocoded - ctx)
        e = min(total, end + ctx)
        return VocoderJob(self, s, e, self._vocoded, end, self._mel_span(s, e))

    def _speaker_features(self) -> torch.Tensor:
        """The ECAPA speaker encoder's output for [reference mel, zeros (the CFG branch)]: (2, enc_dim).

        It depends on the voice only, yet the DiT recomputes it at every evaluation (half the cost
        of the tiny DiT); one reply computes it once."""
        if self._spk is None:
            ref = self.ref_mel
            cond = torch.cat([ref, torch.zeros_like(ref)], dim=0)  # (2, T_ref, 80)
            with torch.no_grad():
                self._spk = self.dit.input_embed.spk_encoder(cond)
        return self._spk

    def _mel_span(self, s: int, e: int) -> torch.Tensor:
        """Mel frames [s, e) from the newest parts only (a long reply is not re-concatenated)."""
        parts, end = [], self._mel_frames
        for part in reversed(self._mel_parts):
            start = end - part.shape[2]
            if end <= s:
                break
            if start < e:
                parts.append(part[:, :, max(s, start) - start : min(e, end) - start])
            end = start
        return torch.cat(parts[::-1], dim=2)


def decode_stream(token2wav, codes, cond, ref_mel, config: StreamingConfig = None, *, noise=None, seed=None,
                  push_size: int | None = None, **kw) -> Token2WavOutput:
    """Push ``codes`` (``push_size`` at a time; all at once if None), finish, return mel and PCM."""
    codes = codes.reshape(-1).tolist() if isinstance(codes, (torch.Tensor, np.ndarray)) else list(codes)
    st = StreamingToken2Wav.from_config(token2wav, cond, ref_mel, config, noise=noise, seed=seed, **kw)
    step = push_size or max(1, len(codes))
    chunks = []
    for i in range(0, len(codes), step):
        chunks += st.push(codes[i : i + step])
    chunks += st.finish()
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return Token2WavOutput(mel=st.mel, pcm=pcm)


def decode_offline(token2wav, codes, cond, ref_mel, noise=None, *, seed=None, **kw) -> Token2WavOutput:
    """The whole reply as ONE chunk (no context needed) through the streaming code path."""
    n = codes.numel() if isinstance(codes, torch.Tensor) else len(codes)
    one = StreamingConfig(chunk_codes=max(1, n), left_codes=0, right_codes=0, vocoder_context_frames=0)
    return decode_stream(token2wav, codes, cond, ref_mel, one, noise=noise, seed=seed, **kw)


def snr_db(ref, est) -> float:
    """10 log10(|ref|^2 / |ref - est|^2) over all values; inf when identical."""
    ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).double().reshape(-1)
    est = torch.as_tensor(np.asarray(est) if not isinstance(est, torch.Tensor) else est).double().reshape(-1)
    if ref.shape != est.shape:
        raise ValueError(f"snr_db: {ref.numel()} reference values vs {est.numel()} estimated")
    err = float(((ref - est) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((ref**2).sum()) / err)


def mel_snr_db(ref_mel, est_mel) -> float:
    """SNR of log-mels after removing the reference's mean: a log-mel sits around a large negative
    constant that would otherwise count as 'signal' and flatter every error."""
    ref = torch.as_tensor(ref_mel).double()
    mu = ref.mean()
    return snr_db(ref - mu, torch.as_tensor(est_mel).double() - mu)


def wave_snr_db(ref_pcm, est_pcm) -> float:
    """Sample-wise SNR of two waveforms of equal length."""
    return snr_db(ref_pcm, est_pcm)


__all__ = ["DEFAULT", "QWEN_REFERENCE", "SAMPLE_RATE", "SeededNoise", "StreamingConfig", "StreamingToken2Wav",
           "Token2WavOutput", "decode_offline", "decode_stream", "mel_snr_db", "snr_db", "wave_snr_db"]
