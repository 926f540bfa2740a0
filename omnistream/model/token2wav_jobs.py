"""Token2Wav work of many streams in one call: the jobs, their batched runners, the scheduler's tick.

A :class:`~omnistream.model.token2wav.StreamingToken2Wav` plans its work as jobs --
:class:`DiTJob` (one DiT window: codes, the window's initial noise) and :class:`VocoderJob` (one
BigVGAN mel span) -- and takes their results back (``pending`` / ``accept``). :func:`run_jobs`
runs the jobs of any streams, one batched forward per group of equal shape (:class:`_DiTWindow`
for the DiT, BigVGAN on :func:`batch_invariant_convs`); :func:`step_batch` is the scheduler's
tick over many streams. Solo ``push``/``finish`` are the batch-1 case of the same runners, which is
why a batched stream equals its solo run bit for bit on CPU (see token2wav.py's docstring).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

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
        return ("dit", id(s.dit), self.noise.shape[1], s.num_steps, s.guidance_scale, s.sway, self.noise.dtype,
                str(self.noise.device))


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


def run_jobs(jobs: list) -> list:
    """Run ``jobs`` of any streams, one batched forward per group of equal :attr:`key`; results in
    ``jobs`` order (a DiT job's (1, 80, W) mel, a vocoder job's (240 (e - s),) samples).

    A job whose stream is cancelled -- before or while its group runs -- gets None; a group stops
    early only when every stream in it is cancelled, so one cancel never disturbs the others."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        if not job.stream.cancelled:
            groups.setdefault(job.key, []).append(i)
    results: list = [None] * len(jobs)
    for idx in groups.values():
        group = [jobs[i] for i in idx]
        try:
            outs = _run_dit(group) if isinstance(group[0], DiTJob) else _run_vocoder(group)
        except _Cancelled:
            continue
        for i, out in zip(idx, outs):
            results[i] = None if jobs[i].stream.cancelled else out
    return results


@torch.no_grad()
def _run_dit(jobs: list[DiTJob]) -> list[torch.Tensor]:
    """``Qwen2_5OmniToken2WavDiTModel.sample`` for B windows of equal length, the initial noise passed
    in (same ops, same order as transformers), per-window constants computed once, not per evaluation."""
    first = jobs[0].stream
    n_frames = jobs[0].noise.shape[1]
    code = torch.cat([j.code for j in jobs])  # (B, W / r)
    x0 = torch.cat([j.noise for j in jobs])  # (B, W, 80)
    cond = torch.cat([j.stream.cond for j in jobs])  # (B, enc_emb_dim)
    spk = [j.stream._speaker_features() for j in jobs]  # each (2, enc_dim): [voice, CFG zeros]
    spk = torch.cat([f[:1] for f in spk] + [f[1:] for f in spk])  # (2B, enc_dim): guided rows, then null rows
    window = _DiTWindow(first.dit, code, cond, spk, n_frames)
    g = first.guidance_scale

    def ode_function(time_step, hidden_states):  # (B, W, 80) -> (B, W, 80)
        live = [j.stream for j in jobs if not j.stream.cancelled]
        if not live:
            raise _Cancelled
        for st in live:
            st.dit_evals += 1
            st.dit_frame_evals += n_frames
        guided, null = torch.chunk(window(hidden_states, time_step), 2, dim=0)  # (B, W, 80) each
        return guided + (guided - null) * g

    t = torch.linspace(0, 1, first.num_steps, dtype=cond.dtype, device=cond.device)
    if first.sway is not None:
        t += first.sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    trajectory = RungeKutta4ODESolver(function=ode_function, initial_value=x0).integrate(t)
    mel = trajectory[-1].permute(0, 2, 1)  # (B, 80, W)
    return [mel[i : i + 1] for i in range(len(jobs))]


