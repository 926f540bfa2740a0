"""Incremental TMRoPE equals transformers' whole-sequence `get_rope_index`, exactly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnistream.encoders.tmrope import (
    Audio,
    AudioVideo,
    Image,
    Text,
    TMRoPE,
    Video,
    audio_block_tokens,
    audio_tokens_for_frames,
    get_rope_index_whole,
    segment_token_ids,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
grid_side = st.sampled_from([2, 4, 6, 8])
spg = st.sampled_from([0.5, 1.0, 2.0])
mel = st.integers(3, 900)  # 1-2 frames give 0 tokens, which get_rope_index cannot locate


@st.composite
def segment(draw, with_audio_in_video: bool):
    kind = draw(st.sampled_from(["text", "audio", "image", "video"]))
    if kind == "text":
        return Text(draw(st.lists(st.integers(0, 299), min_size=1, max_size=20))), None
    if kind == "audio":
        n = draw(mel)
        return Audio(audio_block_tokens(n)), n
    if kind == "image":
        return Image((1, draw(grid_side), draw(grid_side))), None
    grid = (draw(st.integers(1, 6)), draw(grid_side), draw(grid_side))
    if with_audio_in_video:
        n = draw(mel)
        return AudioVideo(grid, draw(spg), audio_block_tokens(n)), n
    return Video(grid, draw(spg)), None


@st.composite
def prompt(draw, max_segments=6):
    av = draw(st.booleans())
    segs = draw(st.lists(segment(av), min_size=1, max_size=max_segments))
    return av, segs


@pytest.fixture(scope="module")
def rope(tiny):
    return TMRoPE.from_config(tiny.thinker.config)


def reference(thinker, ids, segs_mels, av):
    """get_rope_index on the whole sequence."""
    segs = [s for s, _ in segs_mels]
    return get_rope_index_whole(thinker, ids, segs, [m for _, m in segs_mels if m is not None], av)


def split(n, rnd):
    """Random positive piece sizes summing to n."""
    out = []
    while n:
        k = rnd.randint(1, n)
        out.append(k)
        n -= k
    return out


def feed_incrementally(tm: TMRoPE, seg, rnd) -> list:
    """Feed one segment in random piece sizes / stream interleavings; return its pieces."""
    if isinstance(seg, Text):
        out, i = [], 0
        for k in split(len(seg.ids), rnd):
            out += tm.text(seg.ids[i : i + k])
            i += k
        return out
    if isinstance(seg, Image):
        return tm.image(seg.grid_thw)
    if isinstance(seg, Audio):
        out = tm.begin_audio()
        for k in split(sum(seg.blocks), rnd) if sum(seg.blocks) else []:
            out += tm.audio_block(k)
        return out + tm.end()
    if isinstance(seg, Video):
        out = tm.begin_video(seg.second_per_grid)
        for _ in range(seg.grid_thw[0]):
            out += tm.video_patch(seg.grid_thw[1:])
        return out + tm.end()
    # audio-in-video: audio blocks and video patches arrive interleaved in a random stream order
    out = tm.begin_audio_video(seg.second_per_grid)
    events = [("a", k) for k in seg.blocks if k] + [("v", None)] * seg.grid_thw[0]
    audio = [e for e in events if e[0] == "a"]
    video = [e for e in events if e[0] == "v"]
    while audio or video:
        src = audio if (audio and (not video or rnd.random() < 0.5)) else video
        kind, k = src.pop(0)
        out += tm.audio_block(k) if kind == "a" else tm.video_patch(seg.grid_thw[1:])
    return out + tm.end()


def pieces_ids_pos(pieces):
    ids = [i for p in pieces for i in p.ids]
    pos = torch.cat([p.pos for p in pieces], dim=1)
    return ids, pos


@settings(max_examples=150, **SETTINGS)
@given(prompt(), st.randoms(use_true_random=False))
def test_incremental_equals_get_rope_index(tiny, rope, p, rnd):
    av, segs_mels = p
    tm = rope.fresh()
    pieces = [pc for seg, _ in segs_mels for pc in feed_incrementally(tm, seg, rnd)]
    ids, pos = pieces_ids_pos(pieces)
    assert ids == segment_token_ids(rope, [s for s, _ in segs_mels])  # layout independent of arrival order
    ref, delta = reference(tiny.thinker, ids, segs_mels, av)
    assert torch.equal(pos, ref)
    assert torch.equal(tm.positions, ref)
    assert tm.rope_delta == delta


@settings(max_examples=60, **SETTINGS)
@given(prompt(4), prompt(4), st.lists(st.integers(0, 299), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_two_turns_with_cache_carried(tiny, rope, turn1, turn2, junk, rnd):
    """Turn 2 is appended to the state left by turn 1 (as if turn 1 sat in the KV cache)."""
    av = turn1[0]
    segs2 = [(s, m) for s, m in turn2[1] if not isinstance(s, (Video, AudioVideo))]  # one flag per call
    reply = [(Text([5, 6, 7]), None)]  # decoded tokens of turn 1
    tm = rope.fresh()
    for seg, _ in turn1[1] + reply:
        feed_incrementally(tm, seg, rnd)
    n1 = tm.n_tokens
    tm.text(junk)  # speculative tokens later rolled back
    tm.truncate(n1)
    second = [pc for seg, _ in segs2 for pc in feed_incrementally(tm, seg, rnd)]
    whole = turn1[1] + reply + segs2
    ids = segment_token_ids(rope, [s for s, _ in whole])
    ref, _ = reference(tiny.thinker, ids, whole, av)
    assert torch.equal(tm.positions, ref)
    if second:
        assert torch.equal(pieces_ids_pos(second)[1], ref[:, n1:])


@settings(max_examples=40, **SETTINGS)
@given(st.integers(1, 6), grid_side, grid_side, st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.5]), mel)
def test_audio_in_video_layout_matches_processor(rope, t, h, w, spg_, n_mel):
    """Our V/A interleave equals the processor's placeholder string (incl. multi-chunk jumps)."""
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor as P

    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), audio_bos_token="B",
                           audio_eos_token="E", video_token="V", audio_token="A")
    fake.get_chunked_index = lambda ti, tpc: P.get_chunked_index(fake, ti, tpc)
    n_audio = audio_tokens_for_frames(n_mel)
    s = P.replace_video_with_audio_token(
        fake, {"video_grid_thw": [np.array([t, h, w])], "video_second_per_grid": [spg_]}, 0,
        {"num_audio_tokens": [n_audio]}, 0, position_id_per_seconds=25, seconds_per_chunk=2,
    )
    ids = segment_token_ids(rope, [AudioVideo((t, h, w), spg_, audio_block_tokens(n_mel))])
    name = {rope.ids["video"]: "V", rope.ids["audio"]: "A", rope.ids["audio_bos"]: "B", rope.ids["audio_eos"]: "E"}
    assert "".join(name[i] for i in ids[1:-1]) == s


