"""Load Qwen2.5-Omni checkpoints (random ones are written by :mod:`omnistream.random_checkpoints`).

Real checkpoints (``Qwen/Qwen2.5-Omni-7B`` or a local copy) and the tiny ones written by
:func:`omnistream.random_checkpoints.make_tiny` go through exactly the same loader, :func:`load_omni`, which calls
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

class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or malformed. The message names the file."""


class PartNotLoaded(CheckpointError, AttributeError):
    """A part skipped at load time (``talker=False``). Also an AttributeError, so ``getattr(ck,
    "token2wav", None)`` and ``hasattr`` read it as absent while direct use still says why."""


@dataclass(frozen=True)
class VisionPreprocessing:
    """The image/video processor settings of `preprocessor_config.json` that the encoders use.

    transformers' Qwen2-VL video processor needs torchvision, whose CPU wheels do not match the
    CPU torch build used here; the streaming video encoder does its own resize/normalize/patchify
    with these settings instead (and is tested against the vision tower on the same patches).

    Images and video frames have different pixel bounds: ``min_pixels``/``max_pixels`` are the
    image processor's (preprocessor_config.json), ``video_min_pixels``/``video_max_pixels`` the ones
    ``Qwen2_5OmniProcessor`` gives its video processor (``videos_kwargs["size"]``: shortest_edge
    128*28*28, longest_edge 768*28*28 pixels per frame), unless the checkpoint's
    ``video_preprocessor_config.json`` says otherwise.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28

    @classmethod
    def from_json(cls, d: dict, video: dict | None = None) -> VisionPreprocessing:
        """From preprocessor_config.json (``d``) and, if the checkpoint has one, video_preprocessor_config.json."""
        keys = cls.__dataclass_fields__
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys}
        for k in ("video_min_pixels", "video_max_pixels"):
            kw.pop(k, None)  # only the video processor's own file sets these
        if video:
            size = video.get("size") or {}
            lo = size.get("shortest_edge", video.get("min_pixels"))
            hi = size.get("longest_edge", video.get("max_pixels"))
            if lo is not None:
                kw["video_min_pixels"] = int(lo)
            if hi is not None:
                kw["video_max_pixels"] = int(hi)
        return cls(**kw)


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
            raise PartNotLoaded(f"{self.path}: loaded without the Talker (talker=False)")
        return self.model.talker

    @property
    def token2wav(self):
        if not getattr(self.model, "has_talker", False):
            raise PartNotLoaded(f"{self.path}: loaded without Token2Wav (talker=False)")
        return self.model.token2wav

    @property
    def config(self):
        return self.model.config


# What config.json says for the checkpoints people point us at by mistake: (model_type, what it is).
_KNOWN_KINDS = {
    "qwen2_5_vl": "a Qwen2.5-VL checkpoint",
    "qwen2_vl": "a Qwen2-VL checkpoint",
    "qwen2": "a Qwen2 text-only checkpoint",
    "qwen2_5_omni_thinker": "a Qwen2.5-Omni Thinker-only checkpoint (no Talker / Token2Wav)",
    "qwen3_omni_moe": "a Qwen3-Omni checkpoint",
}
# The published Qwen/Qwen2.5-Omni-7B config.json says "Qwen2_5OmniModel" (the class name at release);
# transformers >= 4.52 writes "Qwen2_5OmniForConditionalGeneration". Both load the same way.
OMNI_ARCHITECTURES = ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniModel")
# A checkpoint written by `make-tiny --shape 3b|7b` (or --config-only) holds no weight file: this
# file marks it, and load_omni initialises seeded random weights directly on the target device.
RANDOM_INIT_FILE = "random_init.json"


def check_kind(cfg, where: str) -> None:
    """Refuse, from config.json alone (nothing allocated yet), a checkpoint that is not Qwen2.5-Omni.

    The message names what was found (a JanusVLN / Qwen2.5-VL / text-only checkpoint ...) and what
    is expected, so a user who passed the wrong directory knows it from one line.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    mtype, archs = cfg.get("model_type"), cfg.get("architectures")
    if mtype != "qwen2_5_omni":
        what = _KNOWN_KINDS.get(mtype, "not a Qwen2.5-Omni checkpoint")
        if mtype == "qwen2_5_vl" and ("lam" in cfg or "vggt_merger_hidden_dim" in cfg):
            what = "a JanusVLN checkpoint (Qwen2.5-VL + VGGT; run it with `omnistream nav --agent janus`)"
        raise CheckpointError(f"{where}: model_type is {mtype!r}, architectures {archs!r}: {what}; expected "
                              f"model_type 'qwen2_5_omni' ({' or '.join(OMNI_ARCHITECTURES)})")
    if archs is not None and not (isinstance(archs, list) and set(archs) & set(OMNI_ARCHITECTURES)):
        raise CheckpointError(f"{where}: architectures {archs!r}; expected one of {list(OMNI_ARCHITECTURES)}")


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
    check_kind(cfg, str(cfg_file))
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights and not (path / RANDOM_INIT_FILE).exists():
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


