"""Token2Wav work of many streams in one call: the jobs, their batched runners, the scheduler's tick.

A :class:`~omnistream.model.token2wav.StreamingToken2Wav` plans its work as jobs --
:class:`DiTJob` (one DiT window: codes, the window's initial noise) and :class:`VocoderJob` (one
BigVGAN mel span) -- and takes their results back (``pending`` / ``accept``). :func:`run_jobs`
runs the jobs of any streams, one batched forward per group of equal shape (:class:`_DiTWindow`
for the DiT, :func:`_bigvgan` on :func:`batch_invariant_convs`); :func:`step_batch` is the
scheduler's tick over many streams. Solo ``push``/``finish`` are the batch-1 case of the same
runners, which is why a batched stream equals its solo run bit for bit on CPU (see token2wav.py's
docstring).

Where a reply's Token2Wav time goes (tiny checkpoint, CPU, 1 thread, a 3-s reply of the DEFAULT
scheme: 5 DiT windows = 180 evaluations over 29376 window frames, 98 per output frame; 5 vocoder
spans of 460 frames): the DiT ~3/4, the vocoder ~1/4. Inside the DiT, the linears are real work;
the rest was SDPA turning each layer's bool block mask into (0, -inf) at every call (now built
once per window) and all T x T scores of a mask that allows 1-3 blocks of keys (the opt-in
``block_sparse`` path computes only those). Inside BigVGAN, 60% was its 109 anti-aliased
activations: grouped convs with one 12-tap filter that ATen ran as one GEMM per channel
(now :func:`_anti_aliased`, same bits). Everything on the default path gives the same bits as
before (and as transformers' own ``sample``); ``block_sparse`` differs by float rounding.
"""

from __future__ import annotations

import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    RungeKutta4ODESolver,
    apply_rotary_pos_emb,
    deinterleave_head_dim,
)

if TYPE_CHECKING:
    from omnistream.model.token2wav import StreamingToken2Wav


class _Cancelled(Exception):
    pass




@dataclass(eq=False)
class DiTJob:
    """One DiT window of one stream: codes [ws, we) integrated from their noise, frames of [a, b) kept.

    Windows of equal frame count (and ODE settings) batch into one forward: block masks and rotary
    tables depend on the window length only, the rest is per row."""

    stream: StreamingToken2Wav
    a: int
    b: int
    ws: int
    code: torch.Tensor  # (1, W / repeats) long
    noise: torch.Tensor  # (1, W, 80), the stream's initial noise of the window

    @property
    def key(self) -> tuple:
        s = self.stream
        return ("dit", id(s.dit), self.noise.shape[1], s.num_steps, s.guidance_scale, s.sway, s.block_sparse,
                self.noise.dtype, str(self.noise.device))


@dataclass(eq=False)
class VocoderJob:
    """One BigVGAN span of one stream: mel frames [s, e) vocoded, the samples of [start, end) kept.

    Only spans of equal length batch: zero padding would change the convolutions near the pad."""

    stream: StreamingToken2Wav
    s: int
    e: int
    start: int
    end: int
    mel: torch.Tensor  # (1, 80, e - s)

    @property
    def key(self) -> tuple:
        return ("vocoder", id(self.stream.vocoder), self.e - self.s, self.mel.dtype, str(self.mel.device))


