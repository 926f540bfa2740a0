"""The frame-granular K/V memory behind JanusVLN's dual implicit memory (omnistream/memory/dual.py).

Oracle: brute-force softmax attention over the K/V of exactly the frames that should be kept (the
initial ones and the most recent ones, the current frame included), recorded as they were produced.
"""

from __future__ import annotations

import pytest
import torch

from omnistream.memory.dual import DualMemory, FrameKV, MemoryConfig


def _attn(q, k, v):
    """Plain softmax attention, (B, H, n, D) x (B, H, m, D) -> (B, H, n, D), no mask."""
    w = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return w.softmax(-1) @ v


def _kept(t: int, cfg: MemoryConfig) -> list[int]:
    """Frames frame t (0-based) attends to, itself included, re-derived from the two trim rules.

    trim after the step (JanusVLN: the aggregator appends frame t's K/V to a cache trimmed after step
    t-1): the initial frames and the ``recent_frames`` frames *before* t, then t. Trim before: the
    initial frames and the ``recent_frames`` most recent frames, t counted among them."""
    I, R = cfg.initial_frames, cfg.recent_frames
    if cfg.trim_after_step:
        before = list(range(t))
        return before[:I] + before[I:][-R:] + [t]
    frames = list(range(t + 1))
    return frames[:I] + frames[I:][-R:]


def test_janusvln_window_attends_57_frames():
    """The default is JanusVLN's rule: 8 initial + the 48 frames before + the new one."""
    cfg = MemoryConfig()
    assert cfg.trim_after_step and cfg.attended_frames == 57
    assert len(_kept(100, cfg)) == 57 and _kept(100, cfg)[8] == 100 - 48
    assert MemoryConfig(trim_after_step=False).attended_frames == 56


@pytest.mark.parametrize("cfg", [MemoryConfig(2, 3), MemoryConfig(0, 4), MemoryConfig(8, 48), MemoryConfig(2, 3, False),
                                 MemoryConfig(0, 1, False), MemoryConfig(8, 48, False)])
def test_eviction_keeps_initial_and_recent_and_attention_matches(cfg):
    g = torch.Generator().manual_seed(0)
    L, B, H, F, D = 2, 1, 2, 5, 8
    mem = FrameKV(L, cfg)
    frames_k, frames_v = [[] for _ in range(L)], [[] for _ in range(L)]
    sizes = []
    T = cfg.capacity + 7
    for t in range(T):
        mem.begin(F, frame=F)
        for layer in range(L):
            k = torch.randn(B, H, F, D, generator=g)
            v = torch.randn(B, H, F, D, generator=g)
            frames_k[layer].append(k)
            frames_v[layer].append(v)
            K, V = mem.write(layer, k, v)
            if cfg.initial_frames + 2 < t < cfg.capacity - 2:
                continue  # brute force where it matters: filling, the first eviction and after
            q = torch.randn(B, H, 3, D, generator=g)
            kept = _kept(t, cfg)
            Kb = torch.cat([frames_k[layer][f] for f in kept], dim=-2)
            Vb = torch.cat([frames_v[layer][f] for f in kept], dim=-2)
            assert K.shape[-2] == len(kept) * F
            torch.testing.assert_close(_attn(q, K, V), _attn(q, Kb, Vb), atol=1e-6, rtol=1e-5)
            # the new frame's rows come last, so a causal mask with query offset = held tokens is exact
            torch.testing.assert_close(K[:, :, -F:], k)
        mem.end()
        assert mem.kept_frames() == _kept(t, cfg)
        sizes.append(mem.memory_bytes())
    assert mem.held_frames == cfg.attended_frames and mem.frames_seen == T
    # allocated once at the first frame: constant, and bounded by capacity + 1 frames (the kept ones + the new one)
    assert len(set(sizes)) == 1
    assert sizes[0] == L * 2 * B * H * (cfg.capacity + 1) * F * D * 4


def test_prefix_and_transient_tokens():
    """The prefix stays; transient tokens are visible until the next frame and then dropped."""
    g = torch.Generator().manual_seed(1)
    mem = FrameKV(1, MemoryConfig(1, 1), tail_tokens=16)
    B, H, D, F = 1, 1, 4, 3

    def fwd(n, **kw):
        mem.begin(n, **kw)
        k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
        K, _V = mem.write(0, k, v)
        mem.end()
        return k, K

    p_k, _ = fwd(4, prefix=4)
    f0, K = fwd(F + 2, frame=F)  # frame 0 + 2 transient tokens (a prompt suffix)
    assert mem.seq_length == 4 + F + 2 and mem.transient == 2
    _t_k, K = fwd(1)  # one generated token sees prefix, frame and suffix
    assert K.shape[-2] == 4 + F + 3
    torch.testing.assert_close(K[:, :, :4], p_k)
    _f1, K = fwd(F + 2, frame=F)  # the next frame drops the transient tokens (and brings two of its own)
    assert K.shape[-2] == 4 + 2 * F + 2
    f2, K = fwd(F + 3, frame=F)  # JanusVLN's trim: frame 2 still sees frame 1 (the recent frame before it)
    assert mem.kept_frames() == [0, 1, 2] and K.shape[-2] == 4 + 3 * F + 3
    _t_k, K = fwd(1)  # the transient tokens stay right after the new frame: a generated token sees them all
    torch.testing.assert_close(K[:, :, 4 + 3 * F : 4 + 3 * F + 3], f2[:, :, F:])
    f3, K = fwd(F, frame=F)  # now frame 1 leaves (trimmed lazily, at this frame), prefix + frame 0 stay
    assert mem.kept_frames() == [0, 2, 3]
    rows = torch.cat([p_k, f0[:, :, :F], f2[:, :, :F], f3], dim=-2)
    assert torch.equal(K.sort(dim=-2).values, rows.sort(dim=-2).values)


def test_misuse_gives_clear_errors():
    mem = FrameKV(1, MemoryConfig(1, 2))
    k = torch.zeros(1, 1, 3, 4)
    with pytest.raises(RuntimeError, match="outside begin"):
        mem.write(0, k, k)
    mem.begin(3, frame=3)
    with pytest.raises(ValueError, match="new tokens"):
        mem.write(0, k[:, :, :2], k[:, :, :2])
    mem.write(0, k, k)
    with pytest.raises(RuntimeError, match="twice"):
        mem.write(0, k, k)
    mem.end()
    with pytest.raises(ValueError, match="same token count"):
        mem.begin(4, frame=4)
    with pytest.raises(ValueError, match="before the first frame"):
        mem.begin(2, prefix=2)
    with pytest.raises(ValueError):
        MemoryConfig(initial_frames=-1)
    mem.begin(3, frame=3)
    mem.abort()  # a failed forward leaves the memory usable
    mem.begin(3, frame=3)
    mem.write(0, k, k)
    mem.end()
    assert mem.kept_frames() == [0, 1]


def test_dual_memory_reset_keeps_buffers():
    dm = DualMemory(vggt_layers=1, llm_layers=1, config=MemoryConfig(1, 1))
    k = torch.ones(1, 1, 2, 4)
    dm.spatial.begin(2, frame=2)
    dm.spatial.write(0, k, k)
    dm.spatial.end()
    b = dm.memory_bytes()
    dm.reset()
    assert dm.spatial.held_frames == 0 and dm.spatial.frames_seen == 0
    assert dm.memory_bytes() == b > 0