# --------------------------------------------------------------------------- device, dtype, attention

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_device(device) -> str:
    """The canonical name of ``device`` if this machine can use it; else a one-line CheckpointError.

    Checked before any file is read, so ``--device cuda`` on a CPU-only torch build fails at once
    with the reason instead of a CUDA traceback after the weights were read.
    """
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CheckpointError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
            raise CheckpointError(f"device {device!r} is not available: torch {torch.__version__} {why}; "
                                  f"use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CheckpointError(f"device {device!r} is not available: this machine has "
                                  f"{torch.cuda.device_count()} GPU(s)")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise CheckpointError(f"device {device!r} is not available on this machine; use --device cpu")
    elif d.type != "cpu":
        raise CheckpointError(f"device {device!r}: use cpu, cuda, cuda:N or mps")
    return str(d)


def prefer_decode_attention(device) -> None:
    """Keep PyTorch's SDPA off its cuDNN backend on CUDA (process-wide, as vLLM does).

    torch 2.11 on an H200 picks cuDNN attention for bf16, and cuDNN builds an execution graph per
    key length: with a KV cache that grows by one token per step, every decode step rebuilds it.
    Measured on the 7B shape (benchmarks/decode_steps.py, torch.profiler): ~1.8 ms of host time per
    attention call, 60-67% of a Thinker or Talker step. Flash / memory-efficient SDPA have no
    per-shape setup.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_dtype(dtype, device="cpu") -> torch.dtype:
    """``auto`` (or None): bf16 on CUDA, fp32 elsewhere; else fp32 | bf16 | fp16 (or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"dtype {dtype}: use fp32, bf16 or fp16")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise CheckpointError(f"dtype {dtype!r}: use auto, fp32, bf16 or fp16") from None