def run_jobs(jobs: list, threads: int = 1) -> list:
    """Run ``jobs`` of any streams, one batched forward per group of equal :attr:`key`; results in
    ``jobs`` order (a DiT job's (1, 80, W) mel, a vocoder job's (240 (e - s),) samples).

    ``threads`` > 1: each group's rows are split into up to that many parts of two rows or more, run
    at once by the caller and ``threads - 1`` helper threads (torch's ops release the GIL; the rows are
    batch-invariant, so the bits are the same). On a CPU whose other core is idle while sessions speak,
    two halves of a batch of 8 take ~0.6x the time of the whole. A part keeps two rows because one-row
    parts also split the first windows of two sessions that start together, which delayed their first
    audio by 0.3-0.4 s in benchmarks/capacity.py. Groups run one after another: a vocoder part turns
    oneDNN off process-wide (:func:`batch_invariant_convs`), which would send a DiT part running beside
    it through other conv kernels (the speaker encoder's and position convs'), and other bits.

    A job whose stream is cancelled -- before or while its batch runs -- gets None; a batch stops early
    only when every stream in it is cancelled, so one cancel never disturbs the others."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        if not job.stream.cancelled:
            groups.setdefault(job.key, []).append(i)

    def run(idx: list[int]):
        group = [jobs[i] for i in idx]
        try:
            return idx, _run_dit(group) if isinstance(group[0], DiTJob) else _run_vocoder(group)
        except _Cancelled:
            return idx, None

    results: list = [None] * len(jobs)
    for idx in groups.values():  # one group at a time (see the docstring)
        n = max(1, min(threads, len(idx) // 2))  # parts of 2+ rows (a lone row runs at batch 1's cost per row)
        parts = [idx[k * len(idx) // n : (k + 1) * len(idx) // n] for k in range(n)]
        helpers = [_pool(threads - 1).submit(run, part) for part in parts[1:]]
        for part, outs in [run(parts[0])] + [h.result() for h in helpers]:
            for i, out in zip(part, outs or ()):
                results[i] = None if jobs[i].stream.cancelled else out
    return results


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="token2wav")
    return _POOLS[threads]


@torch.no_grad()
def _run_dit(jobs: list[DiTJob]) -> list[torch.Tensor]:
    """``Qwen2_5OmniToken2WavDiTModel.sample`` for B windows of equal length, the initial noise passed
    in (same ops, same order as transformers), per-window constants computed once, not per evaluation.
    With :mod:`~omnistream.model.token2wav_graphs` enabled on the DiT (CUDA), the whole window's ODE is
    one graph replay."""
    first = jobs[0].stream
    n_frames = jobs[0].noise.shape[1]
    code = torch.cat([j.code for j in jobs])  # (B, W / r)
    x0 = torch.cat([j.noise for j in jobs])  # (B, W, 80)
    cond = torch.cat([j.stream.cond for j in jobs])  # (B, enc_emb_dim)
    spk = [j.stream._speaker_features() for j in jobs]  # each (2, enc_dim): [voice, CFG zeros]
    spk = torch.cat([f[:1] for f in spk] + [f[1:] for f in spk])  # (2B, enc_dim): guided rows, then null rows
    graphs = getattr(first.dit, GRAPHS_ATTR, None)
    if graphs is not None:
        mel = graphs.run(code, x0, cond, spk, num_steps=first.num_steps, sway=first.sway,
                         guidance=first.guidance_scale, block_sparse=first.block_sparse)  # (B, 80, W) or None
        if mel is not None:
            for j in jobs:  # the replay ran every evaluation (a cancel is seen between windows, not inside one)
                j.stream.dit_evals += 4 * (first.num_steps - 1)
                j.stream.dit_frame_evals += 4 * (first.num_steps - 1) * n_frames
            return [mel[i : i + 1] for i in range(len(jobs))]
    t = ode_times(first.num_steps, first.sway, cond.dtype, cond.device)
    window = _DiTWindow(first.dit, code, cond, spk, n_frames, block_sparse=first.block_sparse)

    def on_eval():
        live = [j.stream for j in jobs if not j.stream.cancelled]
        if not live:
            raise _Cancelled
        for st in live:
            st.dit_evals += 1
            st.dit_frame_evals += n_frames

    mel = integrate(window, x0, t, first.guidance_scale, on_eval)  # (B, W, 80)
    mel = mel.permute(0, 2, 1)  # (B, 80, W)
    return [mel[i : i + 1] for i in range(len(jobs))]


GRAPHS_ATTR = "_omnistream_dit_graphs"  # a DiT model's DiTGraphs (omnistream.model.token2wav_graphs)


def ode_times(num_steps: int, sway: float | None, dtype: torch.dtype, device) -> torch.Tensor:
    """The ODE's time points, as ``sample`` makes them: (num_steps,), sway-sampled."""
    t = torch.linspace(0, 1, num_steps, dtype=dtype, device=device)
    if sway is not None:
        t += sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def increasing(t: torch.Tensor) -> bool:
    """Whether the time points rise strictly, i.e. :func:`integrate` can skip transformers' interpolation
    (a host sync: check outside a CUDA graph capture)."""
    return bool((t[1:] > t[:-1]).all())


