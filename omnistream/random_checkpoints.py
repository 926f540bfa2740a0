"""Random checkpoints in the real Qwen2.5-Omni format: tiny ones with weights, published shapes without.

:func:`make_tiny` writes a tiny random checkpoint (a byte-level BPE tokenizer with Qwen's special
tokens, the processor configs, the speaker dictionary, safetensors weights) that
:func:`omnistream.checkpoints.load_omni` loads exactly like ``Qwen/Qwen2.5-Omni-7B``; with
``shape="3b"|"7b"`` it writes the published configuration with no weight file (random weights are
made at load time on the target device). Tests, benchmarks and the demo use these: no network.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from omnistream.checkpoints import (
    OMNI_ARCHITECTURES,
    RANDOM_INIT_FILE,
    CheckpointError,
    VisionPreprocessing,
    _only_valid_codes,
)

log = logging.getLogger(__name__)

# Special tokens of the real Qwen2.5-Omni tokenizer, in the order the tiny checkpoint assigns
# them ids (after its byte-level BPE vocabulary). Names match the real `tokenizer_config.json`.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
]
# One speaker-prompt token per voice (the real checkpoint keeps their ids in spk_dict.pt).
TINY_VOICES = ("Chelsie", "Ethan")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'audio' %}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% elif c['type'] == 'image' %}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{% elif c['type'] == 'video' %}{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the tiny BPE is trained on: enough English for a few hundred merges.
_CORPUS = """
You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving
auditory and visual inputs, as well as generating text and speech.
Hello, how are you today? I can see you and hear you. What would you like to talk about?
Walk past the red sofa and stop at the door on your left. Turn right at the kitchen table.
The quick brown fox jumps over the lazy dog. Please describe what you see in the video.
Streaming speech arrives in small pieces; the model answers while the user is still looking.
Move forward two meters, then turn left and stop near the blue chair by the window.
"""


def _tiny_tokenizer(vocab_size: int):
    """Train a small byte-level BPE with the Qwen pre-tokenizer, then add the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix=""))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    return tok


def tiny_config(text_vocab: int, ids: dict[str, int], *, hidden: int = 64, layers: int = 2):
    """A self-consistent tiny Qwen2_5OmniConfig whose special-token ids match the tokenizer."""
    heads, kv_heads = 4, 2
    head_dim = hidden // heads  # 16; the M-RoPE sections must sum to head_dim // 2
    mrope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
    text = dict(
        vocab_size=text_vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rope_parameters=mrope,
        tie_word_embeddings=False,
    )
    audio = dict(
        num_mel_bins=128,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=2 * hidden,
        d_model=hidden,
        output_dim=hidden,
        n_window=100,
        max_source_positions=1500,
    )
    vision = dict(
        depth=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_heads=heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=hidden,
        fullatt_block_indexes=[layers - 1],
    )
    talker = dict(
        vocab_size=8448,
        embedding_size=hidden,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_parameters=dict(mrope),
    )
    token2wav = dict(
        dit_config=dict(
            hidden_size=hidden,
            num_hidden_layers=4,
            num_attention_heads=heads,
            head_dim=head_dim,
            ff_mult=2,
            emb_dim=32,
            block_size=24,
            look_ahead_layers=[2],
            look_backward_layers=[0, 3],
            repeats=2,
            num_embeds=8193,
            mel_dim=80,
            enc_emb_dim=192,
            enc_dim=32,
            enc_channels=[32, 32, 32, 32, 96],
            enc_attention_channels=16,
            enc_se_channels=16,
            dropout=0.0,
        ),
        bigvgan_config=dict(
            mel_dim=80,
            upsample_initial_channel=64,  # 1 channel after the 6 upsampling stages (64 // 2**6)
            resblock_kernel_sizes=[3, 7, 11],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            upsample_rates=[5, 3, 2, 2, 2, 2],
            upsample_kernel_sizes=[11, 7, 4, 4, 4, 4],
        ),
    )
    return _assemble(ids, text, audio, vision, talker, token2wav)


