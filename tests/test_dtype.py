"""bf16 on CPU: the tiny path runs end to end in bf16, and its reply equals fp32's where greedy agrees.

Oracle: the same chat turn (speech + video + text) in fp32. Where the two contexts are still equal,
bf16's logits may differ from fp32's by rounding only; a greedy choice can flip only where fp32's
top-2 margin is below twice that difference. So the bf16 reply must equal fp32's token for token up
to the first step whose fp32 margin is that small (measured on the tiny checkpoint: max |logit
difference| 0.036-0.057 on logits of scale 3-4, i.e. <= 2% of the scale; the first flip came at a
margin of 0.002).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnistream.checkpoints import load_omni

CLIP = Path(__file__).resolve().parents[1] / "omnistream" / "assets" / "hello.flac"
REL_TOL = 0.05  # bf16 vs fp32 logit difference, relative to the logits' scale (measured <= 0.02)


def _turn(ck, n_tokens: int):
    """(reply tokens, logits before each token) of one greedy chat turn with speech, video and text."""
    from omnistream.chat import OmniChat
    from omnistream.encoders.media import read_audio
    from omnistream.encoders.vision import synthetic_frames

    chat = OmniChat(ck)
    pcm, rate = read_audio(CLIP)
    chat.begin_turn(audio=True, video=True)
    chat.push_audio(pcm, rate)
    for frame, t in synthetic_frames(12, 84, 112, fps=4):
        chat.push_frame(frame, t)
    chat.end_turn("What do you see?")
    reply = chat.conv.begin_reply(n_tokens, 0.0, 0)
    logits, tokens = [chat.thinker.next_token_logits().float().clone()], []
    for step, _ in chat.conv.decode(reply):
        tokens.append(step.token)
        logits.append(chat.thinker.next_token_logits().float().clone())
    return tokens, logits


def test_bf16_chat_equals_fp32_where_greedy_choices_agree(tiny_dir):
    ref_ck = load_omni(tiny_dir, talker=False, dtype="fp32")
    ck = load_omni(tiny_dir, talker=False, dtype="bf16")
    assert {p.dtype for p in ck.thinker.parameters()} == {torch.bfloat16}
    ref, ref_logits = _turn(ref_ck, 16)
    got, got_logits = _turn(ck, 16)
    assert got, "bf16 produced no reply"
    for k, (a, b) in enumerate(zip(ref, got)):
        diff = (ref_logits[k] - got_logits[k]).abs().max().item()  # same context so far
        scale = ref_logits[k].abs().max().item()
        assert diff <= REL_TOL * scale, f"step {k}: logits differ by {diff:.3f} (scale {scale:.2f})"
        top2 = ref_logits[k].topk(2).values
        margin = (top2[0] - top2[1]).item()
        if a != b:  # allowed only where rounding can flip the choice; the contexts differ afterwards
            assert margin <= 2 * diff, f"step {k}: bf16 chose {b}, fp32 {a} by a clear margin {margin:.3f}"
            break


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16"])
def test_cli_chat_runs_in_bf16_on_cpu(tiny_dir, dtype):
    """`chat --device cpu --dtype bf16` runs its tiny path (speech in, text out) with bf16 weights."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "omnistream", "chat", "--model", str(tiny_dir), "--audio", str(CLIP),
                        "--text", "hi", "--max-new-tokens", "4", "--device", "cpu", "--dtype", dtype],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "assistant:" in r.stdout
    assert "torch.bfloat16" in r.stderr  # load_omni's log line names the dtype it loaded in
