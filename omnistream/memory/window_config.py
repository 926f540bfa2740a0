"""What a :class:`~omnistream.memory.window_cache.WindowCache` is built from: its sizes and the model's RoPE.

:class:`WindowConfig` is the user-facing size of the cache (sinks, window, scratch, rebase period, shift
mode, kernel mode); :meth:`WindowConfig.resolve` fills in the sizes that depend on the model's context.
:func:`rope_setup` reads the RoPE frequencies and the M-RoPE section split from the model config, because
the cache re-positions keys itself (rotated layout) or hands slot positions to the kernel (kernel mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["AUDIO_TOKENS_PER_SECOND", "WindowConfig", "rope_setup", "text_config"]

AUDIO_TOKENS_PER_SECOND = 25  # Qwen2.5-Omni audio tokens per second (also TMRoPE t-positions per second)


@dataclass(frozen=True)
class WindowConfig:
    """Size of a :class:`WindowCache`.

    * ``sink_tokens`` (4): first tokens of the session kept forever at their own positions.
    * ``window_tokens`` (``None``): most recent tokens kept. ``None`` sizes the window to the model's
      context: ``max_position_embeddings - sink_tokens - chunk_tokens - rebase_every`` (with
      ``rebase_every`` a fifth of the remainder, i.e. ``W / 4``), so rotated
      positions stay inside the trained context (for streams advancing <= 1 position per token and
      chunks <= ``chunk_tokens``).
    * ``chunk_tokens`` (256): preallocated scratch for the new tokens of one forward (a decode step
      needs 1; a 2-s audio+video chunk ~ 180). Larger chunks still work (one transient copy).
    * ``rebase_every`` (``None`` = ``W // 4``): how far the base offset may drift before the window
      keys are re-rotated (1 = exact StreamingLLM positions at every step). Each rebase rounds the
      stored keys once (in bf16 ~2^-9 relative), so a key lives through at most ``W / rebase_every
      + 1`` (5 by default) roundings; the price is rotated positions up to ``rebase_every`` above
      StreamingLLM's. Compute per token: ``W / rebase_every`` key rotations (4), amortized.
    * ``shift`` (``"uniform"``): one shift for t, h, w; ``"per_axis"``: one per component (see
      :mod:`omnistream.memory.window_positions`).
    * ``kernel`` (``None``): store PRE-RoPE keys and decode through the Triton kernel
      (:mod:`omnistream.memory.window_kernel`). ``None``: :func:`window_thinker` turns it on when the
      model is on CUDA; a bare :class:`WindowCache` treats ``None`` as off. ``True`` needs the model's
      attention routed through :func:`omnistream.kernels.window_attention.enable_window_attention`
      (``window_thinker`` does it).
    """

    sink_tokens: int = 4
    window_tokens: int | None = None
    chunk_tokens: int = 256
    rebase_every: int | None = None
    shift: str = "uniform"
    kernel: bool | None = None

    def __post_init__(self):
        if self.sink_tokens < 0 or self.chunk_tokens < 0:
            raise ValueError("sink_tokens and chunk_tokens must be >= 0")
        if self.window_tokens is not None and self.window_tokens < 1:
            raise ValueError("window_tokens must be >= 1")
        if self.rebase_every is not None and self.rebase_every < 1:
            raise ValueError("rebase_every must be >= 1")
        if self.shift not in ("uniform", "per_axis"):
            raise ValueError(f"shift must be 'uniform' or 'per_axis', not {self.shift!r}")

    @classmethod
    def from_seconds(cls, seconds: float, tokens_per_second: float = AUDIO_TOKENS_PER_SECOND, **kw) -> WindowConfig:
        """A window holding ``seconds`` of media. ``tokens_per_second`` defaults to audio alone (25);
        for audio + video pass e.g. ``25 + 64`` (64 merged video tokens per 1-s temporal patch)."""
        if seconds <= 0 or tokens_per_second <= 0:
            raise ValueError("seconds and tokens_per_second must be > 0")
        return cls(window_tokens=max(1, math.ceil(seconds * tokens_per_second)), **kw)

    def resolve(self, max_position_embeddings: int | None = None) -> WindowConfig:
        """Fill in ``window_tokens`` and ``rebase_every``."""
        w, r = self.window_tokens, self.rebase_every
        if w is None:
            if not max_position_embeddings:
                raise ValueError("window_tokens=None needs the model's max_position_embeddings")
            room = max_position_embeddings - self.sink_tokens - self.chunk_tokens
            r = r if r is not None else max(1, room // 5)
            w = room - r
            if w < 1:
                raise ValueError(f"context {max_position_embeddings} too small for this window config")
        if r is None:
            r = max(1, w // 4)
        return replace(self, window_tokens=int(w), rebase_every=int(r))


def text_config(config):
    """The language model's config (a full Omni/Thinker config is reduced with ``get_text_config``)."""
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rope_setup(config, inv_freq, mrope_section):
    """(inv_freq (D/2,) float64 CPU, component of each frequency (D/2,) long, mrope_section list)."""
    if inv_freq is None:
        rp = getattr(config, "rope_parameters", None) or {}
        if rp.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rp.get('rope_type')!r}: pass inv_freq explicitly")
        theta = rp.get("rope_theta", getattr(config, "rope_theta", None))
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if mrope_section is None:
            mrope_section = rp.get("mrope_section")
    inv_freq = inv_freq.detach().to("cpu", torch.float64).flatten()
    half = inv_freq.numel()
    if mrope_section is None:
        mrope_section = [half]  # 1-D RoPE: every frequency reads component 0
    comp = torch.tensor([j % 3 for j, c in enumerate(mrope_section) for _ in range(int(c))], dtype=torch.long)
    if comp.numel() != half:
        raise ValueError(f"mrope_section {list(mrope_section)} does not sum to head_dim/2 = {half}")
    return inv_freq, comp, [int(c) for c in mrope_section]
