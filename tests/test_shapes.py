"""Real-size shapes without real weights: `make-tiny --shape 3b|7b` writes the published sizes.

The oracle is the published parameter count of each checkpoint (Hugging Face "Model size", summed
over Thinker, Talker and Token2Wav); the model is built on the meta device, so nothing is allocated.
A config-only checkpoint of the tiny shape exercises the materialise-at-load path end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omnistream.checkpoints import RANDOM_INIT_FILE, CheckpointError, load_omni
from omnistream.random_checkpoints import PUBLISHED_PARAMS, make_tiny


@pytest.mark.parametrize("shape", ["7b", "3b"])
def test_published_shapes_have_the_published_parameter_count(tmp_path, shape):
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    d = make_tiny(tmp_path / shape, shape=shape)
    assert not list(d.glob("*.safetensors")) and (d / RANDOM_INIT_FILE).exists()
    config = Qwen2_5OmniConfig.from_pretrained(d)  # the file as written, read back as transformers reads it
    with torch.device("meta"):
        model = Qwen2_5OmniForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / PUBLISHED_PARAMS[shape] - 1) < 0.005, f"{shape}: {total / 1e9:.3f}B parameters"
    # the Thinker's token ids are the tokenizer's, all inside the published vocabulary
    tok_ids = json.loads((d / "tokenizer.json").read_text())["added_tokens"]
    th = config.thinker_config
    assert max(t["id"] for t in tok_ids) < th.text_config.vocab_size
    assert th.audio_token_index in {t["id"] for t in tok_ids}


def test_published_shapes_are_config_only(tmp_path):
    with pytest.raises(CheckpointError, match="config-only"):
        make_tiny(tmp_path / "x", shape="7b", weights=True)


def test_config_only_tiny_checkpoint_materialises_and_speaks(tmp_path):
    from omnistream.chat import OmniChat
    from omnistream.model.talker import TalkerConfig

    d = make_tiny(tmp_path / "co", weights=False, seed=3)
    assert not list(d.glob("*.safetensors"))
    ck = load_omni(d, dtype="bf16")
    assert {p.dtype for p in ck.thinker.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ck.token2wav.parameters()} == {torch.float32}  # Token2Wav stays fp32
    assert all(torch.isfinite(p.float()).all() for p in ck.model.parameters())
    again = load_omni(d, talker=False)  # seeded: the same random weights every load
    torch.testing.assert_close(again.thinker.lm_head.weight, ck.thinker.lm_head.weight.float(), rtol=0.01, atol=1e-3)
    chat = OmniChat(ck, voice="Chelsie", talker_config=TalkerConfig(max_new_tokens=12, seed=0))  # 0.5 s of speech
    chat.say("Hello there")
    events = list(chat.reply(max_new_tokens=6))
    assert any(e.kind == "text" for e in events)
    pcm = np.concatenate([e.pcm for e in events if e.kind == "audio"])
    assert pcm.size > 0 and np.isfinite(pcm).all()
