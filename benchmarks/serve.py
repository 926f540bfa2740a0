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
- ``max_realtime_sessions``: N sessions ask for a spoken reply at the same moment, for N = 1, 2,
  ... The N passes if every session's audio stays ahead of real-time playback: delta k arrives by
  ``t_request + first_audio_budget_s + (samples before k) / 24000`` (a player that started after
  the budget never runs dry). The largest passing N before the first failing one is reported,
  with every N's worst lateness.
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


async def one_reply(url: str, budget_s: float, start: asyncio.Event) -> dict:
    """One session asks for a spoken reply when ``start`` fires; how late did its audio run?"""
    async with connect(url, max_size=None) as ws:
        await _recv(ws)
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}}))
        while (await _recv(ws))["type"] != "conversation.item.created":
            pass
        await start.wait()
        t_req = time.perf_counter()
        await ws.send(json.dumps({"type": "response.create"}))
        samples, worst, first = 0, -1e9, None
        while True:
            ev = await _recv(ws)
            if ev["type"] in ("response.output_audio.delta", "response.audio.delta"):
                first = first if first is not None else ev["_t"] - t_req
                worst = max(worst, ev["_t"] - (t_req + budget_s + samples / RATE))
                samples += len(base64.b64decode(ev["delta"])) // 2
            elif ev["type"] == "response.done":
                break
            elif ev["type"] == "error":
                raise RuntimeError(ev["error"])
    return {"first_audio_s": first, "worst_lateness_s": worst, "audio_s": samples / RATE}


async def ramp(url: str, max_n: int, budget_s: float) -> tuple[int, list]:
    best, rows = 0, []
    for n in range(1, max_n + 1):
        start = asyncio.Event()
        tasks = [asyncio.create_task(one_reply(url, budget_s, start)) for _ in range(n)]
        await asyncio.sleep(0.5)  # all sessions open and their turn committed
        start.set()
        res = await asyncio.gather(*tasks)
        ok = all(r["audio_s"] > 0 and r["worst_lateness_s"] <= 0 for r in res)
        rows.append({"sessions": n, "realtime": ok,
                     "worst_lateness_s": round(max(r["worst_lateness_s"] for r in res), 3),
                     "first_audio_s_max": round(max(r["first_audio_s"] or 0 for r in res), 3),
                     "audio_s_min": round(min(r["audio_s"] for r in res), 2)})
        if not ok:
            break
        best = n
    return best, rows


def build_client(args, max_sessions: int):
    if args.layout:
        from omnistream.runtime.procclient import MultiProcClient

        return MultiProcClient(args.model, layout=args.layout, max_sessions=max_sessions)
    from omnistream.checkpoints import load_omni
    from omnistream.runtime.client import InProcClient

    return InProcClient(load_omni(args.model), max_sessions=max_sessions)


async def main_async(args) -> dict:
    speech = hello_24k()
    out = {"model": str(args.model), "layout": args.layout or "in-process", "zmq_hop_us": zmq_hop_us()}
    cfg = ServerConfig(port=0, max_sessions=args.max_sessions + 1, rate_limit=0,
                       defaults=SessionOptions(max_new_tokens=args.max_new_tokens, max_speech_s=args.speech_s))
    async with serving(build_client(args, args.max_sessions + 1), cfg) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        out.update(await voice_turns(url, speech, args.turns))
        best, rows = await ramp(url, args.max_sessions, args.first_audio_budget_s)
    out.update({"max_realtime_sessions": best, "first_audio_budget_s": args.first_audio_budget_s,
                "reply_speech_s": args.speech_s, "ramp": rows})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one written to a temp dir)")
    p.add_argument("--layout", help="all-in-one | split | FILE.yaml: the ZeroMQ stage runtime (default in-process)")
    p.add_argument("--turns", type=int, default=3, help="voice turns for the latency median (default 3)")
    p.add_argument("--max-sessions", type=int, default=8, help="ramp up to this many sessions (default 8)")
    p.add_argument("--speech-s", type=float, default=3.0, help="reply speech per session, seconds (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="reply text tokens (default 24)")
    p.add_argument("--first-audio-budget-s", type=float, default=1.5,
                   help="startup latency a session may take before its audio must keep real time (default 1.5)")
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
