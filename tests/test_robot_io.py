"""Robot inputs and outputs: the PyAV camera (latest-only, max age, reconnect with back-off) and the
sounddevice / file: audio endpoints (no audio device needed)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from omnistream.encoders.media import write_video
from omnistream.robot.cameras import AvCamera, parse_source


def _video(path, n=15, fps=30):
    frames = [np.full((48, 64, 3), (8 * i) % 256, np.uint8) for i in range(n)]
    return write_video(path, frames, fps=fps)


def _wait(pred, timeout_s, what):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_parse_source():
    assert parse_source("/dev/video2") == ("/dev/video2", "v4l2", {})
    assert parse_source("v4l2:/dev/video0")[1] == "v4l2"
    assert parse_source("rtsp://cam/stream")[2]["rtsp_transport"] == "tcp"
    assert parse_source("file:/tmp/a.mp4") == ("/tmp/a.mp4", None, {})


@pytest.mark.timeout(60)
def test_av_camera_file_latest_only_and_max_age(tmp_path):
    path = _video(tmp_path / "cam.mp4", n=30)  # 1 s at 30 fps, replayed in real time
    cam = AvCamera(str(path), backoff_s=0.2)
    cam.connect()
    try:
        rgb, t = _wait(lambda: cam.read_latest(max_age_s=0.5), 20, "a frame")
        assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
        assert time.monotonic() - t <= 0.5
        assert cam.read_latest(max_age_s=0.5) is not None
        time.sleep(0.3)  # frames keep coming while nobody reads: only the newest is kept
        assert cam.overwritten > 0
    finally:
        cam.disconnect()


@pytest.mark.timeout(60)
def test_av_camera_lost_and_restored_with_backoff(tmp_path):
    """A missing source (camera unplugged): no crash, no frames, growing back-off; it appears: frames."""
    path = tmp_path / "later.mp4"
    cam = AvCamera(f"file:{path}", backoff_s=0.05, max_backoff_s=0.4)
    cam.connect()
    try:
        _wait(lambda: cam.reconnects >= 4, 20, "reconnect attempts")
        assert cam.read_latest(max_age_s=1.0) is None
        assert cam.backoffs[:4] == [0.05, 0.1, 0.2, 0.4] and max(cam.backoffs) <= 0.4
        assert "No such file" in cam.last_error or "FileNotFound" in cam.last_error
        _video(tmp_path / "tmp.mp4", n=60).rename(path)  # plugged back in
        _wait(lambda: cam.read_latest(max_age_s=0.5), 20, "frames after the source came back")
        # the end of the file is a lost stream too: the reader reconnects and the frames continue
        n = cam.reconnects
        _wait(lambda: cam.reconnects > n and cam.read_latest(max_age_s=0.5), 20, "a replay after the end")
        assert cam.backoffs[-1] == 0.05  # good frames reset the back-off
    finally:
        cam.disconnect()


# ---------------------------------------------------------------------------------------------- audio
ASSET = __import__("pathlib").Path(__file__).resolve().parents[1] / "omnistream" / "assets" / "hello.flac"
DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "max_input_channels": 2, "max_output_channels": 2},
    {"index": 1, "name": "ReSpeaker 4 Mic Array (UAC1.0) (hw:1,0)", "max_input_channels": 6, "max_output_channels": 0},
    {"index": 2, "name": "HDMI 0 (hw:0,3)", "max_input_channels": 0, "max_output_channels": 8},
]


def test_resolve_device_by_name_or_index_and_clear_errors():
    from omnistream.robot.audio_io import AudioDeviceError, resolve_device

    assert resolve_device("respeaker", "input", DEVICES) == 1
    assert resolve_device(2, "output", DEVICES) == 2
    assert resolve_device("0", "input", DEVICES) == 0
    with pytest.raises(AudioDeviceError) as e:
        resolve_device("USB Mic", "input", DEVICES)
    msg = str(e.value)
    assert "'USB Mic' not found" in msg and "[1] ReSpeaker 4 Mic Array" in msg and "[0] HDA Intel" in msg
    assert "HDMI" not in msg  # an output-only device is no microphone
    with pytest.raises(AudioDeviceError, match="matches several"):
        resolve_device("hw:", "output", DEVICES)
    with pytest.raises(AudioDeviceError, match="'HDMI 0' not found"):
        resolve_device("HDMI 0", "input", DEVICES)


def _portaudio_present() -> bool:
    try:
        import sounddevice  # noqa: F401 - raises OSError when the PortAudio library is missing
    except OSError:
        return False
    return True


def test_missing_real_device_lists_what_portaudio_sees():
    """Through the real sounddevice/PortAudio (CI has no sound card: the list is empty, and says so; a
    machine without the PortAudio library gets the package to install instead)."""
    from omnistream.robot.audio_io import AudioDeviceError, describe_devices, list_devices, open_sink, open_source

    if not _portaudio_present():
        for opener, spec in ((open_source, "no such microphone 12345"), (open_sink, "no such speaker 12345")):
            with pytest.raises(AudioDeviceError, match="install libportaudio2"):
                opener(spec)
        return
    present = list_devices()
    with pytest.raises(AudioDeviceError) as e:
        open_source("no such microphone 12345")
    assert "no such microphone 12345" in str(e.value)
    if not present:
        assert "no audio devices at all" in str(e.value)
    else:
        assert describe_devices([d for d in present if d["max_input_channels"] > 0])[:20] in str(e.value)
    with pytest.raises(AudioDeviceError, match="output audio device"):
        open_sink("no such speaker 12345")


NO_PORTAUDIO = """
import json, sys, numpy as np
import omnistream.robot.devices, omnistream.robot.talk, omnistream.robot.audio_io as aio, omnistream.apps.robot
from omnistream.robot import agent_stage, bridge, cameras, config, interfaces, sim_robot, zmq_robot  # noqa
src = aio.open_source("file:" + sys.argv[1], realtime=False)
sink = aio.open_sink("file:" + sys.argv[2], rate=src.rate)
while (b := src.read()) is not None:
    sink.write(b)