# Real-size shapes of the published checkpoints, for `make-tiny --shape 3b|7b` (config-only: random
# weights, real shapes, so memory, speed and kernels are measured at size without a 22 GB download).
# transformers' Qwen2_5OmniConfig defaults are NOT the published checkpoint (its Talker defaults to the
# Thinker's 3584 width: 18.4B parameters in all), so every size is spelled out here. Sources:
# * Qwen/Qwen2.5-Omni-7B config.json as copied verbatim into fine-tunes of it, e.g.
#   https://huggingface.co/ACE-Step/acestep-captioner/blob/main/config.json and
#   https://huggingface.co/Duofu/EmotionThinker/blob/main/config.json (talker: hidden 896, embedding 3584,
#   head_dim 128, intermediate 18944, vocab 8448; thinker hidden 3584); NVIDIA Megatron-Bridge's
#   Qwen25OmniModelProvider (https://docs.nvidia.com/nemo/megatron-bridge/latest/apidocs/bridge/
#   bridge.models.qwen_omni.qwen25_omni_provider.html: vocab 152064, mrope_section [16, 24, 24], patch 14,
#   25 positions/s, 2-s chunks). The towers (audio: d_model 1280, 32 layers, 20 heads; vision: depth 32,
#   hidden 1280, 16 heads, window 112), DiT (dim 1024, depth 22, 16 heads, 8193 codes) and BigVGAN (mel 80,
#   1536 channels, rates 5,3,2,2,2,2) are the values of those same files.
# * Qwen/Qwen2.5-Omni-3B: its Thinker LM is Qwen2.5-3B's (hidden 2048, intermediate 11008, 36 layers,
#   16 heads, 2 KV heads, vocab 151936; e.g. https://huggingface.co/unsloth/Qwen2.5-3B/blob/main/config.json
#   and the Omni-3B text defaults "from HF config.json" in the Tyr project's Qwen25Omni/Config.lean), the
#   audio/vision towers and Token2Wav are the 7B's with output width 2048. Its Talker sizes (Qwen2.5-0.5B's:
#   14 heads, 2 KV heads, head_dim 64, intermediate 4864; M-RoPE sections [8, 12, 12], which must sum to
#   head_dim / 2) are as remembered from the model's config.json, NOT confirmed by a source found here;
#   the total they give (5.537B) matches the published model size.
# Published totals (Hugging Face "Model size"): 7B 10.7B parameters; 3B 5.54B (thinker-only copies:
# https://huggingface.co/Tevatron/Qwen2.5-Omni-7B-Thinker "9B", ytaek-oh/Qwen2.5-Omni-3B-Thinker "5B").
PUBLISHED_PARAMS = {"7b": 10.7e9, "3b": 5.54e9}
_SHAPES = {  # text (hidden, intermediate, layers, heads, kv heads, vocab); talker (heads, kv, head_dim, ffn, mrope)
    "7b": dict(text=(3584, 18944, 28, 28, 4, 152064), talker=(12, 4, 128, 18944, [16, 24, 24])),
    "3b": dict(text=(2048, 11008, 36, 16, 2, 151936), talker=(14, 2, 64, 4864, [8, 12, 12])),
}
SHAPES = ("tiny",) + tuple(_SHAPES)


def published_config(shape: str, ids: dict[str, int]):
    """The published Qwen2.5-Omni-3B / -7B sizes (sources above) with the tokenizer's special-token ids.

    Only the special-token ids differ from the published file: they must be the ids of the tokenizer
    written next to it (the tiny BPE), and they all lie inside the published vocabulary.
    """
    if shape not in _SHAPES:
        raise CheckpointError(f"shape {shape!r}: use one of {', '.join(SHAPES)}")
    hidden, ffn, layers, heads, kv_heads, vocab = _SHAPES[shape]["text"]
    t_heads, t_kv, t_head_dim, t_ffn, t_mrope = _SHAPES[shape]["talker"]
    mrope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                rope_parameters=mrope, tie_word_embeddings=False, rms_norm_eps=1e-6)
    audio = dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
                 output_dim=hidden, n_window=100, max_source_positions=1500)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=hidden,
                  fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)
    talker = dict(vocab_size=8448, embedding_size=hidden, hidden_size=896, intermediate_size=t_ffn,
                  num_hidden_layers=24, num_attention_heads=t_heads, num_key_value_heads=t_kv, head_dim=t_head_dim,
                  max_position_embeddings=32768, rope_parameters=dict(mrope, mrope_section=t_mrope),
                  rms_norm_eps=1e-6)
    token2wav = dict(
        dit_config=dict(hidden_size=1024, num_hidden_layers=22, num_attention_heads=16, head_dim=64, ff_mult=2,
                        emb_dim=512, block_size=24, look_ahead_layers=[10], look_backward_layers=[0, 20], repeats=2,
                        num_embeds=8193, mel_dim=80, enc_emb_dim=192, enc_dim=128,
                        enc_channels=[256, 256, 256, 256, 768], enc_attention_channels=64, enc_se_channels=64),
        bigvgan_config=dict(mel_dim=80, upsample_initial_channel=1536, resblock_kernel_sizes=[3, 7, 11],
                            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                            upsample_rates=[5, 3, 2, 2, 2, 2], upsample_kernel_sizes=[11, 7, 4, 4, 4, 4]),
    )
    return _assemble(ids, text, audio, vision, talker, token2wav)


