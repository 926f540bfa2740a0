"""A tiny random JanusVLN-shaped checkpoint, for tests and benchmarks (no downloads).

The directory has the layout of JanusVLN's released checkpoints, so it loads through
:meth:`omnistream.navigation.janus.JanusAgent.from_pretrained` exactly like a real one:

* ``config.json``: a ``qwen2_5_vl`` config (tiny text and vision towers) plus JanusVLN's ``lam`` and
  ``vggt_merger_hidden_dim``, and ``vggt_config`` (the tiny aggregator's sizes; real checkpoints omit
  it and the sizes are read from the weights);
* ``model.safetensors``: the Qwen2.5-VL weights as ``save_pretrained`` writes them, plus
  ``vggt.aggregator.*`` (VGGT's key layout) and ``merger.*`` (the spatial-feature MLP);
* a byte-level BPE tokenizer with Qwen2.5-VL's special tokens (built with the helpers of
  :func:`omnistream.random_checkpoints.make_tiny`), ``generation_config.json`` and ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Qwen2.5-VL's special tokens (names as in its tokenizer_config.json), ids assigned after the BPE vocab.
QWEN25VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VGGT = {
    "img_size": 56,
    "patch_size": 14,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "dino_depth": 1,
    "dino_heads": 2,
}


# JanusVLN-7B's shapes, for `--shape 7b` (config only, random weights made at load time). Sources:
# Qwen2.5-VL-7B-Instruct's modules as printed from the published checkpoint (acproject/duorou
# docs/qwen2.5vl_graph.md: embed_tokens (152064, 3584), 28 decoder layers, k_proj 3584 -> 512 = 4 KV heads
# of 128, MLP 18944; vision: 32 blocks of 1280 with MLP 3420, merger 5120 -> 3584) and its config.json
# (window_size 112, fullatt_block_indexes [7, 15, 23, 31], tokens_per_second 2, rope_theta 1e6, mrope_section
# [16, 24, 24], max_position_embeddings 128000); JanusVLN's modeling_qwen2_5_vl.py (VGGTMerger hidden_dim =
# vggt_merger_hidden_dim, default 4096, context_dim 2048 = 2 x VGGT's 1024); VGGT-1B: VGGTConfig's defaults.
QWEN25VL_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
                    "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
QWEN25VL_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
JANUS_7B_MERGER_HIDDEN = 4096
QWEN25VL_7B_PARAMS = 8_292_166_656  # Qwen2.5-VL-7B-Instruct's safetensors (the model card's "8.29B")


def make_tiny_janus(
    out_dir: str | os.PathLike, *, seed: int = 0, hidden: int = 64, layers: int = 2, lam: float = 0.2, vggt=None,
    shape: str = "tiny", config_only: bool = False,
) -> Path:
    """Write a random JanusVLN checkpoint to ``out_dir`` and return its path.

    ``shape="7b"`` writes JanusVLN-7B's configuration (Qwen2.5-VL-7B + VGGT-1B + the merger) with no
    weight file (``config_only`` implied): :meth:`JanusAgent.from_pretrained` then creates seeded
    random weights directly on its device in its dtype, so navigation timings are real-scale without
    a 17-GB download. ``config_only`` does the same with the tiny shape (the tests' quick path)."""
    import torch  # here, not at the top: the CLI imports this module's argument list at start-up
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from omnistream.checkpoints import RANDOM_INIT_FILE, VisionPreprocessing
    from omnistream.navigation.janus import VGGTMerger
    from omnistream.navigation.vggt import VGGTAggregator, VGGTConfig
    from omnistream.random_checkpoints import _reinit, tiny_qwen_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe, tokenizer = tiny_qwen_tokenizer(QWEN25VL_SPECIAL_TOKENS, {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    })
    ids = {t: bpe.token_to_id(t) for t in QWEN25VL_SPECIAL_TOKENS}
    vocab = bpe.get_vocab_size(with_added_tokens=True)
    vocab += (-vocab) % 64

    if shape not in ("tiny", "7b"):
        raise ValueError(f"shape {shape!r}: use tiny or 7b")
    heads, kv_heads = 4, 2
    text = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": layers,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [layers - 1],
        "tokens_per_second": 2,
    }
    if shape == "7b":
        config_only = True
        text.update(QWEN25VL_7B_TEXT)
        vision = dict(QWEN25VL_7B_VISION)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    generation = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    tokenizer.save_pretrained(out)
    vcfg = VGGTConfig() if shape == "7b" else VGGTConfig.from_dict(vggt or TINY_VGGT)
    merger_hidden = JANUS_7B_MERGER_HIDDEN if shape == "7b" else 2 * hidden
    if config_only:
        config.save_pretrained(out)
        generation.save_pretrained(out)
        (out / RANDOM_INIT_FILE).write_text(json.dumps({"seed": seed, "shape": shape}) + "\n")
    else:
        (out / RANDOM_INIT_FILE).unlink(missing_ok=True)  # a rewrite over a config-only directory
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        _reinit(model, seed)
        model.generation_config = generation
        model.save_pretrained(out)
        agg = VGGTAggregator(vcfg).eval()
        _reinit(agg, seed + 1)
        merger = VGGTMerger(hidden, merger_hidden, 2 * vcfg.embed_dim, spatial_merge_size=2).eval()
        _reinit(merger, seed + 2)
        weights = out / "model.safetensors"
        sd = load_file(str(weights))
        sd.update({f"vggt.aggregator.{k}": v.contiguous() for k, v in agg.state_dict().items()})
        sd.update({f"merger.{k}": v.contiguous() for k, v in merger.state_dict().items()})
        save_file(sd, str(weights), metadata={"format": "pt"})

    cfg = json.loads((out / "config.json").read_text())
    cfg.update(lam=lam, vggt_merger_hidden_dim=merger_hidden, reference_frame="first", use_vggt_feature=True)
    cfg["vggt_config"] = vcfg.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    prep = {k: list(v) if isinstance(v, tuple) else v for k, v in VisionPreprocessing().__dict__.items()}
    prep.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (out / "preprocessor_config.json").write_text(json.dumps(prep, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return out


def add_arguments(p) -> None:
    """The options of ``omnistream nav make-tiny`` and ``python -m omnistream.navigation.tiny`` (one list)."""
    from omnistream.cli import int_at_least  # the CLI's argument types (one copy)

    p.add_argument("dir", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--layers", type=int_at_least(1), default=2, help="layers of the LLM and vision tower (default 2)")
    p.add_argument("--lam", type=float, default=0.2, help="weight of the spatial features (config lam, default 0.2)")
    p.add_argument("--shape", choices=["tiny", "7b"], default="tiny",
                   help="tiny (weights written, default) or 7b: JanusVLN-7B's configuration only, random weights "
                        "made at load time on the chosen device and dtype (real-scale timings, no download)")


def run_cli(args) -> int:
    out = make_tiny_janus(args.dir, seed=args.seed, layers=args.layers, lam=args.lam, shape=args.shape)
    what = "a tiny JanusVLN" if args.shape == "tiny" else "a config-only JanusVLN-7B-shaped"
    print(f"wrote {what} checkpoint to {out} (run it with: omnistream nav --agent janus --model {out} ...)")
    return 0



def main(argv: list[str] | None = None) -> int:
    """``python -m omnistream.navigation.tiny DIR`` (the same as ``omnistream nav make-tiny DIR``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m omnistream.navigation.tiny", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
