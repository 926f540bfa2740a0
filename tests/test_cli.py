"""The `omnistream` command as a user runs it: real subprocesses, the tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "omnistream" / "assets" / "hello.flac"


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