def check_attn(attn: str, device="cpu", dtype=torch.float32) -> str:
    """``attn`` if transformers can run it here (flash_attention_2: CUDA, fp16/bf16, flash-attn installed)."""
    if attn not in ATTN_IMPLEMENTATIONS:
        raise CheckpointError(f"attention {attn!r}: use {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if torch.device(device).type != "cuda":
            raise CheckpointError(f"attention 'flash_attention_2' needs a CUDA device, not {device!r}; use sdpa")
        if resolve_dtype(dtype, device) == torch.float32:
            raise CheckpointError("attention 'flash_attention_2' needs --dtype bf16 or fp16, not fp32")
        if not is_flash_attn_2_available():
            raise CheckpointError("attention 'flash_attention_2': the flash-attn package is not installed; use sdpa")
    return attn


def load_omni(
    path: str | os.PathLike,
    *,
    talker: bool = True,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> OmniCheckpoint:
    """Load a Qwen2.5-Omni checkpoint from a local directory or a hub id.

    ``talker=False`` builds only the Thinker (text output): the Talker and Token2Wav weights are
    skipped, saving about a third of the memory of the 7B model. ``dtype`` ``"auto"`` is bf16 on CUDA
    and fp32 elsewhere; Token2Wav always runs in fp32 (its ODE and vocoder, as upstream does).

    Device, dtype, attention and the checkpoint's kind (config.json) are all checked before any
    weight is allocated. A config-only checkpoint (``make-tiny --shape 7b``: no weight file, a
    ``random_init.json``) gets seeded random weights created directly on ``device`` in ``dtype``.
    """
    # Everything that can be refused is refused first, before transformers' model code is even
    # imported (that import alone takes ~2 s and 200 MB).
    device = check_device(device)
    dtype = resolve_dtype(dtype, device)
    check_attn(attn_implementation, device, dtype)
    prefer_decode_attention(device)
    p = Path(path)
    is_local = p.exists() or str(path).startswith((".", "/", "~"))
    random_init = None
    if is_local:
        p = p.expanduser()
        _check_local_dir(p)
        path = p
        if not (list(p.glob("*.safetensors")) + list(p.glob("*.bin"))):
            try:
                random_init = json.loads((p / RANDOM_INIT_FILE).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{p / RANDOM_INIT_FILE} is unreadable: {e}") from e
    from transformers import (
        AutoTokenizer,
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        WhisperFeatureExtractor,
    )
    from transformers.utils import cached_file

    try:
        if not is_local:  # a hub id: read config.json alone first, so a wrong repo costs no weight download
            check_kind(json.loads(Path(cached_file(str(path), "config.json")).read_text()), f"{path}/config.json")
        config = Qwen2_5OmniConfig.from_pretrained(str(path))
        config.enable_audio_output = talker
        if random_init is not None:
            model = _materialize(config, p, device, dtype, attn_implementation, int(random_init.get("seed", 0)))
        else:
            model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
                str(path), config=config, dtype=dtype, attn_implementation=attn_implementation
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(path))
        prep_file = cached_file(str(path), "preprocessor_config.json")
        video_file = cached_file(str(path), "video_preprocessor_config.json",
                                 _raise_exceptions_for_missing_entries=False)
        vision = VisionPreprocessing.from_json(json.loads(Path(prep_file).read_text()),
                                               json.loads(Path(video_file).read_text()) if video_file else None)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors, tokenizers and hub errors have no common base
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    model.to(device).eval()
    if talker:
        model.token2wav.float()  # the DiT ODE and the vocoder run in fp32, as upstream does
    from omnistream.model.graphs import enable_talker_graphs, graphs_wanted
    from omnistream.model.thinker_graphs import enable_thinker_graphs

    if graphs := graphs_wanted(device):  # decode steps and Token2Wav's DiT windows replayed as CUDA graphs
        enable_thinker_graphs(model.thinker)
        if talker:
            from omnistream.model.token2wav_graphs import enable_dit_graphs

            enable_talker_graphs(model.talker)
            enable_dit_graphs(model.token2wav)
    forced = os.environ.get(FORCE_LENGTH_ENV, "0") == "1"
    log.info("loaded %s on %s in %s (attention %s%s%s%s)", path, device, dtype, attn_implementation,
             ", CUDA graphs" if graphs else "", ", random weights" if random_init is not None else "",
             f", replies forced to their configured length ({FORCE_LENGTH_ENV}=1)" if forced else "")
    ck = OmniCheckpoint(
        path=str(path),
        model=model,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        vision=vision,
        voices=dict(model.speaker_map),
    )
    if forced:
        force_length(ck)
    return ck


FORCE_LENGTH_ENV = "OMNISTREAM_FORCE_LENGTH"
"""``OMNISTREAM_FORCE_LENGTH=1``: every :func:`load_omni` of the process (and of the stage processes it
starts, which inherit it) applies :func:`force_length` -- for benchmarks on random weights."""


def force_length(ck: OmniCheckpoint) -> list:
    """Suppress the Thinker's stop tokens and the Talker's end / special codes (-inf logits), so replies
    run to their configured length (``max_new_tokens``, ``max_speech_s``). Why: random weights end a
    reply after a few dozen codes, and a benchmark of such short replies measures start-up, not the
    steady state a real conversation runs in. Returns the hook handles (``.remove()`` undoes it)."""
    gen = ck.model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stop = sorted({t for t in eos + [ck.tokenizer.eos_token_id, ck.tokenizer.pad_token_id] if t is not None})

    def mask(head, ids):
        idx = torch.tensor(ids, device=head.weight.device)  # made once: a hook inside a CUDA graph copies nothing

        def hook(module, inputs, out):  # out (..., V)
            return out.index_fill_(-1, idx, float("-inf"))
        return head.register_forward_hook(hook)

    handles = [mask(ck.thinker.lm_head, stop)]
    if getattr(ck.model, "has_talker", False):
        num_codes = ck.config.token2wav_config.dit_config.num_embeds - 1  # 8192 speech codes
        handles.append(mask(ck.talker.codec_head, list(range(num_codes, ck.config.talker_config.vocab_size))))
    return handles


def random_model(cls, config, device, dtype: torch.dtype, attn: str, seed: int):
    """``cls`` (a transformers model class) from ``config`` with seeded random weights created on
    ``device`` in ``dtype`` by transformers' own ``_init_weights`` (no host copy, no file)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls._from_config(config, dtype=dtype, attn_implementation=attn)
    finally:
        torch.set_default_dtype(old)


def _materialize(config, path: Path, device: str, dtype: torch.dtype, attn: str, seed: int):
    """Random weights for a config-only checkpoint, created on ``device`` in ``dtype`` directly.

    No fp32 CPU copy is ever made (a 7B shape in bf16 is 21 GB on the GPU and nothing on the host);
    transformers' own ``_init_weights`` gives every tensor its usual initial value (filters, position
    tables included). The speaker dictionary is read from spk_dict.pt as for a real checkpoint.
    """
    from transformers import GenerationConfig, Qwen2_5OmniForConditionalGeneration

    model = random_model(Qwen2_5OmniForConditionalGeneration, config, device, dtype, attn, seed)
    if getattr(model, "has_talker", False):
        _only_valid_codes(model)
    model.load_speakers(str(path / "spk_dict.pt"))
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


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
