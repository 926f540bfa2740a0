"""``omnistream serve`` figures, measured over real WebSockets against a server in this process.

    python benchmarks/serve.py --json                       # tiny checkpoint, in-process pipeline
    python benchmarks/serve.py --json --layout all-in-one   # the ZeroMQ stage runtime
    python benchmarks/serve.py --json --model DIR           # a real checkpoint

- ``zmq_hop_us``: median overhead of one ZeroMQ stage hop for a 40 ms audio chunk, from
  ``benchmarks/zmq_hop.py`` (the stage runtime's benchmark); null where it is missing.
- ``end_of_speech_to_first_audio_s``: median over a few voice turns of the time from the last
  speech sample leaving the client (audio is streamed at real-time pace in 40 ms appends, as a
  microphone would) to the first reply audio delta arriving. It includes server VAD's
  ``silence_duration_ms`` (reported beside it) -- that is what a user waits;
  ``speech_stopped_to_first_audio_s`` is the part after the server decided the turn was over.

How many sessions one server holds in real time is ``benchmarks/capacity.py``'s ramp (one
implementation of that figure).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from websockets.asyncio.client import connect

from omnistream.apps.server import ServerConfig, serving
from omnistream.runtime.client import SessionOptions

RATE = 24000


def zmq_hop_us() -> float | None:
    """The stage runtime's own hop benchmark, if it is there."""
    here = Path(__file__).resolve().parent
    if not (here / "zmq_hop.py").exists():
        return None
    sys.path.insert(0, str(here))
    try:
        from zmq_hop import hop_us

        return float(hop_us())
    except Exception as e:  # noqa: BLE001 -- its API may differ or its sockets fail: no figure then
        print(f"zmq_hop_us: benchmarks/zmq_hop.py failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def hello_24k() -> np.ndarray:
    from omnistream.encoders.audio import PolyphaseResampler
    from omnistream.encoders.media import read_audio

    pcm, rate = read_audio(Path(__file__).resolve().parents[1] / "omnistream/assets/hello.flac")
    r = PolyphaseResampler(rate, RATE)
    x = np.concatenate([r.push(pcm.mean(axis=1)), r.flush()])
    return np.round(np.clip(x, -1, 1) * 32767).astype("<i2")


def speech_end(pcm: np.ndarray, floor: float = 0.01) -> int:
    """Index after the clip's last sample above ``floor`` of full scale (its trailing silence cut)."""
    loud = np.nonzero(np.abs(pcm.astype(np.float32)) > floor * 32767)[0]
    return int(loud[-1]) + 1 if len(loud) else len(pcm)


async def _recv(ws) -> dict:
    ev = json.loads(await ws.recv())
    ev["_t"] = time.perf_counter()
    return ev


async def voice_turns(url: str, speech: np.ndarray, turns: int) -> dict:
    """Real-time-paced speech turns on one session with server VAD; latencies per turn."""
    end = speech_end(speech)
    clip = np.concatenate([np.zeros(RATE // 2, "<i2"), speech[:end], np.zeros(RATE * 3 // 2, "<i2")])
    speech_done_at = RATE // 2 + end  # sample index where speech ends in `clip`
    eos, vad = [], []
    async with connect(url, max_size=None) as ws:
        created = await _recv(ws)
        silence_ms = created["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"]
        for _ in range(turns):
            marks: dict = {}

            async def send(marks: dict):
                t0 = time.perf_counter()
                for i in range(0, len(clip), 960):  # 40 ms appends, paced like a microphone
                    await asyncio.sleep(max(0.0, t0 + i / RATE - time.perf_counter()))
                    piece = clip[i:i + 960]
                    await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(piece.tobytes()).decode()}))
                    if i <= speech_done_at < i + 960:
                        marks["eos"] = time.perf_counter()

            sender = asyncio.create_task(send(marks))
            while True:
                ev = await _recv(ws)
                if ev["type"] == "input_audio_buffer.speech_stopped":
                    marks["stopped"] = ev["_t"]
                elif ev["type"] in ("response.output_audio.delta", "response.audio.delta") and "audio" not in marks:
                    marks["audio"] = ev["_t"]
                elif ev["type"] == "response.done":
                    break
                elif ev["type"] == "error":
                    raise RuntimeError(ev["error"])
            await sender
            eos.append(marks["audio"] - marks["eos"])
            vad.append(marks["audio"] - marks["stopped"])
    return {"end_of_speech_to_first_audio_s": round(statistics.median(eos), 3),
            "speech_stopped_to_first_audio_s": round(statistics.median(vad), 3),
            "turns_s": [round(x, 3) for x in eos], "vad_silence_duration_ms": silence_ms}


def build_client(args):
    if args.layout:
        from omnistream.runtime.procclient import MultiProcClient

        return MultiProcClient(args.model, layout=args.layout)
    from omnistream.checkpoints import load_omni
    from omnistream.runtime.inproc import InProcClient, engine_options

    return InProcClient(load_omni(args.model), **engine_options("cpu"))  # as serve


async def main_async(args) -> dict:
    speech = hello_24k()
    out = {"model": str(args.model), "layout": args.layout or "in-process", "zmq_hop_us": zmq_hop_us()}
    cfg = ServerConfig(port=0, rate_limit=0,
                       defaults=SessionOptions(max_new_tokens=args.max_new_tokens, max_speech_s=args.speech_s))
    async with serving(build_client(args), cfg) as server:
        out.update(await voice_turns(f"ws://127.0.0.1:{server.port}/v1/realtime", speech, args.turns))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one written to a temp dir)")
    p.add_argument("--layout", help="all-in-one | split | FILE.yaml: the ZeroMQ stage runtime (default in-process)")
    p.add_argument("--turns", type=int, default=3, help="voice turns for the latency median (default 3)")
    p.add_argument("--speech-s", type=float, default=3.0, help="reply speech, seconds (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="reply text tokens (default 24)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    import torch

    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from omnistream.random_checkpoints import make_tiny

            args.model = str(make_tiny(Path(tmp) / "tiny"))
        out = asyncio.run(main_async(args))
    if args.model.startswith(tempfile.gettempdir()):
        out["model"] = "tiny (random weights)"
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
