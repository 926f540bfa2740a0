"""JanusVLN agent: Qwen2.5-VL (semantic) + VGGT aggregator (spatial) with the dual implicit memory.

What follows JanusVLN's released code (``MIV-XJTU/JanusVLN``, ``src/evaluation.py`` and
``src/qwen_vl/model/modeling_qwen2_5_vl.py``):

* **Prompt** (``JanusVLN_Inference.call_model``): system message :data:`SYSTEM_PROMPT`; one user
  message holding the frames (``<|vision_start|><|image_pad|>...<|vision_end|>`` each, oldest first,
  the current one last) followed by :data:`CONTEXT` with the instruction; greedy decoding of at most
  24 new tokens; the answer names the action.
* **Images**: VGGT's ``load_and_preprocess_images`` ("crop" mode: a fixed width, height scaled to a
  multiple of 14 with bicubic resampling, centre-cropped to a square if taller, values in [0, 1]) with
  JanusVLN's target width :data:`JANUS_IMAGE_WIDTH` = 644 (VGGT's own is 518; ``vggt_width=518`` gives
  it); ``call_model`` gives VGGT the image before the crop below. The Qwen2.5-VL input is the same image
  cropped to multiples of 28 (``call_model``: ``width - (width // patch_size) % merge_size * patch_size``,
  ``do_rescale=False``), normalized with the checkpoint's image mean/std, as one image (the frame
  repeated over the temporal patch). A 640x480 frame becomes 644x490 for VGGT (VGGT's height rule in
  floating point: ``round(480 * (644 / 640) / 14) * 14``) and 644x476 (46x34 patches) for Qwen2.5-VL.
  (The stored copy of JanusVLN ships ``load_fn.py`` as bytecode only, so the 644 comes from the
  project's issue 12, not from a line we could read.)
* **Fusion** (``Qwen2_5_VLForConditionalGenerationForJanusVLN.forward``): the aggregator's
  second-to-last output (``aggregated_tokens[-2]``: frame + global block outputs, 2C = 2048
  channels), patch tokens only, cropped to the merged grid, grouped 2x2 in the order of Qwen's
  patch merger, through ``VGGTMerger`` (RMSNorm over 2C, Linear(4*2C, hidden_dim), GELU,
  Linear(hidden_dim, LLM hidden)) and added to the vision tower's merged tokens with weight
  ``lam`` (``config.lam``, 0.2 by default).

What differs, on purpose: JanusVLN re-encodes the sampled history through the vision tower and
re-prefills the LLM every step (only VGGT has a cache there). Here every frame goes through both
branches exactly once: its VGGT K/V join the spatial memory and its visual tokens' LLM K/V join the
semantic memory (:mod:`omnistream.memory.dual`: initial 8 + recent 48 frames each). A step runs the
new frame's segment plus the instruction suffix as one forward against the memory, decodes, and drops
the suffix and the answer again. Both memories trim as JanusVLN's VGGT cache does (after the step: a
frame sees the 8 initial frames, the 48 before it and itself; :class:`~omnistream.memory.dual.MemoryConfig`).
Each frame is fused with *its own* spatial features (JanusVLN adds the current frame's features to
every history image; with a memory, the history images' tokens were fused when they were current).
With nothing evicted, a step equals transformers' Qwen2.5-VL forward over the full prompt
(``tests/test_janus_agent.py``).

``reencode=N`` gives the memory-less baseline of the JanusVLN ablation: every step re-runs both
branches over the current frame plus N history frames sampled as JanusVLN samples them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from omnistream.checkpoints import RANDOM_INIT_FILE, VisionPreprocessing
from omnistream.encoders.vision import _resize_like_pil, check_frame, flatten_patches
from omnistream.memory.dual import DualMemory, MemoryConfig
from omnistream.navigation.agents import Agent, Observation, parse_action
from omnistream.navigation.vggt import (
    VGGTAggregator,
    VGGTConfig,
    aggregator_state_dict,
    load_aggregator,
    read_state_dict,
)

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a visual language navigation model, and your should go to the locations to complete the given task. "
    "Compare the observation and instruction to infer your current progress, and then select the correct direction "
    "from the candidates to go to the target location and finish the task."
)
CONTEXT = (
    "These images are your historical observations and your current observation.\n Your task is to {task} \n "
    "You should take one of the following actions:\n MOVE_FORWARD\n TURN_LEFT\n TURN_RIGHT\n STOP."
)


# JanusVLN's VGGT input width (issue 12; VGGT's own load_and_preprocess_images uses 518)
JANUS_IMAGE_WIDTH = 644
# config.json ``model_type`` a JanusVLN checkpoint has (it is a Qwen2.5-VL one plus VGGT + merger weights)
JANUS_MODEL_TYPES = ("qwen2_5_vl",)


class JanusError(RuntimeError):
    """A JanusVLN checkpoint is missing parts or is malformed; the message names what."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class VGGTMerger(nn.Module):
    """JanusVLN's ``VGGTMerger`` (same parameter names: ``merger.ln_q``, ``merger.mlp.{0,2}``)."""

    def __init__(self, output_dim: int, hidden_dim: int, context_dim: int, spatial_merge_size: int = 2):
        super().__init__()
        self.input_dim = context_dim * spatial_merge_size**2
        self.ln_q = RMSNorm(context_dim)
        self.mlp = nn.Sequential(nn.Linear(self.input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))

    def forward(self, x):  # (..., m, m, context_dim) grouped 2x2 -> (N, output_dim)
        return self.mlp(self.ln_q(x).reshape(-1, self.input_dim))


