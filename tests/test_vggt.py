"""The VGGT aggregator (omnistream/navigation/vggt.py): checkpoint layout and causal streaming.

Oracle for streaming: the aggregator run on all frames at once with an explicit causal frame mask on
its global attention (brute force, no cache); frame t streamed against the spatial memory must equal
that forward's frame t, at every layer.
"""

from __future__ import annotations

import pytest
import torch

from omnistream.memory.dual import FrameKV, MemoryConfig
from omnistream.navigation.vggt import VGGTAggregator, VGGTConfig, _infer_config, load_aggregator
from omnistream.random_checkpoints import _reinit

TINY = VGGTConfig(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, dino_depth=1, dino_heads=2)


@pytest.fixture(scope="module")
def agg():
    m = VGGTAggregator(TINY).eval()
    _reinit(m, 0)
    return m


def test_vggt_1b_parameter_names_and_shapes():
    """The names/shapes of facebook/VGGT-1B's aggregator.* entries (VGGT's Aggregator + DINOv2-L/14 reg)."""
    with torch.device("meta"):
        m = VGGTAggregator(VGGTConfig())
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {
        "camera_token": (1, 2, 1, 1024),
        "register_token": (1, 2, 4, 1024),
        "patch_embed.cls_token": (1, 1, 1024),
        "patch_embed.pos_embed": (1, 1370, 1024),
        "patch_embed.register_tokens": (1, 4, 1024),
        "patch_embed.mask_token": (1, 1024),
        "patch_embed.patch_embed.proj.weight": (1024, 3, 14, 14),
        "patch_embed.blocks.23.ls2.gamma": (1024,),
        "patch_embed.norm.bias": (1024,),
        "frame_blocks.23.attn.q_norm.weight": (64,),
        "global_blocks.0.attn.k_norm.bias": (64,),
        "global_blocks.23.attn.qkv.weight": (3072, 1024),
        "frame_blocks.0.mlp.fc1.weight": (4096, 1024),
        "frame_blocks.0.ls1.gamma": (1024,),
    }
    for k, shape in expected.items():
        assert sd.get(k) == shape, k
    assert not any(k.startswith("rope") for k in sd)  # RoPE has no parameters
    assert "patch_embed.blocks.0.attn.q_norm.weight" not in sd  # DINOv2 blocks have no QK-norm
    # norm1, qkv, q_norm, k_norm, proj, norm2, fc1, fc2 (weight + bias each) + ls1, ls2 gammas
    assert len([k for k in sd if k.startswith("frame_blocks.")]) == 24 * 18


def test_streaming_equals_causal_full_forward(agg):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(1, 5, 3, 42, 56, generator=g)  # non-square: interpolated position embedding
    with torch.no_grad():
        full = agg(imgs, causal=True)
        bidir = agg(imgs, causal=False)
    mem = FrameKV(TINY.depth, MemoryConfig(8, 48))
    for t in range(5):
        out = agg.step(imgs[:, t], mem)
        assert len(out) == TINY.depth and out[0].shape == (1, 5 + 3 * 4, 2 * TINY.embed_dim)
        for i in range(TINY.depth):
            torch.testing.assert_close(out[i][0], full[i][0, t], atol=1e-5, rtol=1e-5)
    # the mask matters (frame 0 sees later frames without it) and history changes the output
    assert (full[-1][0, 0] - bidir[-1][0, 0]).abs().max() > 1e-3
    mem2 = FrameKV(TINY.depth)
    agg.step(torch.rand(1, 3, 42, 56, generator=g), mem2)
    other = agg.step(imgs[:, 1], mem2)
    assert (other[-1][0] - full[-1][0, 1]).abs().max() > 1e-3


def _janus_kept(t: int, initial: int, recent: int, trim_after: bool = True) -> list[int]:
    """Frames frame t attends to. JanusVLN (src/qwen_vl/model/modeling_qwen2_5_vl.py) runs the aggregator
    with its cache, which appends frame t, and trims the cache to start 8 + recent 48 *afterwards*: frame t
    sees the initial frames, the `recent` frames before it and itself. Trimming first would count t as
    recent."""
    hist = list(range(t)) if trim_after else list(range(t + 1))
    kept = hist[:initial] + hist[initial:][-recent:]
    return kept + [t] if trim_after else kept


def test_streaming_with_eviction_keeps_janusvln_frames(agg):
    """Brute force over the kept frames: at the first layer a frame's K/V do not depend on its history, so the
    streamed frame's output equals the causal forward over exactly the frames the rule keeps (and not the
    set the trim-before rule would keep). Memory bytes stay constant."""
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(1, 7, 3, 28, 28, generator=g)
    mem = FrameKV(TINY.depth, MemoryConfig(1, 2))
    sizes = []
    for t in range(7):
        out = agg.step(imgs[:, t], mem)
        assert torch.isfinite(out[-1]).all()
        sizes.append(mem.memory_bytes())
        kept = _janus_kept(t, 1, 2)
        assert mem.kept_frames() == kept
        with torch.no_grad():
            ref = agg(imgs[:, kept], causal=True, num_layers=1)[0][0, -1]
        torch.testing.assert_close(out[0][0], ref, atol=1e-5, rtol=1e-5)
        if t >= 3:  # the trim-before set differs from here on, and so does its output
            before = _janus_kept(t, 1, 2, trim_after=False)
            with torch.no_grad():
                other = agg(imgs[:, before], causal=True, num_layers=1)[0][0, -1]
            assert (out[0][0] - other).abs().max() > 1e-4
    assert mem.kept_frames() == [0, 4, 5, 6] and len(set(sizes)) == 1
    # JanusVLN's sizes: frame 100 attends to 8 + 48 + 1 = 57 frames
    assert len(_janus_kept(100, 8, 48)) == 57 and len(_janus_kept(100, 8, 48, trim_after=False)) == 56


def test_load_by_name_and_infer_sizes():
    cfg = VGGTConfig(img_size=56, embed_dim=128, depth=2, num_heads=2, dino_depth=1, dino_heads=2)
    m = VGGTAggregator(cfg)
    _reinit(m, 3)
    sd = m.state_dict()
    assert _infer_config(sd) == cfg
    m2 = load_aggregator(sd)
    x = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(m2(x)[-1], m(x)[-1])
    bad = dict(sd)
    bad.pop("camera_token")
    with pytest.raises(RuntimeError, match="camera_token"):
        load_aggregator(bad, cfg)


def test_bad_images(agg):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        agg(torch.rand(1, 1, 3, 30, 28))
    with pytest.raises(ValueError, match="3 input channels"):
        agg(torch.rand(1, 1, 4, 28, 28))
    mem = FrameKV(TINY.depth)
    with pytest.raises(ValueError):
        agg.step(torch.rand(1, 3, 30, 28), mem)
    agg.step(torch.rand(1, 3, 28, 28), mem)  # the memory is still usable
    assert mem.kept_frames() == [0]
