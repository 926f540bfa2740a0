"""The tiny checkpoint is a real Hugging Face checkpoint, and bad checkpoints fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from omnistream.checkpoints import CheckpointError, force_length, load_omni
from omnistream.random_checkpoints import SPECIAL_TOKENS


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


_REFUSE = """
import json, os, sys, time
from omnistream.checkpoints import CheckpointError, load_omni
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r, t = rss(), time.perf_counter()
try:
    load_omni(sys.argv[1], talker=False)
    msg = None
except CheckpointError as e:
    msg = str(e)
print(json.dumps({"msg": msg, "s": time.perf_counter() - t, "rss_growth": rss() - r}))
"""


def _refuse_in_a_fresh_process(d) -> dict:
    """load_omni(d) in a new interpreter (nothing of transformers imported yet): message, time, RSS growth."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _REFUSE, str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _qwen25_vl_dir(d):
    """A Qwen2.5-VL checkpoint directory: transformers' own config plus a 64 MB weight file."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig()
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    cfg.save_pretrained(d)
    save_file({"model.embed_tokens.weight": torch.zeros(4096, 4096)}, str(d / "model.safetensors"))
    return d


@pytest.mark.process  # refused in a fresh interpreter, so its memory growth is this check's alone
@pytest.mark.parametrize("kind, found", [
    ("qwen2_5_vl", ["'qwen2_5_vl'", "Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL checkpoint"]),
    ("janus", ["'qwen2_5_vl'", "JanusVLN checkpoint", "nav --agent janus"]),
    ("random", ["model_type is None", "not a Qwen2.5-Omni checkpoint"]),
    ("omni_wrong_arch", ["architectures ['LlamaForCausalLM']"]),
])
def test_other_checkpoint_kinds_are_refused_from_config_alone(tmp_path, tiny_dir, kind, found):
    d = tmp_path / kind
    d.mkdir()
    if kind == "qwen2_5_vl":
        _qwen25_vl_dir(d)
    elif kind == "janus":
        from omnistream.navigation.tiny import make_tiny_janus

        make_tiny_janus(d)
    elif kind == "random":
        (d / "config.json").write_text(json.dumps({"hidden": 3, "note": "some other project"}))
        (d / "weights.bin").write_bytes(b"\0" * 1000)
    else:
        shutil.copytree(tiny_dir, d, dirs_exist_ok=True)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"])))
    out = _refuse_in_a_fresh_process(d)
    msg = out["msg"]
    assert msg is not None and "\n" not in msg and "expected" in msg, msg
    for f in found:
        assert f in msg, (f, msg)
    assert out["rss_growth"] < 16e6, out  # neither the weights nor transformers' model code (~200 MB) loaded


def test_device_dtype_and_attention_are_checked_before_loading(tiny_dir, tmp_path):
    from omnistream.checkpoints import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(CheckpointError, match="dtype 'int8'"):
        load_omni(tmp_path / "does-not-matter", dtype="int8")  # refused before the path is looked at
    with pytest.raises(CheckpointError, match="'flash_attention_2' needs a CUDA device"):
        load_omni(tiny_dir, attn_implementation="flash_attention_2")
    with pytest.raises(CheckpointError, match="attention 'fast'"):
        load_omni(tiny_dir, attn_implementation="fast")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="device 'cuda:0' is not available"):
            load_omni(tmp_path / "does-not-matter", device="cuda:0")
    ck = load_omni(tiny_dir, talker=False, dtype="bf16", attn_implementation="eager")
    assert {p.dtype for p in ck.thinker.parameters()} == {torch.bfloat16}
    assert ck.thinker.config.get_text_config()._attn_implementation == "eager"


def test_force_length_env_masks_every_way_a_reply_can_end(tiny_dir, monkeypatch):
    """``OMNISTREAM_FORCE_LENGTH=1`` (benchmarks on random weights): the loaded Thinker can never draw a
    stop token and the Talker never an end / special code -- and nothing else changes; the hooks come
    off again. Oracle: the same checkpoint loaded without it."""
    plain = load_omni(tiny_dir)
    monkeypatch.setenv("OMNISTREAM_FORCE_LENGTH", "1")
    forced = load_omni(tiny_dir)
    ids = plain.tokenizer("<|im_start|>user\nhello<|im_end|>\n", return_tensors="pt").input_ids
    gen = plain.model.generation_config
    stop = {*(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]),
            plain.tokenizer.eos_token_id, plain.tokenizer.pad_token_id} - {None}
    with torch.no_grad():
        a, b = (ck.thinker(input_ids=ids).logits[0, -1] for ck in (plain, forced))  # (V,)
        h = torch.randn(3, plain.talker.codec_head.in_features)
        ca, cb = plain.talker.codec_head(h), forced.talker.codec_head(h)  # (3, talker vocab)
    codes = plain.config.token2wav_config.dit_config.num_embeds - 1
    keep = torch.ones_like(a, dtype=torch.bool)
    keep[sorted(stop)] = False
    assert torch.isinf(b[~keep]).all() and torch.isfinite(a[~keep]).all() and torch.equal(a[keep], b[keep])
    assert torch.isinf(cb[:, codes:]).all() and torch.equal(ca[:, :codes], cb[:, :codes])
    handles = force_length(plain)  # the same hooks by hand; removed, the model is as loaded
    with torch.no_grad():
        assert torch.equal(plain.thinker(input_ids=ids).logits[0, -1], b)
        for hook in handles:
            hook.remove()
        assert torch.equal(plain.thinker(input_ids=ids).logits[0, -1], a)
