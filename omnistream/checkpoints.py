"""Load Qwen2.5-Omni checkpoints, and write tiny random ones in the same format.

Real checkpoints (``Qwen/Qwen2.5-Omni-7B`` or a local copy) and the tiny ones written by
:func:`make_tiny` go through exactly the same loader, :func:`load_omni`, which calls
transformers' ``Qwen2_5OmniForConditionalGeneration.from_pretrained`` and
``Qwen2_5OmniProcessor.from_pretrained``. Tests and the demo therefore exercise the real
loading path with no network.

The loaded model keeps its parts addressable: ``OmniCheckpoint.thinker`` (audio tower,
vision tower, LLM), ``.talker`` and ``.token2wav``. Text-only users pass ``talker=False`` and
neither Talker nor Token2Wav is built.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or malformed. The message names the file."""


@dataclass(frozen=True)
class VisionPreprocessing:
    """The image/video processor settings of `preprocessor_config.json` that the encoders use.

    transformers' Qwen2-VL video processor needs torchvision, whose CPU wheels do not match the
    CPU torch build used here; the streaming video encoder does its own resize/normalize/patchify
    with these settings instead (and is tested against the vision tower on the same patches).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_json(cls, d: dict) -> "VisionPreprocessing":
        keys = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys})


@dataclass
class OmniCheckpoint:
    """A loaded Qwen2.5-Omni model with its processor; each part usable on its own."""

    path: str
    model: torch.nn.Module  # Qwen2_5OmniForConditionalGeneration
    tokenizer: object  # Qwen2Tokenizer
    feature_extractor: object  # WhisperFeatureExtractor (log-mel settings)
    vision: VisionPreprocessing
    voices: dict = field(default_factory=dict)

    @property
    def thinker(self):
        return self.model.thinker

    @property
    def talker(self):
        if not getattr(self.model, "has_talker", False):
            raise CheckpointError(f"{self.path}: loaded without the Talker (talker=False)")
        return self.model.talker

    @property
    def token2wav(self):
        if not getattr(self.model, "has_talker", False):
            raise CheckpointError(f"{self.path}: loaded without Token2Wav (talker=False)")
        return self.model.token2wav

    @property
    def config(self):
        return self.model.config


def _check_local_dir(path: Path) -> None:
    """Fail early, naming the file, when a local checkpoint directory is not loadable."""
    if not path.exists():
        raise CheckpointError(
            f"checkpoint directory {path} does not exist; pass a local directory or a hub id "
            f"such as Qwen/Qwen2.5-Omni-7B, or write a tiny one with `omnistream make-tiny {path}`"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory holding config.json")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file} is missing: not a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") != "qwen2_5_omni":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{cfg_file}: model_type is {got!r}, expected 'qwen2_5_omni'")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"{path}: no weights (model.safetensors or model-*.safetensors) found")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from e
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        if not (path / name).exists():
            raise CheckpointError(f"{path / name} is missing: the processor cannot be built")


def load_omni(
    path: str | os.PathLike,
    *,
    talker: bool = True,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> OmniCheckpoint:
    """Load a Qwen2.5-Omni checkpoint from a local directory or a hub id.

    ``talker=False`` builds only the Thinker (text output): the Talker and Token2Wav weights are
    skipped, saving about a third of the memory of the 7B model.
    """
    from transformers import AutoTokenizer, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
    from transformers import WhisperFeatureExtractor
    from transformers.utils import cached_file

    p = Path(path)
    is_local = p.exists() or str(path).startswith((".", "/", "~"))
    if is_local:
        _check_local_dir(p.expanduser())
    try:
        config = Qwen2_5OmniConfig.from_pretrained(str(path))
        config.enable_audio_output = talker
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
            str(path), config=config, dtype=dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(path))
        prep_file = cached_file(str(path), "preprocessor_config.json")
        vision = VisionPreprocessing.from_json(json.loads(Path(prep_file).read_text()))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors, tokenizers and hub errors have no common base
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    model.to(device).eval()
    if talker:
        model.token2wav.float()  # the DiT ODE and the vocoder run in fp32, as upstream does
    return OmniCheckpoint(
        path=str(path),
        model=model,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        vision=vision,
        voices=dict(model.speaker_map),
    )


# --------------------------------------------------------------------------- tiny checkpoints


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
    from transformers import Qwen2_5OmniConfig

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
        vocab_size=8448,
        embedding_size=hidden,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_parameters=dict(mrope),
        tts_text_start_token_id=ids["<tts_text_bos>"],
        tts_text_end_token_id=ids["<tts_text_eod>"],
        tts_text_pad_token_id=ids["<tts_pad>"],
        **media,
        spatial_merge_size=2,
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


def make_tiny(out_dir: str | os.PathLike, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a complete tiny Qwen2.5-Omni checkpoint in the real Hugging Face format.

    The directory holds ``config.json``, ``model.safetensors`` (seeded random weights),
    ``generation_config.json``, tokenizer files (a small byte-level BPE), the processor configs
    (feature extractor, image and video processors, chat template) and ``spk_dict.pt``. It loads
    through :func:`load_omni` exactly like ``Qwen/Qwen2.5-Omni-7B``.
    """
    from transformers import GenerationConfig, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

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

    config = tiny_config(text_vocab, ids, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    _reinit(model, seed)
    _only_valid_codes(model)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)

    tokenizer.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400, return_attention_mask=True
    )
    feature_extractor.save_pretrained(out)
    # One preprocessor_config.json holding the feature-extractor and image-processor fields, as
    # the real checkpoint ships it.
    prep = json.loads((out / "preprocessor_config.json").read_text())
    vision = VisionPreprocessing()
    prep.update({k: list(v) if isinstance(v, tuple) else v for k, v in vision.__dict__.items()})
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


def _only_valid_codes(model) -> None:
    """Make the random Talker emit only codes Token2Wav can decode (or a codec end token).

    The real Talker's vocabulary (8448) holds 8192 speech codes and special tokens; a trained
    codec head never predicts the specials mid-reply, a random one would, and the DiT cannot embed
    them. Zero logits for those rows (the random rows of real codes reach far above zero).
    """
    cfg = model.config.talker_config
    num_codes = model.config.token2wav_config.dit_config.num_embeds - 1  # 8192
    keep = {cfg.tts_codec_end_token_id, cfg.tts_codec_pad_token_id}  # the Talker's eos ids
    with torch.no_grad():
        for row in range(num_codes, cfg.vocab_size):
            if row not in keep:
                model.talker.codec_head.weight[row].zero_()


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
