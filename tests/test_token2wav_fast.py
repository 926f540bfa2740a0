"""The fast Token2Wav paths against transformers' own modules, bit for bit where they claim it.

Oracles: transformers' ``Qwen2_5OmniAntiAliasedActivation1d`` (up, SnakeBeta, down) / BigVGAN forward run
on ATen convs (the streams' batch-invariant backend), its ``DiTAttention`` with the layer's bool block
mask, and its ``code2wav_dit_model.sample`` after seeding torch's RNG like the stream's noise.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniAntiAliasedActivation1d,
    Qwen2_5OmniSnakeBeta,
)

from omnistream.model.token2wav import StreamingConfig, decode_offline, decode_stream
from omnistream.model.token2wav_jobs import (
    _anti_aliased,
    _bigvgan,
    _BlockAttention,
    _MaskedAttention,
    batch_invariant_convs,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py




@pytest.mark.parametrize("channels,frames", [(32, 17), (8, 400), (1, 1202), (2, 13440)])
def test_anti_aliased_activation_equals_transformers_bitwise(channels, frames):
    """Every row of a batch == transformers' up/SnakeBeta/down module on that row alone (ATen's grouped
    conv itself can round a row of a short batched input differently from the same row alone)."""
    g = torch.Generator().manual_seed(channels)
    mod = Qwen2_5OmniAntiAliasedActivation1d(Qwen2_5OmniSnakeBeta(channels))
    with torch.no_grad():
        mod.act.alpha.copy_(torch.randn(channels, generator=g) * 0.5)
        mod.act.beta.copy_(torch.randn(channels, generator=g) * 0.5)
    with torch.no_grad(), batch_invariant_convs():
        for batch in (1, 3, 8):
            x = torch.randn(batch, channels, frames, generator=g) * 3  # (B, C, T)
            got = _anti_aliased(mod, x)
            assert got.shape == (batch, channels, frames)
            for i in range(batch):
                assert torch.equal(got[i : i + 1], mod(x[i : i + 1]))


def test_other_resampler_shapes_fall_back_to_the_module():
    mod = Qwen2_5OmniAntiAliasedActivation1d(Qwen2_5OmniSnakeBeta(4), up_ratio=2, down_ratio=3, down_kernel_size=9)
    x = torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_anti_aliased(mod, x), mod(x))


def test_bigvgan_equals_transformers_alone_and_is_batch_invariant(tiny):
    """Alone: the same bits as transformers' BigVGAN on ATen convs. In a batch: each row the same bits
    as alone (ATen's own grouped convs are not quite batch-invariant: a row of a batch of 3 can differ
    by ~1e-5 from the same span alone)."""
    voc = tiny.token2wav.code2wav_bigvgan_model
    mels = torch.randn(3, 80, 30, generator=torch.Generator().manual_seed(3)) - 4.0  # (3, 80, 30)
    with torch.no_grad(), batch_invariant_convs():
        batched = _bigvgan(voc, mels).reshape(3, -1)  # (3, 7200)
        for i in range(3):
            alone = _bigvgan(voc, mels[i : i + 1])  # (7200,)
            assert alone.shape == (240 * 30,)
            assert torch.equal(alone, voc(mels[i : i + 1]))
            assert torch.equal(batched[i], alone)


@pytest.mark.parametrize("frames", [24, 50, 90, 216])
def test_block_attention_equals_masked_full_attention(tiny, frames):
    """Every layer kind (look back, own block, look ahead), windows that are not whole blocks."""
    dit = tiny.token2wav.code2wav_dit_model
    g = torch.Generator().manual_seed(frames)
    x = torch.randn(4, frames, dit.config.hidden_size, generator=g)  # (R, T, hidden)
    rope = dit.rotary_embed(x, torch.arange(frames)[None].repeat(4, 1))
    block_diff = dit._create_block_diff(x)  # (R, H, T, T)
    seen = set()
    with torch.no_grad():
        for layer in dit.transformer_blocks:
            key = (layer.look_backward_block, layer.look_ahead_block)
            seen.add(key)
            mask = (block_diff >= -float(key[0])) & (block_diff <= float(key[1]))
            want = layer.attn(hidden_states=x, position_embeddings=rope, attention_mask=mask)
            exact = _MaskedAttention(dit.block_size, *key, frames, x.dtype, x.device)(layer.attn, x, rope)
            fast = _BlockAttention(dit.block_size, *key, frames, x.dtype, x.device)(layer.attn, x, rope)
            assert torch.equal(exact, want)
            assert fast.shape == want.shape and (fast - want).abs().max().item() <= 1e-6
    assert seen == {(1, 0), (0, 0), (0, 1)}


def test_default_dit_is_transformers_sample_bitwise_and_block_sparse_is_close(tiny):
    t2w = tiny.token2wav
    from test_token2wav import _voice

    cond, ref_mel = _voice(tiny, "Ethan")
    codes = torch.randint(0, 8192, (1, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.manual_seed(7)
        want = t2w.code2wav_dit_model.sample(cond, ref_mel, codes)  # (1, 80, 90)
    exact = decode_offline(t2w, codes, cond, ref_mel, seed=7)
    fast = decode_offline(t2w, codes, cond, ref_mel, seed=7, block_sparse=True)
    assert torch.equal(exact.mel, want)
    assert fast.mel.shape == want.shape and (fast.mel - want).abs().max().item() <= 1e-5
    # A streamed reply with the option on: same chunking, same length, the mel still close.
    cfg = StreamingConfig(chunk_codes=12, left_codes=12, right_codes=6, vocoder_context_frames=8, first_chunk_codes=6,
                          block_align=True)
    a = decode_stream(t2w, codes, cond, ref_mel, cfg, seed=7, num_steps=4)
    b = decode_stream(t2w, codes, cond, ref_mel, cfg, seed=7, num_steps=4, block_sparse=True)
    assert a.pcm.shape == b.pcm.shape == (240 * 90,)
    assert (a.mel - b.mel).abs().max().item() <= 1e-5