sink.close()
try:
    aio.open_source("ReSpeaker")
    err = None
except aio.AudioDeviceError as e:
    err = str(e)
print(json.dumps({"sounddevice_loaded": "sounddevice" in sys.modules, "err": err, "samples": sink.samples}))
"""


def test_no_portaudio_robot_imports_and_file_endpoints_work(tmp_path):
    """A machine without libportaudio2 (sounddevice raises OSError at import, as it does there): the robot
    package imports, file: endpoints work, and a real device is a one-line error naming the package."""
    import json
    import os
    import subprocess
    import sys

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ASSET.parents[2])])}
    p = subprocess.run([sys.executable, "-c", NO_PORTAUDIO, str(ASSET), str(tmp_path / "out.wav")], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert not got["sounddevice_loaded"] and got["samples"] > 0
    assert "PortAudio library not found" in got["err"] and "install libportaudio2" in got["err"]
    assert "\n" not in got["err"]


def test_robot_import_graph_is_acyclic():
    """Layers point one way: no module of omnistream.robot (or the robot app) imports itself back, not even
    through a function-level import (factories sit above the implementations they choose between)."""
    import ast

    root = ASSET.parents[1]
    files = {f"omnistream.robot.{p.stem}": p for p in (root / "robot").glob("*.py")}
    files |= {f"omnistream.apps.{p.stem}": p for p in (root / "apps").glob("robot*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[mod] = sorted(d for d in deps if d in files and d != mod)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert "omnistream.robot.cameras" in graph["omnistream.robot.zmq_robot"]  # the graph is real


def test_file_source_and_sink_round_trip(tmp_path):
    from omnistream.encoders.media import read_audio
    from omnistream.robot.audio_io import open_sink, open_source

    src = open_source(f"file:{ASSET}", block_s=0.04, realtime=False)
    ref, rate = read_audio(ASSET)
    assert src.rate == rate
    blocks = []
    while (b := src.read()) is not None:
        blocks.append(b)
    assert all(len(b) == round(0.04 * rate) for b in blocks[:-1])
    got = np.concatenate(blocks)
    np.testing.assert_allclose(got, ref.mean(axis=1), atol=1e-7)
    sink = open_sink(f"file:{tmp_path / 'out.wav'}", rate=rate)
    for b in blocks:
        sink.write(b)
    sink.close()
    back, r2 = read_audio(tmp_path / "out.wav")
    assert r2 == rate and back.shape[0] == got.shape[0]
    np.testing.assert_allclose(back[:, 0], np.clip(got, -1, 1), atol=1.5 / 32767)


def test_energy_turns():
    from omnistream.robot.talk import EnergyTurns

    t = EnergyTurns(threshold=0.01, silence_s=0.19, min_speech_s=0.1)
    loud, quiet = np.full(400, 0.1, np.float32), np.zeros(400, np.float32)  # 25 ms blocks at 16 kHz
    ends = [t.feed(quiet, 16000) for _ in range(20)]  # silence alone never ends a turn
    ends += [t.feed(loud, 16000) for _ in range(8)]  # 200 ms of speech
    ends += [t.feed(quiet, 16000) for _ in range(8)]  # 200 ms of silence: the end
    assert ends.index(True) == 20 + 8 + 7 and sum(ends) == 1
