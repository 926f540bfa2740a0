"""Streaming prefill (chunks appended to a KV cache as they arrive) == one offline Thinker forward."""

from __future__ import annotations

import random

import pytest
import torch

from omnistream.encoders.tmrope import Audio, AudioVideo, Image, Text, audio_block_tokens, segment_token_ids
from omnistream.model.thinker import StreamingThinker

TOL = 1e-4
BLOCK = 200  # mel frames per audio-encoder block (2 * n_window)


@pytest.fixture(scope="module")
def thinker(tiny):
    return tiny.thinker


def encode_audio_blocks(thinker, mel):
    """Encode a (128, L) log-mel block by block, as a stream would."""
    out = []
    with torch.inference_mode():
        for s in range(0, mel.shape[1], BLOCK):
            blk = mel[:, s : s + BLOCK][None]
            mask = torch.ones(1, blk.shape[2], dtype=torch.long)
            out.append(thinker.model.get_audio_features(blk, mask).last_hidden_state)
    return out


def encode_patches(thinker, pixels, grid):
    """Encode a video/image temporal patch by temporal patch (grid (1, h, w) each)."""
    t, h, w = grid
    out = []
    with torch.inference_mode():
        for k in range(t):
            rows = pixels[k * h * w : (k + 1) * h * w]
            out.append(thinker.model.get_video_features(rows, torch.tensor([[1, h, w]])).pooler_output[0])
    return out


def offline_logits(thinker, ids, **kw):
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = thinker(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False, **kw)
    return out.logits[0, -1]