def integrate(window: _DiTWindow, x0: torch.Tensor, t: torch.Tensor, guidance: float, on_eval=None, *,
              rising: bool | None = None) -> torch.Tensor:
    """``RungeKutta4ODESolver(cfg_function, x0).integrate(t)[-1]``: x0 (B, W, 80) -> the mel (B, W, 80).

    The same ``_compute_step`` calls and additions as transformers' ``integrate``, without its
    per-step host syncs (a Python ``while`` over tensor comparisons, there to interpolate at time
    points that fall inside a step): for strictly increasing ``t`` every step ends on the next time
    point, where that interpolation returns the step's value itself -- so the bits are the same, and
    the loop can be captured in a CUDA graph. Other ``t`` go through transformers' own ``integrate``.
    ``rising``: :func:`increasing` of ``t``, if the caller knows it (checking is itself a host sync,
    which a graph capture refuses). ``on_eval``: called before each DiT evaluation
    (counters, cancellation; never inside a graph)."""

    def cfg_function(time_step, x):  # (B, W, 80) -> (B, W, 80)
        if on_eval is not None:
            on_eval()
        guided, null = torch.chunk(window(x, time_step), 2, dim=0)  # (B, W, 80) each
        return guided + (guided - null) * guidance

    solver = RungeKutta4ODESolver(function=cfg_function, initial_value=x0)
    if not (rising if rising is not None else increasing(t)):
        return solver.integrate(t)[-1]
    x = x0
    for t0, t1 in zip(t[:-1], t[1:]):
        delta, _ = solver._compute_step(cfg_function, t0, t1 - t0, t1, x)
        x = x + delta
    return x


@contextmanager
def batch_invariant_convs():
    """CPU convolutions that give each row the same result whatever the batch size.

    oneDNN (mkldnn) picks its conv blocking by batch size, so a span vocoded in a batch of 4 differs
    from the same span alone by ~2e-7 per conv, which the BigVGAN stack amplifies to ~5e-5 (tiny
    checkpoint). ATen's own conv loops over the rows (same GEMMs as batch 1); it cost 1.5-1.9x the
    oneDNN time on the tiny vocoder (CPU, 1 thread) until :func:`_bigvgan` took the anti-aliasing
    resamplers off the convs: now about the oneDNN time (benchmarks/token2wav_batch.py). ATen's
    grouped conv is not quite batch-invariant either on short inputs (a row of a batch of 3 can
    differ by ~1e-5 from the same row alone); :func:`_anti_aliased` is, being elementwise.
    The switch is process-wide for the call; solo and batched decoding both run under it, so they
    match bitwise, while transformers' own vocoder (oneDNN) differs by that rounding unless it too
    runs under this context. No effect on GPU tensors."""
    global _INVARIANT_USERS, _MKLDNN_BEFORE
    with _INVARIANT_LOCK:  # counted: batches on several threads (run_jobs) share the switch
        if _INVARIANT_USERS == 0:
            _MKLDNN_BEFORE = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _INVARIANT_USERS += 1
    try:
        yield
    finally:
        with _INVARIANT_LOCK:
            _INVARIANT_USERS -= 1
            if _INVARIANT_USERS == 0:
                torch._C._set_mkldnn_enabled(_MKLDNN_BEFORE)


_INVARIANT_LOCK = threading.Lock()
_INVARIANT_USERS = 0  # batch_invariant_convs blocks running now
_MKLDNN_BEFORE = True  # the switch as the first of them found it


@torch.no_grad()
def _run_vocoder(jobs: list[VocoderJob]) -> list[torch.Tensor]:
    """BigVGAN over B mel spans of equal length in one call (:func:`_bigvgan`, batch-invariant convs)."""
    frames, hop = jobs[0].e - jobs[0].s, jobs[0].stream.hop
    with batch_invariant_convs():
        wav = _bigvgan(jobs[0].stream.vocoder, torch.cat([j.mel for j in jobs]))  # (B, 240 F); squeezed at B = 1
    if wav.numel() != len(jobs) * hop * frames:
        raise RuntimeError(f"BigVGAN gave {wav.numel()} samples for {len(jobs)} x {frames} frames, expected hop {hop}")
    wav = wav.reshape(len(jobs), -1)  # (B, 240 F)
    return [wav[i] for i in range(len(jobs))]


