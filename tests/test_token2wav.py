"""Streaming Token2Wav against transformers' offline Token2Wav on the tiny checkpoint.

Oracles: transformers' own ``Qwen2_5OmniToken2WavModel.forward`` (test a) and its
``code2wav_dit_model.sample`` + ``code2wav_bigvgan_model`` (test b), both run after seeding torch's
global RNG with the same seed the streaming noise uses, so their ``torch.randn`` draws the very
noise tensor the stream grows code by code. Nothing is monkeypatched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.model.token2wav import (
    DEFAULT,
    QWEN_REFERENCE,
    SeededNoise,
    StreamingConfig,
    StreamingToken2Wav,
    decode_offline,
    decode_stream,
    mel_snr_db,
    snr_db,
    wave_snr_db,
)
from omnistream.model.token2wav_jobs import batch_invariant_convs

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _voice(tiny, name="Chelsie"):
    v = tiny.voices[name]
    return v["cond"][None].float(), v["ref_mel"].float()  # (1, 192), (1, T, 80)


def _codes(n, seed):
    return torch.randint(0, 8192, (1, n), generator=torch.Generator().manual_seed(seed))


def test_seeded_noise_matches_global_randn_whatever_the_length():
    noise = SeededNoise(5)
    part = noise.frames(7).clone()  # grown in two steps
    full = noise.frames(30)
    torch.manual_seed(5)
    ref = torch.randn(1, 60, 80)
    assert torch.equal(full, ref) and torch.equal(part, ref[:, :14])


def test_one_chunk_equals_transformers_offline(tiny):
    """(a) Oracle: transformers' Token2Wav forward, global RNG seeded as the stream's noise."""
    t2w = tiny.token2wav
    cond, ref_mel = _voice(tiny)
    codes = _codes(40, 1)
    out = decode_offline(t2w, codes, cond, ref_mel, seed=7)  # noise = SeededNoise(7)
    with torch.no_grad():
        torch.manual_seed(7)
        mel = t2w.code2wav_dit_model.sample(cond, ref_mel, codes)
        torch.manual_seed(7)
        wav_hf = t2w(codes, conditioning=cond, reference_mel=ref_mel)  # sample + BigVGAN, oneDNN convs
        with batch_invariant_convs():  # BigVGAN on the streams' conv backend
            wav = t2w.code2wav_bigvgan_model(mel)
    # oneDNN vs ATen convs: ~1e-7 per conv, amplified to ~1e-4 by the tiny random BigVGAN
    assert np.abs(wav.numpy() - wav_hf.numpy()).max() <= 1e-3
    assert out.mel.shape == mel.shape == (1, 80, 80)
    assert out.pcm.dtype == np.float32 and out.pcm.shape == tuple(wav.shape) == (240 * 80,)
    assert (out.mel - mel).abs().max().item() <= 1e-5
    assert np.abs(out.pcm - wav.numpy()).max() <= 1e-5
    # An explicit noise tensor goes through the same path.
    torch.manual_seed(7)
    out2 = decode_offline(t2w, codes, cond, ref_mel, torch.randn(1, 80, 80))
    assert torch.equal(out2.mel, out.mel)


def test_merge_tail_ends_a_reply_in_the_window_that_spans_it(tiny):
    """A reply that ends inside a chunk's look-ahead (DEFAULT: first chunk 24 + look-ahead 24 codes; a
    40-code reply) is one DiT window over all its codes and one vocoder span: exactly transformers'
    sample + BigVGAN on the whole reply (the oracle of test a), whatever the push size. Without
    ``merge_tail`` the same reply runs that window twice (the second time for its last 16 codes) and
    vocodes it in two spans."""
    t2w = tiny.token2wav
    cond, ref_mel = _voice(tiny)
    codes = _codes(40, 1)
    with torch.no_grad():
        torch.manual_seed(7)
        mel = t2w.code2wav_dit_model.sample(cond, ref_mel, codes)
        with batch_invariant_convs():
            wav = t2w.code2wav_bigvgan_model(mel).numpy()
    runs = {}
    for merge, pushes in ((True, (1, 7, 40)), (False, (1,))):
        cfg = StreamingConfig(**{**DEFAULT.__dict__, "merge_tail": merge})
        for push in pushes:
            st = StreamingToken2Wav.from_config(t2w, cond, ref_mel, cfg, seed=7)
            assert [c for i in range(0, 40, push) for c in st.push(codes[0, i : i + push])] == []  # < 48 codes
            chunks = st.finish()
            runs[merge, push] = (np.concatenate(chunks), st.mel, st.dit_evals, len(chunks))
    pcm, got_mel, evals, n_chunks = runs[True, 1]
    assert torch.equal(got_mel, mel) and np.array_equal(pcm, wav) and n_chunks == 1
    assert runs[False, 1][2] == 2 * evals and runs[False, 1][3] == 2
    assert np.abs(runs[False, 1][0] - wav).max() <= 1e-4  # the split span: another rounding near its seam
    for push in (7, 40):
        assert np.array_equal(runs[True, push][0], runs[True, 1][0])


@pytest.mark.slow
def test_presets_stream_close_to_offline(tiny):
    """(b) Both presets on the same 200 codes (8 s), vs transformers' sample + BigVGAN."""
    t2w = tiny.token2wav
    cond, ref_mel = _voice(tiny, "Ethan")
    n, seed = 200, 3
    codes = _codes(n, 2)
    with torch.no_grad():
        torch.manual_seed(seed)
        mel = t2w.code2wav_dit_model.sample(cond, ref_mel, codes)
        wav = t2w.code2wav_bigvgan_model(mel).numpy()
    figures = {}
    for name, cfg in (("QWEN_REFERENCE", QWEN_REFERENCE), ("DEFAULT", DEFAULT)):
        st = StreamingToken2Wav.from_config(t2w, cond, ref_mel, cfg, seed=seed)
        chunks, first_at = [], None
        for i in range(0, n, 6):  # the Talker delivers a few codes at a time
            got = st.push(codes[0, i : i + 6])
            if got and first_at is None:
                first_at = min(i + 6, n)
            chunks += got
        chunks += st.finish()
        pcm = np.concatenate(chunks)
        assert pcm.dtype == np.float32 and pcm.shape == (240 * 2 * n,)
        assert st.mel.shape == mel.shape
        assert st.first_packet["codes"] == cfg.first_packet_codes <= first_at
        figures[name] = (mel_snr_db(mel, st.mel), wave_snr_db(wav, pcm), cfg.first_packet_codes)
    print("\nstreaming vs offline (mel SNR dB, wave SNR dB, first-packet codes):", figures)
    (qm, qw, qf), (dm, dw, df) = figures["QWEN_REFERENCE"], figures["DEFAULT"]
    assert qm > 5 and qw > 0  # chunking is close to offline at all, not just "not worse"
    assert dm >= qm and dw >= qw
    assert df <= qf


