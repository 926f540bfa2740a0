"""Streaming Talker == transformers' offline Talker (greedy), fed one Thinker token at a time."""

from __future__ import annotations

import functools

import pytest
import torch

from omnistream.encoders.tmrope import Audio, Image, Text, audio_block_tokens, segment_token_ids
from omnistream.model.talker import StreamingTalker, TalkerConfig
from omnistream.model.thinker import StreamingThinker

TOL = 1e-4
N_MEL = 250  # two audio-encoder blocks (200 + 50 frames)
IMG_GRID = (1, 4, 6)  # 6 merged image tokens on a 2 x 3 grid


class _Stop(Exception):
    pass


def chat(tok, text):
    return tok(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def make_case(tiny, kind):
    """(segments, offline kwargs) of a text, text+audio or text+image prompt."""
    tok = tiny.tokenizer
    if kind == "text":
        ids = chat(tok, "Walk past the red sofa and stop")
        return [Text(ids)], {"input_ids": torch.tensor([ids])}
    pre = tok("<|im_start|>user\n")["input_ids"]
    post = tok(" Walk past the red sofa and stop at the door.<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    if kind == "image":
        segs = [Text(pre), Image(IMG_GRID), Text(post)]
        pix = torch.randn(IMG_GRID[1] * IMG_GRID[2], 1176, generator=torch.Generator().manual_seed(5))
        ids = segment_token_ids(tiny.thinker.config, segs)
        return segs, {"input_ids": torch.tensor([ids]), "pixel_values": pix, "image_grid_thw": torch.tensor([IMG_GRID])}
    segs = [Text(pre), Audio(audio_block_tokens(N_MEL)), Text(post)]
    mel = torch.randn(128, N_MEL, generator=torch.Generator().manual_seed(7))
    ids = segment_token_ids(tiny.thinker.config, segs)
    return segs, {
        "input_ids": torch.tensor([ids]),
        "input_features": mel[None],
        "feature_attention_mask": torch.ones(1, N_MEL, dtype=torch.long),
    }


def prefill(tiny, segs, kw, *, record=True, talker=None):
    """A StreamingThinker holding the prompt, appended piece by piece; ``talker`` syncs after each."""
    th = tiny.thinker
    st = StreamingThinker(th, record=record)
    for seg in segs:
        if isinstance(seg, Text):
            for i in range(0, len(seg.ids), 5):
                st.append_text(seg.ids[i : i + 5])
                if talker is not None:
                    talker.sync(st)
        elif isinstance(seg, Image):
            with torch.inference_mode():
                img = th.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"]).pooler_output[0]
            st.append_image(img, seg.grid_thw)
            if talker is not None:
                talker.sync(st)
        else:
            mel = kw["input_features"][0]
            st.begin_audio()
            with torch.inference_mode():
                for s in range(0, mel.shape[1], 200):
                    blk = mel[:, s : s + 200][None]
                    mask = torch.ones(1, blk.shape[2], dtype=torch.long)
                    st.append_audio_block(th.model.get_audio_features(blk, mask).last_hidden_state)
                    if talker is not None:
                        talker.sync(st)
            st.end_segment()
    assert st.n_tokens == kw["input_ids"].shape[1]
    return st


def offline(tiny, kw, n_text, n_codes, eos=None, monkeypatch=None, keep_mask=True, **talker_kw):
    """transformers' generate with audio output; the Talker's codes come from a spy on its generate.

    transformers 5.x ``generate`` drops an all-ones attention mask, and without one the Talker's
    forward skips its TMRoPE positions and codec pad/bos prefill embeddings. ``keep_mask`` hands
    the (all-ones) mask back to every Talker forward, so transformers' own forward, loop and logits
    processors run the model's intended path; ``keep_mask=False`` is the installed behaviour.
    """
    seen = {}
    orig = tiny.model.talker.generate
    if keep_mask:
        prep = tiny.model.talker.prepare_inputs_for_generation

        @functools.wraps(prep)
        def prep_with_mask(input_ids, *a, **k):
            out = prep(input_ids, *a, **k)
            if out.get("attention_mask") is None:
                out["attention_mask"] = torch.ones_like(input_ids)
            return out

        monkeypatch.setattr(tiny.model.talker, "prepare_inputs_for_generation", prep_with_mask)

    def spy(*a, **k):
        seen["out"], seen["kw"] = orig(*a, **k), k
        raise _Stop  # skip Token2Wav

    monkeypatch.setattr(tiny.model.talker, "generate", spy)
    extra = {} if eos is None else {"thinker_eos_token_id": eos}
    if "pixel_values" in kw:  # shared with the Talker by generate, whose validation rejects them
        extra["talker_pixel_values"] = None
    with pytest.raises(_Stop):
        tiny.model.generate(
            **kw, attention_mask=torch.ones_like(kw["input_ids"]), speaker="Chelsie",
            thinker_max_new_tokens=n_text, thinker_do_sample=False,
            talker_max_new_tokens=n_codes, **talker_kw, **extra,
        )
    monkeypatch.undo()
    k = seen["kw"]
    codes = seen["out"][0, k["input_ids"].shape[1] :].tolist()
    eos_ids = set(k["eos_token_id"])
    cut = next((i for i, c in enumerate(codes) if c in eos_ids), len(codes))
    return codes[:cut], k


def greedy_text(tiny, kw, n):
    with torch.inference_mode():
        out = tiny.thinker.generate(**kw, attention_mask=torch.ones_like(kw["input_ids"]),
                                    max_new_tokens=n, do_sample=False, eos_token_id=[10**6], pad_token_id=0)
    return out[0, kw["input_ids"].shape[1] :].tolist()


def pick_stop(text, at):
    """A token of ``text`` that first occurs at index >= ``at`` (the reply then stops there)."""
    return next(t for i, t in enumerate(text) if i >= at and t not in text[:i])


# --------------------------------------------------------------------------- Thinker records
@pytest.mark.parametrize("kind", ["text", "audio", "image"])
def test_thinker_steps_and_records_equal_output_hidden_states(tiny, kind):
    segs, kw = make_case(tiny, kind)
    n = 6
    with torch.inference_mode():
        ref = tiny.thinker.generate(**kw, attention_mask=torch.ones_like(kw["input_ids"]), max_new_tokens=n,
                                    do_sample=False, eos_token_id=[10**6], pad_token_id=0,
                                    output_hidden_states=True, return_dict_in_generate=True)
    L = kw["input_ids"].shape[1]
    st = prefill(tiny, segs, kw)
    steps = list(st.decode(n, stop_ids=[]))
    assert [s.token for s in steps] == ref.sequences[0, L:].tolist()

    hs = ref.hidden_states
    ref_e = hs[0][0][0].clone()
    cfg = tiny.thinker.config
    feat = torch.isin(kw["input_ids"][0], torch.tensor([cfg.audio_token_index, cfg.image_token_index]))
    assert feat.any() == (kind != "text")
    ref_e[feat] = 0  # as Qwen2_5OmniForConditionalGeneration.generate zeroes them
    e, h = st.records(0, L)
    assert (e - ref_e).abs().max() <= TOL and (h - hs[0][-1][0]).abs().max() <= TOL
    assert torch.equal(e[feat], torch.zeros_like(e[feat]))
    for k in range(1, n):  # decode step k read reply token k-1
        e, h = st.records(L + k - 1, L + k)
        assert (e[0] - hs[k][0][0, 0]).abs().max() <= TOL and (h[0] - hs[k][-1][0, 0]).abs().max() <= TOL
        assert torch.equal(steps[k - 1].embed, e[0]) and torch.equal(steps[k - 1].hidden, h[0])
    assert len(st.records(0)[0]) == L + n

    plain = prefill(tiny, segs, kw, record=False)  # text-only path keeps nothing
    assert plain._rec == [] and [s.token for s in plain.decode(2, stop_ids=[])] == [s.token for s in steps[:2]]
    with pytest.raises(RuntimeError, match="record=True"):
        plain.records(0)


def test_decode_reads_generation_config(tiny):
    segs, kw = make_case(tiny, "text")
    a, b = prefill(tiny, segs, kw), prefill(tiny, segs, kw)
    assert [s.token for s in a.decode(4)] == list(b.generate(4, stop_ids=[tiny.thinker.generation_config.eos_token_id]))
    a.truncate(kw["input_ids"].shape[1])
    x = [s.token for s in a.decode(5, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=3)]
    a.truncate(kw["input_ids"].shape[1])
    assert [s.token for s in a.decode(5, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=3)] == x
    assert len(a.records(0)[0]) == a.n_tokens  # records follow truncate


# --------------------------------------------------------------------------- Talker == transformers
def run_stream(tiny, segs, kw, n_text, stop, cfg, *, incremental=True):
    talker = StreamingTalker.from_checkpoint(tiny, "Chelsie", cfg)
    st = prefill(tiny, segs, kw, talker=talker if incremental else None)
    talker.sync(st)
    text, codes, counts = [], [], []
    for step in st.decode(n_text, stop_ids=stop):
        text.append(step.token)
        codes += talker.push(step)
        counts.append(len(codes))
    codes += list(talker.finish())
    return text, codes, counts, talker, st


@pytest.mark.parametrize(
    "kind,end", [("text", 5), ("text", 1), ("text", None), ("audio", 5), ("audio", None), ("image", None)]
)
def test_streamed_codes_equal_transformers(tiny, kind, end, monkeypatch):
    """``end``: the reply stops on a stop token at that index, or (None) at max length."""
    segs, kw = make_case(tiny, kind)
    n_text, n_codes = 10, 24
    stop = None
    if end is not None:
        stop = [pick_stop(greedy_text(tiny, kw, n_text), end)]
    want, k = offline(tiny, kw, n_text, n_codes, eos=stop, monkeypatch=monkeypatch, talker_do_sample=False)
    cfg = TalkerConfig(do_sample=False, repetition_penalty=1.05, max_new_tokens=n_codes)
    text, codes, counts, talker, st = run_stream(tiny, segs, kw, n_text, stop or [], cfg)
    ref_text = greedy_text(tiny, kw, n_text)
    ref_text = ref_text[: ref_text.index(stop[0]) + 1] if stop else ref_text
    assert text == ref_text and len(text) == (n_text if end is None else end + 1)
    assert text[0] == k["input_text_ids"][0, -1] and k["thinker_reply_part"].shape[1] == len(text)
    assert codes == want and len(codes) == n_codes and talker.stop_reason == "length"
    # one step behind the text: c_0 with t_0, then c_k once t_{k+1} arrived
    assert counts == [1] + list(range(1, len(text)))
    # the positions transformers' Talker uses: get_rope_index(prompt ids + [voice bos, t_0])
    ref_pos, _ = tiny.talker.get_rope_index(
        k["input_text_ids"], k.get("image_grid_thw"), None, k["attention_mask"], False, k.get("audio_feature_lengths"), None
    )
    L = kw["input_ids"].shape[1]
    p = st.rope.positions[:, L]  # where the Thinker put t_0 = where the Talker puts the voice bos
    ours = torch.cat([st.rope.positions[:, :L], torch.stack([p, p + 1], 1)], 1)
    assert torch.equal(ref_pos[:, 0], ours)


@pytest.mark.parametrize("kind", ["text", "audio", "image"])
def test_hf_dropped_mask_reproduces_installed_generate(tiny, kind, monkeypatch):
    segs, kw = make_case(tiny, kind)
    want, _ = offline(tiny, kw, 8, 20, monkeypatch=monkeypatch, keep_mask=False, talker_do_sample=False)
    cfg = TalkerConfig(do_sample=False, max_new_tokens=20, hf_dropped_mask=True)
    assert run_stream(tiny, segs, kw, 8, [], cfg)[1] == want
    intended = run_stream(tiny, segs, kw, 8, [], TalkerConfig(do_sample=False, max_new_tokens=20))[1]
    if kind != "audio":
        assert intended != want  # the two paths really differ (codec pad/bos rows, positions)


def test_codec_eos_stops_like_transformers(tiny, monkeypatch):
    segs, kw = make_case(tiny, "text")
    cfg = TalkerConfig(do_sample=False, max_new_tokens=30)
    free = run_stream(tiny, segs, kw, 8, [], cfg)[1]
    eos = [8292, pick_stop(free, 12)]  # the codec pad stays an eos (transformers' attention mask needs it)
    want, _ = offline(tiny, kw, 8, 30, monkeypatch=monkeypatch, talker_do_sample=False, talker_eos_token_id=eos)
    cfg = TalkerConfig(do_sample=False, max_new_tokens=30, eos_token_ids=tuple(eos))
    codes, talker = run_stream(tiny, segs, kw, 8, [], cfg)[1::2]
    assert codes == want == free[: len(want)] and talker.stop_reason == "eos" and len(codes) >= 12


def test_sampled_codes_equal_transformers_with_same_seed(tiny, monkeypatch):
    segs, kw = make_case(tiny, "text")
    torch.manual_seed(11)  # transformers samples from the global generator
    want, _ = offline(tiny, kw, 8, 20, monkeypatch=monkeypatch)  # talker defaults: top-k 40, top-p 0.8, T 0.9
    codes = run_stream(tiny, segs, kw, 8, [], TalkerConfig(max_new_tokens=20, seed=11))[1]
    assert codes == want
    again = run_stream(tiny, segs, kw, 8, [], TalkerConfig(max_new_tokens=20, seed=11))[1]
    other = run_stream(tiny, segs, kw, 8, [], TalkerConfig(max_new_tokens=20, seed=12))[1]
    assert again == codes != other


def test_incremental_prefill_equals_feeding_at_end(tiny):
    segs, kw = make_case(tiny, "audio")
    cfg = TalkerConfig(do_sample=False, max_new_tokens=20)
    a = run_stream(tiny, segs, kw, 8, [], cfg, incremental=True)
    b = run_stream(tiny, segs, kw, 8, [], cfg, incremental=False)
    assert a[0] == b[0] and a[1] == b[1] and len(a[1]) == 20


def test_second_turn_equals_transformers_on_whole_conversation(tiny, monkeypatch):
    tok = tiny.tokenizer
    segs, kw = make_case(tiny, "text")
    cfg = TalkerConfig(do_sample=False, max_new_tokens=16)
    text1, _, _, talker, st = run_stream(tiny, segs, kw, 6, [], cfg)
    talker.end_turn()
    st.append_text(tok("<|im_end|>\n")["input_ids"])
    st.append_text(chat(tok, "Turn right at the kitchen table"))
    talker.sync(st)
    conv = kw["input_ids"][0].tolist() + text1 + tok("<|im_end|>\n")["input_ids"] + chat(tok, "Turn right at the kitchen table")
    assert st.n_tokens == len(conv) == talker.n_prompt
    want, k = offline(tiny, {"input_ids": torch.tensor([conv])}, 6, 16, monkeypatch=monkeypatch, talker_do_sample=False)
    text2, codes = [], []
    for step in st.decode(6, stop_ids=[]):
        text2.append(step.token)
        codes += talker.push(step)
    codes += list(talker.finish())
    assert text2 == greedy_text(tiny, {"input_ids": torch.tensor([conv])}, 6) and text2[0] == k["input_text_ids"][0, -1]
    assert codes == want and len(codes) == 16


# --------------------------------------------------------------------------- API
def test_unknown_voice_lists_voices(tiny):
    with pytest.raises(ValueError, match="Nobody") as e:
        StreamingTalker.from_checkpoint(tiny, "Nobody")
    assert "Chelsie" in str(e.value) and "Ethan" in str(e.value)


def test_cancel_stops(tiny):
    segs, kw = make_case(tiny, "text")
    talker = StreamingTalker.from_checkpoint(tiny, "Ethan", TalkerConfig(do_sample=False, max_new_tokens=100))
    st = prefill(tiny, segs, kw, talker=talker)
    steps = list(st.decode(6, stop_ids=[]))
    got = talker.push(steps[0]) + talker.push(steps[1]) + talker.push(steps[2])
    talker.cancel()
    assert talker.push(steps[3]) == [] and list(talker.finish()) == [] and talker.stop_reason == "cancelled"
    assert len(got) == 2
    # cancel while finish() is streaming
    talker.end_turn()
    st.truncate(kw["input_ids"].shape[1])
    for s in steps:
        talker.push(s)
    out = []
    for c in talker.finish():
        out.append(c)
        if len(out) == 3:
            talker.cancel()
    assert len(out) == 3 and talker.stop_reason == "cancelled"
