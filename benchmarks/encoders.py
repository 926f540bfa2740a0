"""Streaming encoders, TMRoPE and incremental prefill: exactness and speed, as one JSON object.

    python benchmarks/encoders.py --json                 # the tiny checkpoint (written if missing)
    python benchmarks/encoders.py --json --model DIR     # a real Qwen2.5-Omni checkpoint

Every "diff" compares the streaming path with transformers' offline modules on the same inputs
in the same run; the real-time factors are compute seconds per second of media (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from omnistream.checkpoints import load_omni  # noqa: E402
from omnistream.encoders.audio import AudioStream, StreamingLogMel, measure_clamp_rule  # noqa: E402
from omnistream.encoders.media import read_audio  # noqa: E402
from omnistream.encoders.tmrope import (  # noqa: E402
    Audio,
    AudioVideo,
    Image,
    Text,
    TMRoPE,
    Video,
    audio_block_tokens,
    get_rope_index_whole,
    segment_token_ids,
)
from omnistream.encoders.vision import (  # noqa: E402
    FrameResampler,
    VideoStream,
    flatten_patches,
    preprocess_frame,
    synthetic_frames,
    target_size,
)
from omnistream.random_checkpoints import make_tiny  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "omnistream" / "assets" / "hello.flac"


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Band-limited noise with a syllable-rate envelope: a stand-in for speech at 16 kHz."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    x = np.convolve(rng.standard_normal(n), np.hanning(9) / 4.5, mode="same")
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * np.arange(n) / 16000) ** 2
    return (0.1 * x * env).astype(np.float32)


def random_pieces(x: np.ndarray, rnd: random.Random, lo: int, hi: int):
    i = 0
    while i < len(x):
        k = rnd.randint(lo, hi)
        yield x[i : i + k]
        i += k


def bench_audio(ck, seconds: float, rnd: random.Random) -> dict:
    pcm = speech_like(seconds, seed=1)
    stream = AudioStream.from_checkpoint(ck)
    t = time.perf_counter()
    blocks = [b for piece in random_pieces(pcm, rnd, 160, 16000) for b in stream.push(piece)]
    blocks += stream.finish()
    elapsed = time.perf_counter() - t
    got = torch.cat([b.embeds for b in blocks])  # (tokens, D)
    # offline tower on the very features the stream computed (one push, no chunking)
    lm = StreamingLogMel(ck.feature_extractor)
    mel = torch.cat([lm.push(pcm), lm.finish()], dim=1)  # (128, T)
    tower = ck.thinker.model.audio_tower
    with torch.inference_mode():
        ref = tower(input_features=mel.to(tower.dtype), feature_lens=torch.tensor([mel.shape[1]])).last_hidden_state
    clamp = measure_clamp_rule(ck.feature_extractor, _speech_clip())
    return {
        "audio_max_abs_diff": float((got.float() - ref.float()).abs().max()),
        "audio_tokens": int(got.shape[0]),
        "audio_rtf": elapsed / seconds,
        "logmel_clamp_rule_max_abs_diff": clamp["max_abs_diff"],
        "logmel_clamp_rule_mean_abs_diff": clamp["mean_abs_diff"],
        "logmel_clamp_rule_frac_bins_differing": clamp["frac_bins_differing"],
    }


def _speech_clip() -> np.ndarray:
    pcm, rate = read_audio(ASSET)  # the bundled espeak-ng clip: real speech with pauses
    assert rate == 16000
    return pcm[:, 0]


def bench_video(ck, seconds: float, size: tuple[int, int], fps_in: float = 30.0) -> dict:
    frames = list(synthetic_frames(int(seconds * fps_in), *size, fps=fps_in, seed=0))
    stream = VideoStream.from_checkpoint(ck, fps=2.0)
    t = time.perf_counter()
    patches = [p for f, ts in frames for p in stream.push_frame(f, ts)] + stream.finish()
    elapsed = time.perf_counter() - t
    got = torch.cat([p.embeds for p in patches])
    # offline: the same model-rate frames, patchified as one video, through the tower at once
    res = FrameResampler(2.0)
    chosen = [fr for f, ts in frames for fr, _ in res.push(f, ts)]
    hw = target_size(*size, ck.vision)
    pix = torch.stack([preprocess_frame(f, hw, ck.vision) for f in chosen])  # (T, 3, h, w)
    if len(pix) % 2:
        pix = torch.cat([pix, pix[-1:]])
    rows = torch.cat([flatten_patches(pix[i : i + 2], ck.vision) for i in range(0, len(pix), 2)])
    grid = torch.tensor([[len(pix) // 2, hw[0] // 14, hw[1] // 14]])
    visual = ck.thinker.model.visual
    with torch.inference_mode():
        ref = visual(rows.to(visual.dtype), grid_thw=grid).pooler_output
    return {
        "video_max_abs_diff": float((got.float() - ref.float()).abs().max()),
        "video_patches": len(patches),
        "video_rtf": elapsed / seconds,
    }


def bench_tmrope(ck, cases: int, rnd: random.Random) -> dict:
    thinker = ck.thinker
    rope = TMRoPE.from_config(thinker.config)
    mismatches = 0
    for _ in range(cases):
        av = rnd.random() < 0.5
        segs, mels = [], []
        for _ in range(rnd.randint(1, 6)):
            kind = rnd.choice(["text", "audio", "image", "video"])
            side = lambda: rnd.choice([2, 4, 6, 8])  # noqa: E731
            if kind == "text":
                segs.append(Text([rnd.randrange(300) for _ in range(rnd.randint(1, 20))]))
            elif kind == "audio":
                mels.append(rnd.randint(3, 900))
                segs.append(Audio(audio_block_tokens(mels[-1])))
            elif kind == "image":
                segs.append(Image((1, side(), side())))
            else:
                grid, spg = (rnd.randint(1, 6), side(), side()), rnd.choice([0.5, 1.0, 2.0])
                if av:
                    mels.append(rnd.randint(3, 900))
                    segs.append(AudioVideo(grid, spg, audio_block_tokens(mels[-1])))
                else:
                    segs.append(Video(grid, spg))
        ids, pos = rope.fresh().build(segs)
        ref, _ = get_rope_index_whole(thinker, ids, segs, mels, av)
        mismatches += int(not torch.equal(ref, pos))
    return {"tmrope_cases": cases, "tmrope_mismatches": mismatches}


def bench_prefill(ck, seconds: float) -> dict:
    """A whole chat turn (system prompt, audio-in-video, text) streamed through OmniChat vs one
    offline Thinker forward over the same features."""
    from omnistream.chat import SYSTEM_PROMPT, OmniChat

    tok = ck.tokenizer
    pcm = speech_like(seconds, seed=2)
    frames = list(synthetic_frames(int(seconds * 10), 84, 112, fps=10.0, seed=3))
    chat = OmniChat(ck)
    chat.begin_turn(audio=True, video=True)
    a = v = 0
    while a < len(pcm) or v < len(frames):  # interleave 40 ms pieces and frames by time
        if v >= len(frames) or (a < len(pcm) and a / 16000 <= frames[v][1]):
            chat.push_audio(pcm[a : a + 640])
            a += 640
        else:
            chat.push_frame(*frames[v])
            v += 1
    chat.end_turn("What is going on?")
    got = chat.thinker.next_token_logits()

    lm = StreamingLogMel(ck.feature_extractor)
    mel = torch.cat([lm.push(pcm), lm.finish()], dim=1)  # (128, T)
    res = FrameResampler(2.0)
    chosen = [fr for f, ts in frames for fr, _ in res.push(f, ts)]
    hw = target_size(84, 112, ck.vision)
    pix = torch.stack([preprocess_frame(f, hw, ck.vision) for f in chosen])
    if len(pix) % 2:
        pix = torch.cat([pix, pix[-1:]])
    rows = torch.cat([flatten_patches(pix[i : i + 2], ck.vision) for i in range(0, len(pix), 2)])
    grid = (len(pix) // 2, hw[0] // 14, hw[1] // 14)
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    av_ids = segment_token_ids(ck.thinker.config, [AudioVideo(grid, 1.0, audio_block_tokens(mel.shape[1]))])
    ids = (enc(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n") + enc("<|im_start|>user\n") + av_ids
           + enc("What is going on?<|im_end|>\n<|im_start|>assistant\n"))
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        ref = ck.thinker(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False,
            input_features=mel[None], feature_attention_mask=torch.ones(1, mel.shape[1], dtype=torch.long),
            pixel_values_videos=rows, video_grid_thw=torch.tensor([grid]),
            video_second_per_grid=torch.tensor([1.0]), use_audio_in_video=True,
        ).logits[0, -1]
    return {
        "prefill_max_logit_diff": float((got.float() - ref.float()).abs().max()),
        "prefill_tokens": len(ids),
        "end_of_turn_to_prompt_ready_s": chat.stats.end_of_input_s,
        "streaming_turn_rtf": (chat.stats.encode_s + chat.stats.prefill_s) / seconds,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--model", default=".cache/tiny-omni", help="checkpoint (tiny one written if missing)")
    p.add_argument("--seconds", type=float, default=10.0, help="media length per measurement")
    p.add_argument("--tmrope-cases", type=int, default=200, help="random prompts for the TMRoPE check")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rnd = random.Random(args.seed)
    if args.model == ".cache/tiny-omni" and not Path(args.model, "config.json").exists():
        make_tiny(args.model)
    ck = load_omni(args.model, talker=False)
    out = {"model": args.model, "seconds": args.seconds, "threads": torch.get_num_threads()}
    out |= bench_audio(ck, args.seconds, rnd)
    out |= bench_video(ck, args.seconds, (224, 224))
    out |= bench_tmrope(ck, args.tmrope_cases, rnd)
    out |= bench_prefill(ck, min(args.seconds, 6.0))
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