def test_audio_and_text_streaming_equals_offline(thinker):
    g = torch.Generator().manual_seed(0)
    n_mel = 530  # blocks of 200, 200, 130 frames
    mel = torch.randn(128, n_mel, generator=g)
    pre, post = [1, 20, 30, 40], [50, 60, 2, 7, 9]
    segs = [Text(pre), Audio(audio_block_tokens(n_mel)), Text(post)]
    ids = segment_token_ids(thinker.config, segs)
    ref = offline_logits(
        thinker, ids, input_features=mel[None], feature_attention_mask=torch.ones(1, n_mel, dtype=torch.long)
    )

    st = StreamingThinker(thinker)
    st.append_text(pre[:1])
    st.append_text(pre[1:])
    st.begin_audio()
    for blk in encode_audio_blocks(thinker, mel):
        st.append_audio_block(blk)
    st.end_segment()
    for i in range(0, len(post), 2):
        st.append_text(post[i : i + 2])
    assert st.n_tokens == len(ids)
    diff = (st.next_token_logits() - ref).abs().max().item()
    print(f"max abs logit diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_image_and_audio_in_video_streaming_equals_offline(thinker, seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    img_grid, vid_grid, spg = (1, 4, 6), (rnd.randint(2, 4), 4, 4), rnd.choice([0.5, 1.0, 2.0])
    n_mel = rnd.randint(250, 700)
    pix_img = torch.randn(24, 1176, generator=g)
    pix_vid = torch.randn(vid_grid[0] * 16, 1176, generator=g)
    mel = torch.randn(128, n_mel, generator=g)
    t1, t2, t3 = [3, 4, 5], [8, 9], [11, 12, 13, 14]
    av = AudioVideo(vid_grid, spg, audio_block_tokens(n_mel))
    ids = segment_token_ids(thinker.config, [Text(t1), Image(img_grid), Text(t2), av, Text(t3)])
    ref = offline_logits(
        thinker, ids, pixel_values=pix_img, image_grid_thw=torch.tensor([img_grid]),
        pixel_values_videos=pix_vid, video_grid_thw=torch.tensor([vid_grid]),
        video_second_per_grid=torch.tensor([spg]), input_features=mel[None],
        feature_attention_mask=torch.ones(1, n_mel, dtype=torch.long), use_audio_in_video=True,
    )

    st = StreamingThinker(thinker)
    st.append_text(t1)
    with torch.inference_mode():
        img = thinker.model.get_image_features(pix_img, torch.tensor([img_grid])).pooler_output[0]
    st.append_image(img, img_grid)
    st.append_text(t2)
    st.begin_video(spg, with_audio=True)
    audio, video = encode_audio_blocks(thinker, mel), encode_patches(thinker, pix_vid, vid_grid)
    while audio or video:  # the two streams arrive interleaved in a random order
        if audio and (not video or rnd.random() < 0.5):
            st.append_audio_block(audio.pop(0))
        else:
            st.append_video_patch(video.pop(0), vid_grid[1:])
    st.end_segment()
    st.append_text(t3)
    assert st.n_tokens == len(ids)
    assert torch.equal(st.rope.positions, thinker.model.get_rope_index(
        torch.tensor([ids]), torch.tensor([img_grid]), torch.tensor([vid_grid]), None, True,
        torch.tensor([n_mel]), torch.tensor([spg]))[0][:, 0])
    diff = (st.next_token_logits() - ref).abs().max().item()
    print(f"max abs logit diff {diff:.2e}")
    assert diff <= TOL


def test_greedy_generate_equals_transformers(tiny, thinker):
    prompt = tiny.tokenizer("<|im_start|>user\nWalk past the red sofa<|im_end|>\n<|im_start|>assistant\n")[
        "input_ids"
    ]
    eos = [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        ref = thinker.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=10,
            do_sample=False, eos_token_id=eos, pad_token_id=0,
        )[0, len(prompt):].tolist()
    st = StreamingThinker(thinker)
    st.append_text(prompt)
    ours = list(st.generate(10, stop_ids=eos))
    assert ours == ref and len(ours) >= 5
    assert st.n_tokens == len(prompt) + len(ours)


def test_truncate_then_reappend_equals_never_appended(thinker):
    g = torch.Generator().manual_seed(3)
    mel = torch.randn(128, 260, generator=g)
    blocks = encode_audio_blocks(thinker, mel)

    def prefix(st):
        st.append_text([1, 2, 3])
        st.append_audio(blocks)

    ref = StreamingThinker(thinker)
    prefix(ref)
    ref.append_text([40, 41, 42])
    want = ref.next_token_logits().clone()

    st = StreamingThinker(thinker)
    prefix(st)
    keep = st.n_tokens
    st.append_text([7, 8])
    st.begin_audio()
    st.append_audio_block(blocks[0])
    with pytest.raises(ValueError):
        st.truncate(st.n_tokens - 2)  # inside the open audio segment
    st.truncate(keep + 1)  # mid text run
    st.truncate(keep)
    st.append_text([40, 41, 42])
    assert torch.equal(st.rope.positions, ref.rope.positions)
    assert (st.next_token_logits() - want).abs().max().item() <= 1e-5

    n = st.n_tokens  # sampled tokens rolled back, then decoding again with the same seed is identical
    first = list(st.generate(4, temperature=0.8, top_k=20, top_p=0.9, seed=1))
    st.truncate(n + 2)
    assert (st.next_token_logits() - ref_after(ref, first[:2])).abs().max().item() <= 1e-5
    st.truncate(n)
    assert list(st.generate(4, temperature=0.8, top_k=20, top_p=0.9, seed=1)) == first
    st.truncate(0)
    prefix(st)
    st.append_text([40, 41, 42])
    assert (st.next_token_logits() - want).abs().max().item() <= 1e-5


def ref_after(ref, toks):
    ref.append_text(toks)
    return ref.next_token_logits()


def test_append_embeds_with_own_positions(thinker):
    ids = [5, 6, 7, 8]
    a = StreamingThinker(thinker)
    a.append_text(ids[:2])
    a.append_text(ids[2:])
    b = StreamingThinker(thinker)
    with torch.inference_mode():
        emb = thinker.get_input_embeddings()(torch.tensor(ids))
    b.append_embeds(emb[:2], torch.arange(2).expand(3, -1))
    b.append_embeds(emb[2:], torch.arange(2, 4).expand(3, -1))
    assert b.rope.next_position == 4 and b.n_tokens == 4
    assert (a.next_token_logits() - b.next_token_logits()).abs().max().item() <= 1e-5