def test_eos_follows_last_chunk_quirk(tiny, rope):
    """Audio has as many chunks as video but a lower max: the eos follows the last (audio) chunk,
    below the video's max, and the text after it continues from there (get_rope_index does so)."""
    seg = AudioVideo((4, 2, 2), 1.0, audio_block_tokens(240))  # video t 0..75 (2 chunks); audio 0..59
    segs = [(Text([1, 2]), None), (seg, 240), (Text([3, 4]), None), (Image((1, 4, 4)), None)]
    tm = rope.fresh()
    ids, pos = tm.build([s for s, _ in segs])
    ref, delta = reference(tiny.thinker, ids, segs, True)
    assert torch.equal(pos, ref) and tm.rope_delta == delta
    eos = ids.index(rope.ids["audio_eos"])
    assert pos[0, eos] == 2 + 1 + 60 and pos[:, : eos].max() == 2 + 1 + 75  # the quirk really fired


def test_truncate_inside_segment_is_refused(rope):
    tm = rope.fresh()
    tm.text([1, 2])
    tm.begin_audio()
    tm.audio_block(3)
    with pytest.raises(ValueError):
        tm.truncate(4)
    tm.truncate(1)
    assert tm.n_tokens == 1 and tm.next_position == 1 and tm.open_segment is None


@pytest.mark.parametrize("spg_", [3.0, 4.5, 0.7])
def test_multi_chunk_jumps_quirk(tiny, rope, spg_):
    """A temporal jump over several 2-s chunks: get_chunked_index's counter advances by one per
    crossing, splitting single tokens off into their own chunks; we reproduce that."""
    seg = AudioVideo((3, 4, 4), spg_, audio_block_tokens(900))
    segs = [(Text([1]), None), (seg, 900), (Text([2]), None)]
    tm = rope.fresh()
    ids, pos = tm.build([s for s, _ in segs])
    ref, delta = reference(tiny.thinker, ids, segs, True)
    assert torch.equal(pos, ref) and tm.rope_delta == delta
