"""The `omnistream` command as a user runs it: real subprocesses, the tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "omnistream" / "assets" / "hello.flac"
pytestmark = pytest.mark.process  # every test here runs the command as a subprocess (or loads for it)


def omni(*args, timeout=180):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "omnistream", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.mark.parametrize("sub", [[], ["make-tiny"], ["chat"], ["demo"]])
def test_every_subcommand_has_help(sub):
    r = omni(*sub, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: omnistream" in r.stdout
    if sub:
        assert len(r.stdout.splitlines()) > 4


def test_chat_streams_a_reply_from_audio_and_video(tiny_dir, tmp_path):
    from omnistream.encoders.media import write_video
    from omnistream.encoders.vision import synthetic_frames

    video = write_video(tmp_path / "v.mp4", (f for f, _ in synthetic_frames(45, 84, 112, fps=15)), fps=15)
    r = omni("chat", "--model", str(tiny_dir), "--audio", str(CLIP), "--video", str(video),
             "--text", "hi", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "assistant:" in r.stdout
    # 3.5 s of speech = 2 audio blocks; 3 s of video at 2 fps = 3 temporal patches
    assert "in 2 blocks" in r.stderr and "in 3 video patches" in r.stderr
    assert "time to first token" in r.stderr


def test_chat_reports_bad_inputs_clearly(tiny_dir, tmp_path):
    r = omni("chat", "--model", str(tmp_path / "nope"), "--text", "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr and "make-tiny" in r.stderr
    assert "Traceback" not in r.stderr
    r = omni("chat", "--model", str(tiny_dir), "--audio", str(tmp_path / "missing.wav"))
    assert r.returncode == 2 and "missing.wav does not exist" in r.stderr
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(os.urandom(3000))
    r = omni("chat", "--model", str(tiny_dir), "--audio", str(garbage))
    assert r.returncode == 2 and "garbage.wav" in r.stderr and "Traceback" not in r.stderr
    r = omni("chat", "--model", str(tiny_dir))
    assert r.returncode == 2 and "--audio" in r.stderr


def test_hub_id_that_is_not_cached_fails_clearly(monkeypatch):
    from omnistream.checkpoints import CheckpointError, load_omni

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no-such-org/no-such-omni"):
        load_omni("no-such-org/no-such-omni", talker=False)


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ck"
    r = omni("make-tiny", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "spk_dict.pt").exists()
    r = omni("make-tiny", str(out), "--if-missing")
    assert r.returncode == 0 and "already holds" in r.stdout


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("args, needles", [
    (["chat", "--max-new-tokens", "-3", "--text", "hi"], ["--max-new-tokens", "'-3'"]),
    (["chat", "--temperature", "-1", "--text", "hi"], ["--temperature", "'-1'"]),
    (["chat", "--window", "3", "--text", "hi"], ["--window", "'3'", "too small", "sinks"]),
    (["chat", "--window", "0.5s", "--text", "hi"], ["--window", "'0.5s'", "too small"]),
    (["serve", "--window", "zz"], ["--window", "'zz'"]),
    (["chat", "--max-speech-s", "0", "--text", "hi"], ["--max-speech-s", "'0'"]),
    (["serve", "--port", "70000"], ["--port", "'70000'"]),
    (["chat", "--dtype", "fp8", "--text", "hi"], ["--dtype", "'fp8'"]),
    (["serve", "--layout", "encoders+thinker@cpu:fp9,talker+token2wav"], ["--layout", "cpu:fp9"]),
    (["make-tiny", "--shape", "13b", "x"], ["--shape", "'13b'"]),
])
def test_bad_arguments_fail_at_parsing_with_one_line(tmp_path, args, needles):
    # --model names no checkpoint: an argument error must come first, before anything is loaded
    if args[0] in ("chat", "serve"):
        args = args[:1] + ["--model", str(tmp_path / "no-model")] + args[1:]
    _one_line_error(omni(*args, timeout=60), *needles)


def test_a_missing_input_file_is_reported_before_the_model_is_touched(tmp_path):
    r = omni("chat", "--model", str(tmp_path / "no-model"), "--audio", str(tmp_path / "missing.wav"), timeout=60)
    _one_line_error(r, "--audio", "missing.wav does not exist")
    r = omni("chat", "--model", str(tmp_path / "no-model"), "--video", str(tmp_path), timeout=60)
    _one_line_error(r, "--video", "is not a file")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_on_a_cpu_machine_is_one_line_naming_the_device(tmp_path):
    r = omni("chat", "--model", str(tmp_path / "no-model"), "--device", "cuda", "--text", "hi", timeout=60)
    _one_line_error(r, "--device", "'cuda'", "not available")
    r = omni("serve", "--model", str(tmp_path / "no-model"), "--layout",
             "encoders+thinker@cuda:0:bf16,talker+token2wav", timeout=60)
    _one_line_error(r, "--layout", "'cuda:0'", "not available", "encoders-thinker")
    r = omni("chat", "--model", str(tmp_path / "no-model"), "--attn", "flash_attention_2", "--text", "hi", timeout=60)
    _one_line_error(r, "--attn", "flash_attention_2", "CUDA")


def test_layout_dtype_per_stage_from_the_spec_and_yaml(tmp_path):
    from omnistream.runtime import layout as L

    lay = L.load("encoders+thinker@cuda:0:bf16,talker+token2wav@cpu")
    assert [(s.device, s.dtype) for s in lay.stages] == [("cuda:0", "bf16"), ("cpu", "auto")]
    assert {s.dtype for s in L.load("split", dtype="fp16").stages} == {"fp16"}  # serve --dtype: the stages' default
    assert [s.dtype for s in L.load("encoders+thinker@cpu:fp32,talker+token2wav", dtype="bf16").stages] == \
        ["fp32", "bf16"]
    f = tmp_path / "l.yaml"
    f.write_text("stages:\n  - {workers: [encoders, thinker], device: cpu, dtype: fp16}\n"
                 "  - {workers: [talker, token2wav]}\n")
    assert [s.dtype for s in L.load(f).stages] == ["fp16", "auto"]
    f.write_text("stages:\n  - {workers: [encoders, thinker, talker, token2wav], dtype: int4}\n")
    with pytest.raises(L.LayoutError, match="bad dtype 'int4'"):
        L.load(f)


def test_make_tiny_7b_shape_writes_config_only(tmp_path):
    out = tmp_path / "ck7"
    r = omni("make-tiny", "--shape", "7b", str(out))
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    assert {"config.json", "random_init.json", "spk_dict.pt", "tokenizer.json", "preprocessor_config.json"} <= names
    assert sum(p.stat().st_size for p in out.iterdir()) < 5e6  # no weights: a few MB of tokenizer and speakers


@pytest.mark.parametrize("sub", ["chat", "serve", "demo"])
def test_model_commands_take_device_dtype_and_attention(sub):
    from omnistream.cli import build_parser, check_model_args

    args = build_parser().parse_args([sub, "--device", "cpu", "--dtype", "bf16", "--attn", "eager"])
    check_model_args(args)  # a valid combination: no exit
    assert (args.device, args.dtype, args.attn) == ("cpu", "bf16", "eager")
    assert build_parser().parse_args([sub]).dtype == "auto"
