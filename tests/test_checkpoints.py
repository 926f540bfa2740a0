"""The tiny checkpoint is a real Hugging Face checkpoint, and bad checkpoints fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from omnistream.checkpoints import SPECIAL_TOKENS, CheckpointError, load_omni


def test_tiny_has_the_real_file_set(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.json",
        "spk_dict.pt",
    ):
        assert required in names, required
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni"
    assert cfg["architectures"] == ["Qwen2_5OmniForConditionalGeneration"]


def _module_name(file_key: str) -> str:
    """The real checkpoint's key layout (thinker.audio_tower.*, thinker.model.layers.*) -> modules."""
    for old, new in (
        ("thinker.audio_tower.", "thinker.model.audio_tower."),
        ("thinker.visual.", "thinker.model.visual."),
        ("thinker.model.", "thinker.model.language_model."),
    ):
        if file_key.startswith(old):
            return new + file_key[len(old) :]
    return file_key


def test_file_uses_the_real_key_layout_and_loads_exactly(tiny, tiny_dir):
    on_disk = load_file(str(tiny_dir / "model.safetensors"))
    assert any(k.startswith("thinker.audio_tower.") for k in on_disk)  # as in Qwen/Qwen2.5-Omni-7B
    assert any(k.startswith("thinker.model.layers.") for k in on_disk)
    state = tiny.model.state_dict()
    assert len(on_disk) > 100
    for key, tensor in on_disk.items():
        assert tensor.numel() > 0, f"{key} is empty: the tiny config has a degenerate dimension"
        name = _module_name(key)
        if name not in state:  # persistent-free parameters the model rebuilds (none expected)
            pytest.fail(f"{key} was written but not loaded")
        torch.testing.assert_close(state[name].float(), tensor.float(), rtol=0, atol=0)


def test_special_token_ids_agree_with_config(tiny):
    tok, th = tiny.tokenizer, tiny.config.thinker_config
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids)
    assert ids["<|AUDIO|>"] == th.audio_token_index == tok.audio_token_id
    assert ids["<|VIDEO|>"] == th.video_token_index == tok.video_token_id
    assert ids["<|IMAGE|>"] == th.image_token_index == tok.image_token_id
    assert ids["<|audio_bos|>"] == th.audio_start_token_id
    assert ids["<|vision_bos|>"] == th.vision_start_token_id
    assert ids["<tts_pad>"] == tiny.config.talker_config.tts_text_pad_token_id
    assert max(ids.values()) < th.text_config.vocab_size
    # the tokenizer keeps special tokens whole and round-trips text
    text = "hello <|AUDIO|> world"
    enc = tok(text).input_ids
    assert enc.count(ids["<|AUDIO|>"]) == 1
    assert tok.decode(enc) == text


def test_speaker_dictionary_format(tiny):
    assert set(tiny.voices) == {"Chelsie", "Ethan"}
    dit = tiny.config.token2wav_config.dit_config
    for v in tiny.voices.values():
        assert isinstance(v["bos_token"], int)
        assert v["cond"].shape == (dit.enc_emb_dim,)
        assert v["ref_mel"].ndim == 3 and v["ref_mel"].shape[-1] == dit.mel_dim


def test_text_only_load_skips_talker(tiny_dir):
    ck = load_omni(tiny_dir, talker=False)
    assert not hasattr(ck.model, "talker") and not hasattr(ck.model, "token2wav")
    with pytest.raises(CheckpointError, match="without the Talker"):
        ck.talker
    assert ck.thinker is not None


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "model_type is 'llama'"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "preprocessor_config.json").unlink(), "preprocessor_config.json is missing"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}})
            ),
            "model-00002-of-00002.safetensors",
        ),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 10), "cannot load checkpoint"),
    ],
)
def test_broken_checkpoints_name_the_problem(tiny_dir, tmp_path, breakage, message):
    d = _copy(tiny_dir, tmp_path)
    breakage(d)
    with pytest.raises(CheckpointError, match=message):
        load_omni(d, talker=False)