# ----------------------------------------------------------------------------- preprocessing


def vggt_image(
    frame: np.ndarray, width: int = JANUS_IMAGE_WIDTH, patch: int = 14, height: int | None = None
) -> torch.Tensor:
    """VGGT's ``load_and_preprocess_images`` ("crop"): (H, W, 3) uint8 -> (3, h, width) float in [0, 1].
    ``height`` forces the resized height (an episode keeps its first frame's size; see ``JanusAgent``)."""
    f = check_frame(frame)
    H, W = f.shape[:2]
    h = height or max(patch, round(H * (width / W) / patch) * patch)
    x = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).float()  # (3, H, W) levels
    if (H, W) != (h, width):
        x = _resize_like_pil(x, (h, width))
    x = x / 255.0
    if h > width:  # centre crop, as VGGT does
        top = (h - width) // 2
        x = x[:, top : top + width]
    return x


def qwen_patches(img: torch.Tensor, prep: VisionPreprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """The VGGT image (3, h, w) in [0, 1] cropped to multiples of patch*merge, normalized and
    flattened as one Qwen2.5-VL image -> (patches (gh*gw, C*T*p*p), grid_thw (1, 3))."""
    p, m = prep.patch_size, prep.merge_size
    _, h, w = img.shape
    h, w = (h // (p * m)) * p * m, (w // (p * m)) * p * m
    if h == 0 or w == 0:
        raise ValueError(f"image {tuple(img.shape[1:])} is smaller than one merged patch ({p * m} px)")
    x = img[:, :h, :w]
    mean = torch.tensor(prep.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(prep.image_std, dtype=torch.float32)[:, None, None]
    x = (x - mean) / std
    pair = torch.stack([x] * prep.temporal_patch_size)  # an image is a temporal patch of copies
    return flatten_patches(pair, prep), torch.tensor([[1, h // p, w // p]])


# ----------------------------------------------------------------------------- checkpoint files


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise JanusError(f"{index} is malformed: {e}") from e
    return sorted(path.glob("*.safetensors"))


def weight_names(path: Path) -> list[str]:
    """Tensor names of a directory's safetensors shards, read from the headers only (no tensor data)."""
    from safetensors import safe_open

    names: list[str] = []
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as sf:
            names.extend(sf.keys())
    return names


def check_checkpoint(path: Path, vggt_path=None) -> dict:
    """Check that ``path`` is a JanusVLN checkpoint from its small files only, before anything is allocated;
    returns the parsed ``config.json``.

    Why first: transformers builds whatever config it is handed, so an Omni (or any other) directory given
    to the Qwen2.5-VL loader became a default-size (7B) Qwen2.5-VL in fp32 and was killed for memory.
    Checked: ``config.json`` ``model_type`` (and its ``architectures`` for the message), weight shards,
    tokenizer files, and the ``vggt.aggregator.*`` / ``merger.*`` tensor names (safetensors headers)."""
    if not (path / "config.json").is_file():
        raise JanusError(f"{path}: no config.json (expected a JanusVLN / Qwen2.5-VL checkpoint directory)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JanusError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise JanusError(f"{path / 'config.json'} is not a JSON object")
    kind, archs = raw.get("model_type"), raw.get("architectures") or []
    if kind not in JANUS_MODEL_TYPES:
        found = f"model_type {kind!r}" if kind else "no model_type"
        found += f" ({', '.join(map(str, archs))})" if archs else ""
        raise JanusError(f"{path} is not a JanusVLN checkpoint: config.json has {found}; expected model_type "
                         f"{JANUS_MODEL_TYPES[0]!r} (Qwen2.5-VL + vggt.aggregator.* + merger.* weights)")
    try:
        names = weight_names(path)
    except (OSError, RuntimeError, ValueError) as e:  # a truncated or foreign file
        raise JanusError(f"{path}: cannot read the safetensors headers: {e}") from e
    config_only = not names and (path / RANDOM_INIT_FILE).is_file()  # nav make-tiny --shape 7b
    if not names and not config_only:
        raise JanusError(f"{path}: no *.safetensors weights (expected model.safetensors or its shards)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise JanusError(f"{path}: no tokenizer files (tokenizer.json / vocab.json)")
    if config_only:
        if not isinstance(raw.get("vggt_merger_hidden_dim"), int):
            raise JanusError(f"{path}: a config-only checkpoint needs vggt_merger_hidden_dim in config.json")
        return raw
    if vggt_path is None and not any(n.startswith("vggt.aggregator.") for n in names):
        raise JanusError(f"{path}: no vggt.aggregator.* weights; pass vggt_path= (facebook/VGGT-1B)")
    if not any(n.startswith("merger.") for n in names):
        raise JanusError(f"{path}: no merger.* weights (the VGGT feature MLP)")
    return raw


def _random_init(path: Path) -> dict | None:
    """The seed of a config-only checkpoint (``nav make-tiny --shape 7b``), or None for real weights."""
    f = path / RANDOM_INIT_FILE
    if not f.is_file() or weight_names(path):
        return None
    try:
        spec = json.loads(f.read_text())
        return {"seed": int(spec.get("seed", 0))}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise JanusError(f"{f} is unreadable: {e}") from e


def _load_spatial(p: Path, model, vcfg, vggt_path, device, dtype):
    """The VGGT aggregator and the merger from the checkpoint's ``vggt.aggregator.*`` / ``merger.*``."""
    try:
        extra = read_prefixed(p, ("vggt.aggregator.", "merger."))
        agg_sd = aggregator_state_dict(read_state_dict(vggt_path)) if vggt_path is not None else {}
    except (OSError, KeyError, RuntimeError, ValueError) as e:  # missing/corrupt files, no aggregator keys
        raise JanusError(f"cannot read the VGGT / merger weights ({vggt_path or p}): {e}") from e
    if vggt_path is None:
        agg_sd = {k[len("vggt.aggregator.") :]: v for k, v in extra.items() if k.startswith("vggt.aggregator.")}
    try:
        vggt = load_aggregator(agg_sd, vcfg).to(device, dtype)
    except (RuntimeError, KeyError, ValueError) as e:
        raise JanusError(f"{p}: the VGGT aggregator weights do not load: {e}") from e
    msd = {k[len("merger.") :]: v for k, v in extra.items() if k.startswith("merger.")}
    if "mlp.0.weight" not in msd:
        raise JanusError(f"{p}: merger.mlp.0.weight is missing")
    merger = _merger(model, vggt.config, msd["mlp.0.weight"].shape[0])
    try:
        merger.load_state_dict(msd, strict=True)
    except RuntimeError as e:
        raise JanusError(f"{p}: merger weights do not match: {e}") from e
    return vggt, merger.to(device, dtype).eval()


def _random_spatial(model, vcfg: VGGTConfig, merger_hidden: int, device, dtype, seed: int):
    """A seeded random VGGT aggregator and merger, created on ``device`` in ``dtype``."""
    torch.manual_seed(seed + 1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vggt = VGGTAggregator(vcfg).eval()
            merger = _merger(model, vcfg, merger_hidden).eval()
    finally:
        torch.set_default_dtype(old)
    return vggt, merger


def _merger(model, vcfg: VGGTConfig, hidden_dim: int) -> VGGTMerger:
    return VGGTMerger(
        output_dim=model.config.get_text_config().hidden_size,
        hidden_dim=hidden_dim,
        context_dim=2 * vcfg.embed_dim,
        spatial_merge_size=model.config.vision_config.spatial_merge_size,
    )


def read_prefixed(path: Path, prefixes: tuple[str, ...]) -> dict:
    """Tensors whose names start with one of ``prefixes`` from a directory's safetensors shards."""
    from safetensors import safe_open

    out = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                if k.startswith(prefixes):
                    out[k] = sf.get_tensor(k)
    return out


# ----------------------------------------------------------------------------- the agent


class JanusAgent(Agent):
    """A JanusVLN policy over a frame stream (``act`` once per simulator step)."""

    name = "janus"

    def __init__(
        self,
        model,
        tokenizer,
        vggt: VGGTAggregator,
        merger: VGGTMerger,
        prep: VisionPreprocessing,
        *,
        lam: float = 0.2,
        memory: MemoryConfig | None = None,
        max_new_tokens: int = 24,
        vggt_width: int | None = None,
        reencode: int | None = None,
    ):
        super().__init__()
        self.model, self.tokenizer, self.vggt, self.merger, self.prep = model, tokenizer, vggt, merger, prep
        self.lm = model.model.language_model
        self.visual = model.model.visual
        self.embed = model.get_input_embeddings()
        self.lam, self.max_new_tokens, self.reencode = lam, max_new_tokens, reencode
        self.vggt_width = vggt_width or JANUS_IMAGE_WIDTH
        self.memory_config = memory or MemoryConfig()
        cfg = model.config
        self.ids = {
            "vs": cfg.vision_start_token_id,
            "ve": cfg.vision_end_token_id,
            "img": cfg.image_token_id,
        }
        eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        self.eos_ids = {e for e in eos if isinstance(e, int) and e >= 0}
        self.vggt_layers = vggt.config.depth - 1  # outputs[-2] needs blocks 0..depth-2 only
        if self.vggt_layers < 1:
            raise JanusError("the VGGT aggregator needs depth >= 2 (JanusVLN reads its second-to-last layer)")
        self.memory = DualMemory(self.vggt_layers, cfg.get_text_config().num_hidden_layers, self.memory_config)
        self.prefix_ids = self._tok(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
        self.instruction = ""
        self.reset(None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        vggt_path=None,
        device="cpu",
        dtype=torch.float32,
        lam: float | None = None,
        attn_implementation: str = "sdpa",
        **kw,
    ) -> JanusAgent:
        """Load a JanusVLN checkpoint directory: Qwen2.5-VL weights + ``vggt.aggregator.*`` + ``merger.*``
        in its safetensors, ``lam`` / ``vggt_merger_hidden_dim`` in ``config.json`` (the layout of
        JanusVLN's released checkpoints and of :func:`omnistream.navigation.tiny.make_tiny_janus`).
        ``vggt_path``: a ``facebook/VGGT-1B`` directory or file when the checkpoint has no VGGT weights."""
        from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from omnistream.checkpoints import CheckpointError, prefer_decode_attention, random_model, resolve_dtype

        p = Path(path).expanduser()
        raw = check_checkpoint(p, vggt_path)  # before anything is allocated
        try:
            dtype = resolve_dtype(dtype, device)  # "auto": bf16 on CUDA, fp32 elsewhere
        except CheckpointError as e:
            raise JanusError(str(e)) from e
        prefer_decode_attention(device)
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # vggt.* / merger.* are "unexpected" to Qwen2.5-VL: loaded below
        hf_logging.disable_progress_bar()
        random_init = _random_init(p)
        try:
            if random_init is None:
                model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    str(p), dtype=dtype, attn_implementation=attn_implementation
                )
            else:  # seeded random weights made on the device in the dtype: no host copy
                model = random_model(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig.from_pretrained(str(p)),
                                     device, dtype, attn_implementation, random_init["seed"])
            tokenizer = AutoTokenizer.from_pretrained(str(p))
        except Exception as e:  # safetensors / tokenizers errors have no common base
            raise JanusError(f"cannot load the Qwen2.5-VL part of {p}: {type(e).__name__}: {e}") from e
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        model.to(device).eval()
        prep_file = p / "preprocessor_config.json"
        prep = VisionPreprocessing.from_json(json.loads(prep_file.read_text())) if prep_file.exists() else None
        prep = prep or VisionPreprocessing()

        vcfg = VGGTConfig.from_dict(raw["vggt_config"]) if raw.get("vggt_config") else None
        if random_init is not None:
            vggt, merger = _random_spatial(model, vcfg or VGGTConfig(), raw["vggt_merger_hidden_dim"], device, dtype,
                                           random_init["seed"])
        else:
            vggt, merger = _load_spatial(p, model, vcfg, vggt_path, device, dtype)
        lam = raw.get("lam", 0.2) if lam is None else lam
        agent = cls(model, tokenizer, vggt, merger, prep, lam=lam, **kw)
        agent.source = str(p.resolve())
        return agent

    # ------------------------------------------------------------------ helpers
    def _tok(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def memory_bytes(self) -> int:
        return self.memory.memory_bytes()

    def settings(self) -> dict:
        """What changes this agent's actions (a navigation run's identity; the device does not)."""
        m = self.memory_config
        return {**super().settings(), "model": getattr(self, "source", None), "dtype": str(self.dtype),
                "lam": self.lam, "vggt_width": self.vggt_width, "max_new_tokens": self.max_new_tokens,
                "reencode": self.reencode, "memory": [m.initial_frames, m.recent_frames, m.trim_after_step]}

    def reset(self, episode) -> None:
        """New episode: empty memories; the instruction goes into every step's suffix."""
        self.memory.reset()
        self.instruction = "" if episode is None else str(episode.instruction.instruction_text)
        self.suffix_ids = self._tok(CONTEXT.format(task=self.instruction) + "<|im_end|>\n<|im_start|>assistant\n")
        self._next_pos = 0  # next free M-RoPE position of the stream (after the last frame)
        self._vggt_height: int | None = None  # resized frame height, fixed by the episode's first frame
        self._frames: list[tuple] = []  # (vggt image, patches, grid): kept only in re-encode mode
        self.last_text = ""
        self.last_logits: torch.Tensor | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ the two branches for one frame
    def _spatial_features(self, tokens: torch.Tensor, vh: int, vw: int, grid) -> torch.Tensor:
        """outputs[-2] of one frame (P, 2C) -> merged spatial tokens (n, LLM hidden)."""
        p, m = self.vggt.config.patch_size, self.prep.merge_size
        feats = tokens[self.vggt.patch_start_idx :].reshape(vh // p, vw // p, -1)  # (gh, gw, 2C)
        mh, mw = int(grid[0, 1]) // m, int(grid[0, 2]) // m
        feats = feats[: mh * m, : mw * m].reshape(mh, m, mw, m, -1).permute(0, 2, 1, 3, 4)  # (mh, mw, m, m, 2C)
        return self.merger(feats.to(self.dtype))

    def _prepare(self, rgb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # every frame of an episode gets the first frame's resized height: the memories hold frames of
        # one token count (a camera that changes resolution mid-episode is resized, not rejected)
        img = vggt_image(rgb, self.vggt_width, self.vggt.config.patch_size, height=self._vggt_height)
        self._vggt_height = img.shape[1]
        img = img.to(self.device)
        patches, grid = qwen_patches(img.cpu(), self.prep)
        return img, patches.to(self.device, self.dtype), grid

    def _frame_positions(self, start: int, grid) -> tuple[torch.Tensor, int]:
        """M-RoPE positions (3, n+2) of ``<|vision_start|> image <|vision_end|>`` starting at ``start``
        (transformers' ``get_rope_index`` rule for an image) and the next free position."""
        m = self.prep.merge_size
        mh, mw = int(grid[0, 1]) // m, int(grid[0, 2]) // m
        hh, ww = torch.meshgrid(torch.arange(mh), torch.arange(mw), indexing="ij")
        img = torch.stack([torch.zeros(mh * mw, dtype=torch.long), hh.flatten(), ww.flatten()]) + start + 1
        vs = torch.full((3, 1), start)
        ve = torch.full((3, 1), start + 1 + max(mh, mw))
        return torch.cat([vs, img, ve], dim=1), start + 2 + max(mh, mw)

    def _frame_embeds(self, fused: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([self.ids["vs"], self.ids["ve"]], device=self.device)
        e = self.embed(ids)
        return torch.cat([e[:1], fused.to(self.dtype), e[1:]], dim=0)  # (n+2, D)

    def _decode(self, logits: torch.Tensor, forward, pos: int) -> str:
        """Greedy decoding from ``logits`` (V,); ``forward(embeds, positions)`` returns the next logits."""
        out = []
        for i in range(self.max_new_tokens):
            tok = int(logits.argmax())
            if tok in self.eos_ids:
                break
            out.append(tok)
            if i + 1 == self.max_new_tokens:
                break
            e = self.embed(torch.tensor([[tok]], device=self.device))
            logits = forward(e, torch.full((3, 1, 1), pos + i, device=self.device))
        return self.tokenizer.decode(out, skip_special_tokens=True)

    # ------------------------------------------------------------------ one step with the dual memory
    @torch.inference_mode()
    def step(self, rgb) -> str:
        """Feed one frame; return the generated answer text."""
        t0 = time.perf_counter()
        img, patches, grid = self._prepare(rgb)
        if self.reencode is not None:
            return self._step_reencode(img, patches, grid, t0)
        mem = self.memory
        # spatial branch: one causal VGGT step against the spatial memory
        outs = self.vggt.step(img[None].to(self.vggt.camera_token.dtype), mem.spatial, num_layers=self.vggt_layers)
        spatial = self._spatial_features(outs[-1][0], img.shape[1], img.shape[2], grid)
        t1 = time.perf_counter()
        # semantic branch: vision tower + lam * spatial, then one LLM forward (frame + suffix)
        vis = self.visual(patches, grid_thw=grid.to(self.device)).pooler_output  # (n, D)
        fused = vis + self.lam * spatial.to(vis.dtype)
        first = mem.semantic.kv.frames_seen == 0 and mem.semantic.kv.prefix == 0
        pieces, pos = [], []
        if first:
            pieces.append(self.embed(torch.tensor(self.prefix_ids, device=self.device)))
            pos.append(torch.arange(len(self.prefix_ids)).expand(3, -1))
            self._next_pos = len(self.prefix_ids)
        fpos, self._next_pos = self._frame_positions(self._next_pos, grid)
        pieces.append(self._frame_embeds(fused))
        pos.append(fpos)
        n_suf = len(self.suffix_ids)
        pieces.append(self.embed(torch.tensor(self.suffix_ids, device=self.device)))
        pos.append(torch.arange(n_suf).expand(3, -1) + self._next_pos)
        embeds = torch.cat(pieces)[None]  # (1, n, D)
        positions = torch.cat(pos, dim=1)[:, None].to(self.device)  # (3, 1, n)
        prefix = len(self.prefix_ids) if first else 0
        h = mem.semantic.forward(self.lm, embeds, positions, prefix=prefix, frame=fpos.shape[1])
        logits = self.model.lm_head(h.last_hidden_state[0, -1])
        self.last_logits = logits.float()
        t2 = time.perf_counter()

        def fwd(e, p):
            o = mem.semantic.forward(self.lm, e, p)
            return self.model.lm_head(o.last_hidden_state[0, -1])

        text = self._decode(logits, fwd, self._next_pos + n_suf)
        mem.semantic.kv.drop_transient()
        t3 = time.perf_counter()
        self.timings = {"spatial_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2, "step_s": t3 - t0}
        return text

    # ------------------------------------------------------------------ the memory-less baseline
    def _step_reencode(self, img, patches, grid, t0) -> str:
        from transformers import DynamicCache

        self._frames.append((img, patches, grid))
        hist = len(self._frames) - 1
        if hist <= self.reencode:
            idx = list(range(hist + 1))
        else:  # JanusVLN's sampling of the history (src/evaluation.py)
            idx = np.linspace(0, hist, self.reencode + 1, dtype=int).tolist()
        frames = [self._frames[i] for i in idx]
        imgs = torch.stack([f[0] for f in frames])[None].to(self.vggt.camera_token.dtype)  # (1, S, 3, h, w)
        outs = self.vggt(imgs, causal=True, num_layers=self.vggt_layers)[-1][0]  # (S, P, 2C)
        grids = torch.cat([f[2] for f in frames])
        vis = self.visual(torch.cat([f[1] for f in frames]), grid_thw=grids.to(self.device)).pooler_output
        spatial = torch.cat([self._spatial_features(o, img.shape[1], img.shape[2], grid) for o in outs])
        fused = vis + self.lam * spatial.to(vis.dtype)
        n_tok = fused.shape[0] // len(frames)
        pieces = [self.embed(torch.tensor(self.prefix_ids, device=self.device))]
        pos = [torch.arange(len(self.prefix_ids)).expand(3, -1)]
        nxt = len(self.prefix_ids)
        for k in range(len(frames)):
            fp, nxt = self._frame_positions(nxt, grid)
            pieces.append(self._frame_embeds(fused[k * n_tok : (k + 1) * n_tok]))
            pos.append(fp)
        pieces.append(self.embed(torch.tensor(self.suffix_ids, device=self.device)))
        pos.append(torch.arange(len(self.suffix_ids)).expand(3, -1) + nxt)
        cache = DynamicCache(config=self.lm.config)
        positions = torch.cat(pos, dim=1)[:, None].to(self.device)
        h = self.lm(inputs_embeds=torch.cat(pieces)[None], position_ids=positions, cache=cache, use_cache=True)
        logits = self.model.lm_head(h.last_hidden_state[0, -1])
        self.last_logits = logits.float()

        def fwd(e, p):
            o = self.lm(inputs_embeds=e, position_ids=p, cache=cache, use_cache=True)
            return self.model.lm_head(o.last_hidden_state[0, -1])

        text = self._decode(logits, fwd, nxt + len(self.suffix_ids))
        self.timings = {"step_s": time.perf_counter() - t0}
        return text

    # ------------------------------------------------------------------ Agent interface
    def act(self, obs: Observation) -> str:
        text = self.step(obs.rgb)
        self.last_text = text
        action, ok = parse_action(text)
        if not ok:
            self.unparseable += 1
        return action