@contextmanager
def batch_invariant_convs():
    """CPU convolutions that give each row the same result whatever the batch size.

    oneDNN (mkldnn) picks its conv blocking by batch size, so a span vocoded in a batch of 4 differs
    from the same span alone by ~2e-7 per conv, which the BigVGAN stack amplifies to ~5e-5 (tiny
    checkpoint). ATen's own conv loops over the rows (same GEMMs as batch 1); it costs 1.5-1.9x the
    oneDNN time on the tiny vocoder (measured, CPU, 1 thread) -- the price of exact batching.
    The switch is process-wide for the call; solo and batched decoding both run under it, so they
    match bitwise, while transformers' own vocoder (oneDNN) differs by that rounding unless it too
    runs under this context. No effect on GPU tensors."""
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(prev)


@torch.no_grad()
def _run_vocoder(jobs: list[VocoderJob]) -> list[torch.Tensor]:
    """BigVGAN over B mel spans of equal length in one call."""
    frames, hop = jobs[0].e - jobs[0].s, jobs[0].stream.hop
    with batch_invariant_convs():
        wav = jobs[0].stream.vocoder(torch.cat([j.mel for j in jobs]))  # (B, 240 F); BigVGAN squeezes B = 1
    if wav.numel() != len(jobs) * hop * frames:
        raise RuntimeError(f"BigVGAN gave {wav.numel()} samples for {len(jobs)} x {frames} frames, expected hop {hop}")
    wav = wav.reshape(len(jobs), -1)  # (B, 240 F)
    return [wav[i] for i in range(len(jobs))]


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
    tables and the per-layer block masks. They are built once here; each call then runs the same
    modules, in the same order, as the transformers forward (so the result is identical). Rows are
    laid out as transformers' CFG batch: the B guided rows, then the B null rows.
    """

    def __init__(self, dit, code: torch.Tensor, cond: torch.Tensor, spk: torch.Tensor, n_frames: int):
        self.dit, self.n_frames = dit, n_frames
        code_embed = dit.text_embed(code, drop_code=False)  # (B, T, emb_dim)
        code_uncond = dit.text_embed(code, drop_code=True)
        speaker = cond.unsqueeze(1).repeat(1, n_frames, 1)  # (B, T, enc_emb_dim)
        # input_embed's cat((x, spk features, code embeds, speaker), -1) minus x: (2B, T, ...)
        self.static = torch.cat(
            (
                spk.unsqueeze(1).repeat(1, n_frames, 1),
                torch.cat([code_embed, code_uncond], dim=0),
                torch.cat([speaker, torch.zeros_like(speaker)], dim=0),
            ),
            dim=-1,
        )
        rows = self.static.shape[0]  # 2B
        positions = torch.arange(n_frames, device=code.device)[None, :].repeat(rows, 1)  # (2B, T)
        self.rope = dit.rotary_embed(self.static, positions)
        block_diff = dit._create_block_diff(self.static)  # (2B, H, T, T)
        masks: dict = {}
        self.masks = []
        for layer in dit.transformer_blocks:
            key = (layer.look_backward_block, layer.look_ahead_block)
            if key not in masks:
                masks[key] = (block_diff >= -float(key[0])) & (block_diff <= float(key[1]))
            self.masks.append(masks[key])

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
        h = dit.input_embed.proj(torch.cat((torch.cat([x, x], dim=0), self.static), dim=-1))  # (2B, T, hidden)
        for layer, mask in zip(dit.transformer_blocks, self.masks):
            an = layer.attn_norm  # Qwen2_5_OmniAdaLayerNormZero.forward, its linear on the 2 time rows
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(
                per_row(an.linear(an.silu(t))), 6, dim=1)  # each (2B, hidden)
            norm = an.norm(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            h = h + gate_msa.unsqueeze(1) * layer.attn(hidden_states=norm, position_embeddings=self.rope,
                                                       attention_mask=mask)
            norm = layer.ff_norm(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            h = h + gate_mlp.unsqueeze(1) * layer.ff(norm)
        no = dit.norm_out  # Qwen2_5_OmniAdaLayerNormZero_Final.forward, likewise
        scale, shift = torch.chunk(per_row(no.linear(no.silu(t))), 2, dim=1)  # each (2B, hidden)
        h = no.norm(h) * (1 + scale)[:, None, :] + shift[:, None, :]
        return dit.proj_out(h)  # (2B, T, mel_dim)
