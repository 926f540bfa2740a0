"""First-packet latency of streamed speech vs transformers' offline Thinker -> Talker -> Token2Wav.

    python benchmarks/first_packet.py --json                              # tiny checkpoint
    python benchmarks/first_packet.py --json --model DIR --device cuda    # a real checkpoint
    python benchmarks/first_packet.py --json --model 7b --device cuda --dtype bf16 --force-length --no-offline
                                      # the published 7B shape with random weights (config-only, no download)

One text turn is answered twice in the same run: by omnistream's streaming path (OmniChat with a
voice: the Talker one step behind the text, Token2Wav chunk by chunk) and by transformers'
``Qwen2_5OmniForConditionalGeneration.generate`` (each stage to the end). Both decode greedily,
so the codec tokens can be compared; the waveform is compared with an offline Token2Wav decode of
the same codes and the same initial noise (mel and waveform SNR), for our chunking and for the
chunking of Qwen's own streaming code.

``--force-length`` makes every reply as long as configured: random weights would otherwise end
the text or the speech at an arbitrary early step (a stop token), and the timings would measure
that accident. The Thinker's stop tokens and the Talker's non-speech codes get -inf logits (a
forward hook on the output heads), so both decoders run ``--text-tokens`` / ``--seconds`` in full.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# benchmarks/kernels.py would shadow the optional `kernels` package transformers probes for: drop this dir
sys.path = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from omnistream.chat import SYSTEM_PROMPT, OmniChat  # noqa: E402
from omnistream.checkpoints import check_device, force_length, load_omni  # noqa: E402
from omnistream.model.talker import TalkerConfig  # noqa: E402
from omnistream.model.token2wav import (  # noqa: E402
    DEFAULT,
    QWEN_REFERENCE,
    SAMPLE_RATE,
    StreamingToken2Wav,
    decode_offline,
    decode_stream,
    mel_snr_db,
    wave_snr_db,
)
from omnistream.random_checkpoints import SHAPES, make_tiny  # noqa: E402

QUESTION = "Tell me about the red sofa by the window."


def offline(ck, text_tokens: int, codes: int, voice: str, seed: int) -> dict:
    """transformers' path on the same prompt; returns its time and the Talker's codes (spied)."""
    tok = ck.tokenizer
    prompt = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids], device=ck.thinker.device)
    seen = {}
    real_generate = ck.talker.generate

    def spy(*a, **kw):
        out = real_generate(*a, **kw)
        seen["codes"] = out[0, kw["input_ids"].shape[1]:].tolist()
        return out

    ck.talker.generate = spy
    try:
        torch.manual_seed(seed)
        t = time.perf_counter()
        _, wav = ck.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), speaker=voice, thinker_max_new_tokens=text_tokens,
            thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=codes,
        )
        total = time.perf_counter() - t
    finally:
        ck.talker.generate = real_generate
    eos = {ck.talker.codec_eos_token, ck.talker.codec_pad_token}
    c = seen["codes"]
    c = c[: next((i for i, x in enumerate(c) if x in eos), len(c))]
    return {"offline_total_s": total, "offline_audio_s": wav.numel() / SAMPLE_RATE, "codes": c}


def streaming(ck, text_tokens: int, codes: int, voice: str, seed: int) -> tuple[dict, OmniChat, np.ndarray]:
    # hf_dropped_mask: follow the installed transformers' generate, so the codes can be compared
    cfg = TalkerConfig(do_sample=False, max_new_tokens=codes, hf_dropped_mask=True)
    chat = OmniChat(ck, voice=voice, talker_config=cfg, token2wav=DEFAULT)
    chat.say(QUESTION)
    pcm = [ev.pcm for ev in chat.reply(max_new_tokens=text_tokens, seed=seed) if ev.kind == "audio"]
    s = chat.stats
    return ({"ttft_s": s.ttft_s, "first_audio_s": s.first_audio_s, "stream_total_s": s.decode_s,
             "audio_s": s.audio_out_s, "rtf": s.rtf, "reply_tokens": s.reply_tokens,
             "codec_tokens": s.codec_tokens},
            chat, np.concatenate(pcm))


def floor(ck, chat: OmniChat, seed: int) -> dict:
    """The physical floor of first-packet latency for this architecture, from parts measured alone:
    the Thinker's first token, then one (Thinker + Talker) step per code of the first DiT chunk and
    its look-ahead (the Talker runs one step behind the text), then one DiT window and one vocoder
    span. The streamed first packet pays these plus scheduling overhead."""
    n = DEFAULT.first_packet_codes
    gaps = np.diff(chat.stats.code_times)
    step = float(np.median(gaps)) if len(gaps) else 0.0  # median: excludes Token2Wav chunk stalls
    v = ck.voices[chat.voice]
    t2w = StreamingToken2Wav.from_config(ck.token2wav, v["cond"], v["ref_mel"], DEFAULT, seed=seed)
    t = time.perf_counter()
    assert t2w.push(chat.reply_codes[:n])  # exactly the work that yields the first PCM chunk
    first_chunk = time.perf_counter() - t  # one DiT window + one vocoder span
    s = chat.stats
    fl = s.ttft_s + n * step + first_chunk
    return {"code_step_s": step, "first_chunk_token2wav_s": first_chunk, "first_audio_floor_s": fl,
            "first_audio_over_floor": s.first_audio_s / fl if fl else float("nan")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--model", default=".cache/tiny-omni", help="checkpoint (the tiny one is written if missing), "
                   "or 3b / 7b: the published shape with random weights, written config-only to a temp dir")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU (Token2Wav runs in fp32 either way)")
    p.add_argument("--force-length", action="store_true",
                   help="suppress stop tokens and end codes: replies run to --text-tokens / --seconds")
    p.add_argument("--no-offline", action="store_true",
                   help="skip transformers' offline generate and the SNR comparisons (first-packet timing only)")
    p.add_argument("--voice", default="Chelsie")
    p.add_argument("--seconds", type=float, default=10.0, help="reply length in seconds of speech (default 10)")
    p.add_argument("--text-tokens", type=int, default=40, help="Thinker reply length limit (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-up", action="store_true",
                   help="answer once, untimed, before the timed reply: what is made at first use (CUDA kernels and "
                   "autotuning, cuBLAS handles, CUDA graphs with OMNISTREAM_CUDA_GRAPHS=1) is paid once by a server")
    args = p.parse_args()
    try:
        check_device(args.device)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        p.error(str(e))
    torch.set_flush_denormal(True)  # as the CLI does: denormals make CPU runs erratic
    model = args.model
    if model in SHAPES[1:]:  # "3b" / "7b": config-only, materialised on the device by load_omni
        import tempfile

        model = str(make_tiny(Path(tempfile.mkdtemp(prefix=f"omni-{model}-")), shape=model))
    elif model == ".cache/tiny-omni" and not Path(model, "config.json").exists():
        make_tiny(model)
    t = time.perf_counter()
    ck = load_omni(model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t
    if args.force_length:
        force_length(ck)
    codes = int(args.seconds * SAMPLE_RATE / 480)  # 50 codec tokens per second

    out = {"model": args.model, "device": args.device, "dtype": str(next(ck.thinker.parameters()).dtype),
           "load_s": load_s, "force_length": args.force_length, "threads": torch.get_num_threads(),
           "warm_up": args.warm_up}
    if args.warm_up:
        t = time.perf_counter()
        streaming(ck, args.text_tokens, codes, args.voice, args.seed)
        out["warm_up_s"] = time.perf_counter() - t
    st, chat, pcm = streaming(ck, args.text_tokens, codes, args.voice, args.seed)
    out |= st
    if args.device.startswith("cuda"):
        out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.no_offline:
        out |= floor(ck, chat, args.seed)
        print(json.dumps(out, indent=None if args.json else 2))
        return 0
    off = offline(ck, args.text_tokens, codes, args.voice, args.seed)
    out["offline_total_s"] = off["offline_total_s"]
    out["first_packet_ratio"] = st["first_audio_s"] / off["offline_total_s"]
    out["codes_equal"] = chat.reply_codes == off["codes"]

    v = ck.voices[args.voice]
    ref = decode_offline(ck.token2wav, chat.reply_codes, v["cond"], v["ref_mel"], seed=args.seed)
    qwen = decode_stream(ck.token2wav, chat.reply_codes, v["cond"], v["ref_mel"], QWEN_REFERENCE, seed=args.seed)
    out["mel_snr_db"] = mel_snr_db(ref.mel, chat._t2w.mel)
    out["wave_snr_db"] = wave_snr_db(ref.pcm, pcm)
    out["mel_snr_db_reference_scheme"] = mel_snr_db(ref.mel, qwen.mel)
    out["wave_snr_db_reference_scheme"] = wave_snr_db(ref.pcm, qwen.pcm)
    out["first_packet_codes"] = DEFAULT.first_packet_codes
    out["first_packet_codes_reference_scheme"] = QWEN_REFERENCE.first_packet_codes
    out |= floor(ck, chat, args.seed)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