def test_push_granularity_does_not_change_pcm(tiny):
    t2w = tiny.token2wav
    cond, ref_mel = _voice(tiny)
    codes = _codes(40, 4)
    cfg = StreamingConfig(chunk_codes=12, left_codes=12, right_codes=6, vocoder_context_frames=8, first_chunk_codes=6)
    one = decode_stream(t2w, codes, cond, ref_mel, cfg, seed=9, push_size=1)
    all_ = decode_stream(t2w, codes, cond, ref_mel, cfg, seed=9)
    assert one.pcm.shape == (240 * 80,)
    assert np.array_equal(one.pcm, all_.pcm) and torch.equal(one.mel, all_.mel)
    # ... and PCM arrives before the reply ends: the first chunk after first+right codes.
    st = StreamingToken2Wav.from_config(t2w, cond, ref_mel, cfg, seed=9)
    assert st.push(codes[0, :11]) == []
    assert len(st.push(codes[0, 11:12])) == 1


def test_cancel_stops_output_within_one_chunk(tiny):
    t2w = tiny.token2wav
    cond, ref_mel = _voice(tiny)
    codes = _codes(48, 5).reshape(-1).tolist()
    cfg = StreamingConfig(chunk_codes=6, left_codes=6, right_codes=6, vocoder_context_frames=4)
    st = StreamingToken2Wav.from_config(t2w, cond, ref_mel, cfg, seed=1)
    assert len(st.push(codes[:12])) == 1
    # Cancel from "another thread" in the middle of a chunk: the next DiT evaluation aborts.
    evals_at_cancel = []

    def cancel_midway(module, args, kwargs):
        if st.dit_evals == 40 and not st.cancelled:  # chunk 2 (36 evaluations each), 4 in
            st.cancel()
            evals_at_cancel.append(st.dit_evals)

    # proj_out runs once per DiT evaluation
    h = t2w.code2wav_dit_model.proj_out.register_forward_pre_hook(cancel_midway, with_kwargs=True)
    try:
        out = st.push(codes[12:])
    finally:
        h.remove()
    assert st.cancelled and evals_at_cancel == [40]
    assert st.dit_evals == 40  # the evaluation that saw the cancel was its last one
    assert len(out) <= 1  # at most the chunk that finished before the cancel
    assert st.push(codes[:6]) == [] and st.finish() == []
    assert st.dit_evals == 40


def test_bad_codes_raise_and_stream_goes_on(tiny):
    t2w = tiny.token2wav
    cond, ref_mel = _voice(tiny)
    cfg = StreamingConfig(chunk_codes=6, left_codes=0, right_codes=0, vocoder_context_frames=2)
    st = StreamingToken2Wav.from_config(t2w, cond, ref_mel, cfg, seed=2)
    for bad, what in (([1, -1], "outside"), ([8192], "outside"), ([3, 2.0], "not an int"), (["7"], "not an int"),
                      ([True], "not an int")):
        with pytest.raises(ValueError, match=what):
            st.push(bad)
    assert st.codes == []  # a rejected push adds nothing
    chunks = st.push([1, 2, 3, 8191, 0, np.int64(5)])
    assert len(chunks) == 1
    with pytest.raises(ValueError, match="outside"):
        st.push([4, 8193])
    chunks += st.push([4, 4])
    chunks += st.finish()
    assert st.codes == [1, 2, 3, 8191, 0, 5, 4, 4]
    assert np.concatenate(chunks).shape == (240 * 2 * 8,)


def test_snr_helpers():
    x = np.sin(np.arange(1000) / 7.0).astype(np.float32)
    assert snr_db(x, x) == float("inf")
    assert abs(snr_db(x, x * 0.9) - 20.0) < 1e-4  # error = 0.1 x -> 20 dB
    mel = torch.randn(1, 80, 50) - 5.0
    assert mel_snr_db(mel, mel + 0.01) < snr_db(mel, mel + 0.01)  # the log-mel offset is not signal
    with pytest.raises(ValueError):
        snr_db(x, x[:-1])