def _assemble(ids: dict[str, int], text: dict, audio: dict, vision: dict, talker: dict, token2wav: dict):
    """One Qwen2_5OmniConfig from the parts' sizes plus the tokenizer's special-token ids."""
    from transformers import Qwen2_5OmniConfig

    # Multimodal token ids and TMRoPE rates: the Thinker and the Talker must agree on them.
    media = dict(
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
        position_id_per_seconds=25,
        seconds_per_chunk=2,
    )
    thinker = dict(
        text_config=text,
        audio_config=audio,
        vision_config=vision,
        **media,
        user_token_id=ids["user"],
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    talker = dict(
        talker,
        tts_text_start_token_id=ids["<tts_text_bos>"],
        tts_text_end_token_id=ids["<tts_text_eod>"],
        tts_text_pad_token_id=ids["<tts_pad>"],
        **media,
        spatial_merge_size=2,
    )
    return Qwen2_5OmniConfig(
        thinker_config=thinker, talker_config=talker, token2wav_config=token2wav, enable_audio_output=True
    )


def tiny_qwen_tokenizer(specials: list[str], media_tokens: dict[str, str]):
    """A small byte-level BPE with Qwen's special tokens, wrapped as the ``Qwen2Tokenizer`` real
    Qwen checkpoints ship; ``media_tokens`` names the model family's media placeholders
    (``image_token`` etc.). Returns ``(bpe, tokenizer)``; shared by the Omni and JanusVLN writers."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    bpe = _tiny_tokenizer(vocab_size=384)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=bpe,
        errors="replace",
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens=media_tokens,
    )
    return bpe, tokenizer


def make_tiny(out_dir: str | os.PathLike, *, seed: int = 0, hidden: int = 64, layers: int = 2, shape: str = "tiny",
              weights: bool | None = None) -> Path:
    """Write a complete tiny Qwen2.5-Omni checkpoint in the real Hugging Face format.

    The directory holds ``config.json``, ``model.safetensors`` (seeded random weights),
    ``generation_config.json``, tokenizer files (a small byte-level BPE), the processor configs
    (feature extractor, image and video processors, chat template) and ``spk_dict.pt``. It loads
    through :func:`load_omni` exactly like ``Qwen/Qwen2.5-Omni-7B``.

    ``shape="3b"`` / ``"7b"`` writes the published sizes (:func:`published_config`) and no weight file
    (``weights`` defaults to False for them): :func:`load_omni` then creates seeded random weights on
    the target device in the target dtype. ``weights=False`` with the tiny shape does the same, small.
    """
    from transformers import GenerationConfig, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

    if shape not in SHAPES:
        raise CheckpointError(f"shape {shape!r}: use one of {', '.join(SHAPES)}")
    weights = shape == "tiny" if weights is None else weights
    if weights and shape != "tiny":
        raise CheckpointError(f"shape {shape!r} is config-only: writing {shape} random weights would take tens of GB")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    specials = SPECIAL_TOKENS + [f"<|voice_{v.lower()}|>" for v in TINY_VOICES]
    bpe, tokenizer = tiny_qwen_tokenizer(specials, {
        "audio_token": "<|AUDIO|>",
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
        "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
    })
    ids = {t: bpe.token_to_id(t) for t in specials}
    user_ids = bpe.encode("user", add_special_tokens=False).ids
    ids["user"] = user_ids[0]
    text_vocab = bpe.get_vocab_size(with_added_tokens=True)
    text_vocab += (-text_vocab) % 64  # pad the embedding like the real checkpoint does

    config = tiny_config(text_vocab, ids, hidden=hidden, layers=layers) if shape == "tiny" else \
        published_config(shape, ids)
    generation = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    if weights:
        torch.manual_seed(seed)
        model = Qwen2_5OmniForConditionalGeneration(config).eval()
        _reinit(model, seed)
        _only_valid_codes(model)
        model.generation_config = generation
        model.save_pretrained(out)
    else:  # config-only: the loader materialises random weights on the device it is asked for
        config.architectures = [OMNI_ARCHITECTURES[0]]
        config.save_pretrained(out)
        generation.save_pretrained(out)
        (out / RANDOM_INIT_FILE).write_text(json.dumps({"seed": seed, "shape": shape}) + "\n")

    tokenizer.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400, return_attention_mask=True
    )
    feature_extractor.save_pretrained(out)
    # One preprocessor_config.json holding the feature-extractor and image-processor fields, as
    # the real checkpoint ships it.
    prep = json.loads((out / "preprocessor_config.json").read_text())
    vision = VisionPreprocessing()
    prep.update({k: list(v) if isinstance(v, tuple) else v for k, v in vision.__dict__.items()
                 if not k.startswith("video_")})
    prep.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5OmniProcessor")
    (out / "preprocessor_config.json").write_text(json.dumps(prep, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")

    # spk_dict.pt in the format the real checkpoint ships: per voice, the Talker's text-bos
    # token id, the speaker conditioning vector and a reference mel for the DiT.
    g = torch.Generator().manual_seed(seed + 1)
    enc_emb_dim = config.token2wav_config.dit_config.enc_emb_dim
    mel_dim = config.token2wav_config.dit_config.mel_dim
    spk = {
        v: {
            "bos_token": ids[f"<|voice_{v.lower()}|>"],
            "cond": torch.randn(enc_emb_dim, generator=g),
            "ref_mel": torch.randn(1, 300, mel_dim, generator=g) * 0.5 - 5.0,
        }
        for v in TINY_VOICES
    }
    torch.save(spk, out / "spk_dict.pt")
    log.info("wrote tiny Qwen2.5-Omni checkpoint to %s", out)
    return out



def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Give every weight a seeded, well-scaled random value (outputs stay O(1) through the stack).

    A freshly constructed model leaves some tensors (norms, embeddings) at constants; random
    norms and biases make tests sensitive to every parameter actually being loaded.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.numel() == 0:
                continue
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