def _bigvgan(voc, mel: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5OmniToken2WavBigVGANModel.forward(mel)`` -- mel (B, 80, F) -> samples (B, 240 F), squeezed
    -- with its 109 anti-aliased activations computed by :func:`_anti_aliased` (same bits; the whole
    vocoder 1.8x faster on CPU, 138 -> 77 ms for a 112-frame span); every other module is called as
    transformers calls it."""
    n = voc.num_residual_blocks
    h = voc.conv_pre(voc.process_mel_spectrogram(mel))  # (B, 64, F)
    for i in range(voc.num_upsample_layers):  # channels halve, time x upsample_rates[i]
        h = voc.ups[i][0](h)
        h = sum(_amp_block(voc.resblocks[i * n + j], h) for j in range(n)) / n  # sum() as transformers: 0 + ...
    h = voc.conv_post(_anti_aliased(voc.activation_post, h))  # (B, 1, 240 F)
    return torch.clamp(h, min=-1.0, max=1.0).squeeze().cpu()


def _amp_block(block, h: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5OmniAMPBlock.forward`` with :func:`_anti_aliased` activations. h: (B, C, T) -> (B, C, T)."""
    acts1, acts2 = block.activations[::2], block.activations[1::2]
    for conv1, conv2, act1, act2 in zip(block.convs1, block.convs2, acts1, acts2):
        h = h + conv2(_anti_aliased(act2, conv1(_anti_aliased(act1, h))))
    return h


def _anti_aliased(mod, x: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5OmniAntiAliasedActivation1d.forward``: upsample r x, SnakeBeta, downsample; (B, C, T) -> (B, C, T).

    transformers runs each resampler as a grouped conv with the same Kaiser filter for every
    channel; ATen's conv (the batch-invariant backend) loops over the channels, one tiny GEMM each --
    2350 calls, 60% of a span's vocoder time. Here the same sums are shifted slices times a filter
    tap, added in the conv's order, on whole (B, C, T) tensors, so the bits are the same (checked
    in tests/test_token2wav_fast.py). The upsampled signal is kept as its r phases (sample r u + q
    in phase q): SnakeBeta is elementwise and the downsampler reads each tap from one phase, so the
    signal is never interleaved, padded and split again. An unusual resampler falls back to the module.
    """
    up, down = mod.upsample, mod.downsample
    r = up.ratio
    # -- upsample: the transposed conv adds tap k of padded input i into output r i + k, taps ascending
    # (ATen's col2im), cropped by pad_left: phase q of the output takes taps k = q + pad_left (mod r),
    # tap k from padded input u + (q + pad_left - k) / r
    taps = [[(k, (q + up.pad_left - k) // r) for k in range((q + up.pad_left) % r, up.kernel_size, r)] for q in range(r)]
    if not (up.stride == r and down.stride == r and all(0 <= o <= 2 * up.pad for tq in taps for _, o in tq)):
        return mod(x)  # not the resampler shape of Qwen's checkpoints (r = 2, K = 12)
    b, c, t = x.shape
    xp = F.pad(x, (up.pad, up.pad), mode="replicate")  # (B, C, T + 2 pad)
    f, z = _taps(up.filter), x.new_empty(b, c, r, t)  # z: the upsampled signal by phase, (B, C, r, T)
    term = x.new_empty(b, c, t)  # one buffer for every tap's product (the sums are the same, in place)
    for q in range(r):
        acc = z[:, :, q]
        for i, (k, o) in enumerate(taps[q]):
            torch.mul(xp[..., o : o + t], f[k], out=acc if i == 0 else term)
            if i:
                acc.add_(term)
        acc.mul_(r)
    y = _snake_beta(mod.act, z.view(b, c, r * t)).view(b, c, r, t)  # elementwise: the phases stay apart
    # -- downsample: output n = sum over taps k, ascending, of f[k] z_padded[r n + k], z padded by
    # replicating its first/last sample: tap k reads phase (k - pad_left) mod r at n + (k - pad_left) // r
    f, pl = _taps(down.filter), down.pad_left
    n = (r * t + pl + down.pad_right - down.kernel_size) // r + 1
    offs = [(k - pl) // r for k in range(down.kernel_size)]
    left, right = max(0, -min(offs)), max(0, n - 1 + max(offs) - (t - 1))
    first, last = y[:, :, 0, :1], y[:, :, r - 1, -1:]  # z[0] and z[rT - 1], (B, C, 1) each
    phases = [torch.cat([first.expand(b, c, left), y[:, :, q], last.expand(b, c, right)], dim=-1) for q in range(r)]
    acc, term = x.new_empty(b, c, n), x.new_empty(b, c, n)
    for k, o in enumerate(offs):
        torch.mul(phases[(k - pl) % r][..., left + o : left + o + n], f[k], out=acc if k == 0 else term)
        if k:
            acc.add_(term)
    return acc  # (B, C, n)


def _snake_beta(act, x: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5OmniSnakeBeta.forward`` -- x + 1 / (e^beta + eps) * sin(x e^alpha)^2 -- with the same
    operations in the same order, done in place on one new tensor instead of five (pow(., 2) is x * x
    in ATen, and products and sums commute bit for bit). x: (B, C, T) -> (B, C, T)."""
    if not all(hasattr(act, a) for a in ("alpha", "beta", "no_div_by_zero")):
        return act(x)
    alpha = torch.exp(act.alpha.unsqueeze(0).unsqueeze(-1))  # (1, C, 1)
    inv_beta = 1.0 / (torch.exp(act.beta.unsqueeze(0).unsqueeze(-1)) + act.no_div_by_zero)  # (1, C, 1)
    s = x * alpha
    s.sin_()
    s.mul_(s)
    return s.mul_(inv_beta).add_(x)


def _taps(filt: torch.Tensor) -> list:
    """A resampler's (1, 1, K) filter as K 0-dim tensors, cached per filter tensor (no select per tap and call)."""
    hit = _TAPS.get(id(filt))
    if hit is None or hit[0]() is not filt or hit[1] != filt._version:  # a new, or a modified, filter
        hit = _TAPS[id(filt)] = (weakref.ref(filt), filt._version, list(filt.detach().reshape(-1).clone().unbind()))
    return hit[2]


_TAPS: dict = {}  # id(filter) -> (weak reference, version, taps)


def step_batch(streams, new_codes: dict | None = None, finals=()) -> dict:
    """One scheduler tick over many streams: feed each its new codes, mark ``finals`` finished, then
    run every stream's ready jobs batched across streams (:func:`run_jobs`) until all must wait.

    Returns ``{stream: [pcm chunks in order]}`` for every stream of ``streams``, each exactly the
    chunks solo ``push``/``finish`` would have returned (bit for bit on CPU, see the module docstring).
    Bad codes for any stream: ValueError (RuntimeError for a finished one) before anything is fed,
    so the caller can drop that stream and call again. Cancelled streams are skipped, even when
    ``cancel`` comes from another thread while their batch runs."""
    streams = list(streams)
    new_codes, finals = dict(new_codes or {}), set(finals)
    known = set(streams)
    if len(known) != len(streams):
        raise ValueError("step_batch(): a stream is listed twice")
    if not (set(new_codes) | finals) <= known:
        raise ValueError("step_batch(): new_codes/finals name a stream not in streams")
    checked = {}
    for i, st in enumerate(streams):
        if st in new_codes:
            try:
                checked[st] = st._checked(new_codes[st])
            except (ValueError, RuntimeError) as e:
                raise type(e)(f"stream #{i}: {e}") from None
    for st, codes in checked.items():
        st.feed(codes)
    for st in finals:
        st.close_input()
    out: dict = {st: [] for st in streams}
    while jobs := [job for st in streams for job in st.pending()]:
        for job, result in zip(jobs, run_jobs(jobs)):
            out[job.stream].extend(job.stream.accept(job, result))
    return out


class _DiTWindow:
    """``Qwen2_5OmniToken2WavDiTModel.forward`` (classifier-free guidance on) for B windows of one length.

    Everything but the noisy mel and the time step is the same at every ODE evaluation of a
    window: the codec embeddings (conditioned and dropped), the speaker features, the rotary
    tables and the per-layer block masks (additive: SDPA would rebuild (0, -inf) from a bool mask
    at every call, a quarter of the DiT's time). They are built once here; each call then runs the
    same modules, in the same order, as the transformers forward (so the result is identical). Rows
    are laid out as transformers' CFG batch: the B guided rows, then the B null rows.

    ``block_sparse`` (an option, off by default): attention over the allowed key blocks only
    (:class:`_BlockAttention`) and the input projection's constant part once per window -- the same
    maths in another float rounding order (mel within ~1e-6 of the default), ~1.5x faster.
    """

    def __init__(self, dit, code: torch.Tensor, cond: torch.Tensor, spk: torch.Tensor, n_frames: int,
                 block_sparse: bool = False):
        self.dit, self.n_frames, self.block_sparse = dit, n_frames, block_sparse
        code_embed = dit.text_embed(code, drop_code=False)  # (B, T, emb_dim)
        code_uncond = dit.text_embed(code, drop_code=True)
        speaker = cond.unsqueeze(1).repeat(1, n_frames, 1)  # (B, T, enc_emb_dim)
        mel_dim = dit.config.mel_dim
        # input_embed's cat((x, spk features, code embeds, speaker), -1), x left zero: (2B, T, 80 + ...)
        static = torch.cat(
            (
                torch.zeros(spk.shape[0], n_frames, mel_dim, dtype=spk.dtype, device=spk.device),
                spk.unsqueeze(1).repeat(1, n_frames, 1),
                torch.cat([code_embed, code_uncond], dim=0),
                torch.cat([speaker, torch.zeros_like(speaker)], dim=0),
            ),
            dim=-1,
        )
        rows = static.shape[0]  # 2B
        positions = torch.arange(n_frames, device=code.device)[None, :].repeat(rows, 1)  # (2B, T)
        self.rope = dit.rotary_embed(static, positions)
        proj = dit.input_embed.proj
        if block_sparse:  # proj(cat(x, rest)) = x W_x^T + (rest W_rest^T + bias): the constant half once
            self.w_x = proj.weight[:, :mel_dim]  # (hidden, 80)
            self.static_h = F.linear(static[..., mel_dim:], proj.weight[:, mel_dim:], proj.bias)  # (2B, T, hidden)
        else:
            self.inputs = static  # each call writes x into [..., :80] (no per-call cat of the rest)
        self.attns, made = [], {}  # per layer: its attention; layers of equal look-back/-ahead share one
        for layer in dit.transformer_blocks:
            key = (layer.look_backward_block, layer.look_ahead_block)
            if key not in made:
                if block_sparse:
                    made[key] = _BlockAttention(dit.block_size, *key, n_frames, static.dtype, code.device)
                else:
                    made[key] = _MaskedAttention(dit.block_size, *key, n_frames, static.dtype, code.device)
            self.attns.append(made[key])

    def __call__(self, x: torch.Tensor, time_step: torch.Tensor) -> torch.Tensor:
        """One DiT evaluation: x (B, T, 80) at ``time_step`` -> (2B, T, 80), guided rows then null rows.

        The time-step path (time MLP, each layer's AdaLayerNormZero linear) runs on the 2 rows of a
        batch-1 call and is then repeated per window: its values are the same for every window, and
        a GEMM of 2B rows may round differently from one of 2 (measured 3e-7), which would make a
        session's audio depend on who shares its batch. The rest is row-wise and batch-invariant."""
        dit, b = self.dit, x.shape[0]

        def per_row(m):  # (2, D) -> (2B, D): the guided row for the B guided rows, then the null row
            return m.repeat_interleave(b, dim=0)

        t = dit.time_embed(time_step.repeat(2))  # (2, hidden)
        if self.block_sparse:
            xh = F.linear(x, self.w_x)  # (B, T, hidden): the same for a window's guided and null rows
            h = (self.static_h.view(2, b, *xh.shape[1:]) + xh).flatten(0, 1)  # (2B, T, hidden)
        else:
            self.inputs.view(2, b, *self.inputs.shape[1:])[..., : x.shape[-1]] = x  # both CFG halves
            h = dit.input_embed.proj(self.inputs)  # (2B, T, hidden)
        for layer, attn in zip(dit.transformer_blocks, self.attns):
            an = layer.attn_norm  # Qwen2_5_OmniAdaLayerNormZero.forward, its linear on the 2 time rows
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(
                per_row(an.linear(an.silu(t))), 6, dim=1)  # each (2B, hidden)
            norm = an.norm(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            h = h + gate_msa.unsqueeze(1) * attn(layer.attn, norm, self.rope)
            norm = layer.ff_norm(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            h = h + gate_mlp.unsqueeze(1) * layer.ff(norm)
        no = dit.norm_out  # Qwen2_5_OmniAdaLayerNormZero_Final.forward, likewise
        scale, shift = torch.chunk(per_row(no.linear(no.silu(t))), 2, dim=1)  # each (2B, hidden)
        h = no.norm(h) * (1 + scale)[:, None, :] + shift[:, None, :]
        return dit.proj_out(h)  # (2B, T, mel_dim)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as SDPA uses it: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, -math.inf)


class _MaskedAttention:
    """A DiT layer's attention as transformers runs it -- all T x T scores, its block mask -- with the
    mask built once per window, additive and (1, 1, T, T): the bits SDPA computes from the bool one."""

    def __init__(self, block: int, back: int, ahead: int, n_frames: int, dtype: torch.dtype, device):
        blk = torch.arange(n_frames, device=device) // block  # as DiT._create_block_diff
        diff = blk[None, :] - blk[:, None]  # (T, T): key block - query block
        self.mask = _additive((diff >= -back) & (diff <= ahead), dtype)[None, None]  # (1, 1, T, T)

    def __call__(self, attn, x: torch.Tensor, rope) -> torch.Tensor:
        return attn(hidden_states=x, position_embeddings=rope, attention_mask=self.mask)


class _BlockAttention:
    """``DiTAttention.forward`` computed only where its block mask allows (the ``block_sparse`` option).

    A DiT layer lets frame i attend to the frames of its own block of ``block_size`` and of
    ``back`` blocks before / ``ahead`` blocks after it; transformers computes all T x T scores and
    masks most of them out (a 216-frame window = 9 blocks: 7/9 of a look-back layer's scores are
    -inf). Here each block of queries attends to its (back + 1 + ahead) blocks of keys only -- the
    same softmax over the same allowed scores, 4.5-9x fewer scores -- but CPU flash attention then
    sums them in another order (its SIMD lanes and GEMM K-splits follow the key positions), so the
    result differs by float rounding (~1e-7 per call): an option, not the default.
    """

    def __init__(self, block: int, back: int, ahead: int, n_frames: int, dtype: torch.dtype, device):
        self.block, self.back, self.ahead = block, back, ahead
        self.n_blocks = -(-n_frames // block)
        self.span = (back + 1 + ahead) * block  # keys per query block
        self.pad = self.n_blocks * block - n_frames  # frames padding the last block
        q_block = torch.arange(self.n_blocks, device=device)[:, None]  # (nb, 1)
        key_pos = (q_block - back) * block + torch.arange(self.span, device=device)[None, :]  # (nb, span)
        allowed = (key_pos >= 0) & (key_pos < n_frames)  # not before the window, not padding
        self.mask = _additive(allowed, dtype)[None, :, None, :]  # (1, nb, 1, span): all rows, heads, queries

    def __call__(self, attn, x: torch.Tensor, rope) -> torch.Tensor:
        """x (R, T, hidden) -> (R, T, hidden), as ``attn(hidden_states=x, position_embeddings=rope,
        attention_mask=<the layer's block mask>)``."""
        r, t, heads = x.shape[0], x.shape[1], attn.heads
        q, k, v = (proj(x).view(r, t, heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        d = q.shape[-1]  # each (R, H, T, d)
        cos, sin = rope  # RoPE on the first head only, as DiTAttention does (the checkpoint's layout)
        q[:, :1], k[:, :1] = apply_rotary_pos_emb(deinterleave_head_dim(q[:, :1]), deinterleave_head_dim(k[:, :1]),
                                                  cos, sin)
        nb, bs = self.n_blocks, self.block
        q = F.pad(q, (0, 0, 0, self.pad)).reshape(r * heads, nb, bs, d)  # (RH, nb, bs, d)

        def gathered(z):  # (R, H, T, d) -> (RH, nb, span, d): each query block's key blocks
            z = F.pad(z, (0, 0, self.back * bs, self.pad + self.ahead * bs))  # (R, H, (nb + back + ahead) bs, d)
            return z.unfold(2, self.span, bs).transpose(-1, -2).reshape(r * heads, nb, self.span, d)

        out = F.scaled_dot_product_attention(q, gathered(k), gathered(v), attn_mask=self.mask)  # (RH, nb, bs, d)
        out = out.reshape(r, heads, nb * bs, d)[:, :, :t].transpose(1, 2).reshape(r, t, heads * d)  # (R, T, H d)
        return attn.to_out[1](attn.to_out[0](out.to(x.dtype)))
