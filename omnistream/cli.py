"""The one command-line entry point: `omnistream <subcommand> --help` documents each one."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

DEFAULT_TINY = Path(".cache/tiny-omni")
ASSETS = Path(__file__).parent / "assets"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the bad value and what to do, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------- argument types: checked before any work


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``, else a one-line error naming the value."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{s!r} must be >= {low}")
        return v
    return parse


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)


def _float_at_least(low: float, strict: bool):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"{s!r} must be {'>' if strict else '>='} {low:g}")
        return v
    return parse


_non_negative = _float_at_least(0.0, strict=False)
_positive = _float_at_least(0.0, strict=True)


def _ip_network(s: str) -> str:
    """An argparse type: an IP address or CIDR network (``10.0.0.0/8``)."""
    import ipaddress

    try:
        ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an IP address or CIDR network") from None
    return s


def _port(s: str) -> int:
    v = _non_negative_int(s)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"{s!r} is not a port (0-65535)")
    return v


def _window(spec: str) -> str:
    """``--window``: a token count or seconds of media, big enough for the sinks plus a 2-s audio block.

    Returned unchanged (the conversation core turns it into a WindowConfig); checked here so a typo
    fails before the model loads. A window smaller than one 2-s block (50 tokens) past the attention
    sinks would evict the user's words while they are being read.
    """
    from omnistream.memory.window_config import AUDIO_TOKENS_PER_SECOND, WindowConfig

    if spec.strip() in ("auto", "none"):
        return spec.strip()
    m = re.fullmatch(r"(\d+)|(\d+(?:\.\d*)?|\.\d+)s", spec.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{spec!r}: give auto, none, a token count like 8192 or seconds like 600s")
    sinks = WindowConfig().sink_tokens
    tokens = int(m[1]) if m[1] else math.ceil(float(m[2]) * AUDIO_TOKENS_PER_SECOND)
    least = sinks + 2 * AUDIO_TOKENS_PER_SECOND
    if tokens < least:
        raise argparse.ArgumentTypeError(f"{spec!r} is too small: the cache keeps {sinks} attention sinks plus "
                                         f"the window, which must hold at least one 2-s audio block "
                                         f"(--window {least} or {least / AUDIO_TOKENS_PER_SECOND:g}s)")
    return spec


def _input_path(s: str) -> str:
    """A media input: an existing file (checked now, in milliseconds) or a stream URL (opened later)."""
    if "://" not in s and not Path(s).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{s} does not exist" if not Path(s).exists() else f"{s} is not a file")
    return s


def _device(s: str) -> str:
    from omnistream.checkpoints import CheckpointError, check_device

    try:
        return check_device(s)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p, device_default: str = "cpu") -> None:
    """``--device``, ``--dtype``, ``--attn``: where and how the model runs (checked together after parsing)."""
    p.add_argument("--device", type=_device, default=device_default,
                   help=f"torch device: cpu, cuda, cuda:N (default {device_default})")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights and activations: auto = bf16 on CUDA, fp32 on CPU (default auto; Token2Wav "
                   "always runs in fp32)")
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                   help="attention implementation (default sdpa; flash_attention_2 needs CUDA, bf16/fp16 and "
                   "the flash-attn package)")


def check_model_args(args) -> None:
    """Checks that need several arguments at once (attention x device x dtype, a layout's stages),
    run right after parsing so a bad combination costs milliseconds, not a model load. Exits 2 with
    one line naming the bad value."""
    from omnistream.checkpoints import CheckpointError, check_attn, resolve_dtype

    try:
        if getattr(args, "attn", None):
            check_attn(args.attn, args.device, resolve_dtype(args.dtype, args.device))
        if getattr(args, "layout", None):
            from omnistream.runtime.layout import check_devices, load

            check_devices(load(args.layout, device=args.device, dtype=args.dtype))
    except (CheckpointError, ValueError) as e:  # LayoutError is a ValueError
        flag = "--layout" if "layout" in type(e).__name__.lower() else "--attn"
        print(f"omnistream {args.command}: error: argument {flag}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_make_tiny(args) -> int:
    from omnistream.random_checkpoints import make_tiny

    out = Path(args.dir)
    if args.if_missing and (out / "config.json").exists():
        print(f"{out} already holds a checkpoint; leaving it")
        return 0
    make_tiny(out, seed=args.seed, hidden=args.hidden, layers=args.layers, shape=args.shape,
              weights=not args.config_only and args.shape == "tiny")
    what = "a tiny" if args.shape == "tiny" else f"a config-only {args.shape}-shape"
    print(f"wrote {what} Qwen2.5-Omni checkpoint to {out} (load it with --model {out})")
    return 0


def _cmd_chat(args) -> int:
    from omnistream.chat import run_chat

    return run_chat(args)


def _cmd_demo(args) -> int:
    """Everything `make demo` shows, on the embedded tiny checkpoint: no downloads."""
    from omnistream.encoders.media import write_video
    from omnistream.encoders.vision import synthetic_frames
    from omnistream.random_checkpoints import make_tiny

    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"writing the tiny checkpoint to {model} ...")
        make_tiny(model)
    video = Path(".cache/demo-video.mp4")
    if not video.exists():
        frames = (f for f, _ in synthetic_frames(105, 112, 140, fps=30, seed=0))  # 3.5 s
        write_video(video, frames, fps=30)
    chat_args = build_parser().parse_args(
        ["chat", "--model", str(model), "--audio", str(ASSETS / "hello.flac"), "--video", str(video),
         "--text", "Describe what you see and hear.", "--max-new-tokens", str(args.max_new_tokens),
         "--out", str(args.out), "--max-speech-s", "8", "--device", args.device, "--dtype", args.dtype,
         "--attn", args.attn]
    )
    print("(the tiny checkpoint has random weights: expect noise for a reply, and real timings)")
    return _cmd_chat(chat_args)


def _cmd_serve(args) -> int:
    from omnistream.apps.server import run_server

    return run_server(args)


def _cmd_nav(args) -> int:
    try:
        if args.nav_command == "make-tiny":
            from omnistream.navigation.tiny import run_cli as make_tiny_janus_cli

            return make_tiny_janus_cli(args)
        if args.nav_command == "make-episodes":
            from omnistream.navigation.episodes_gen import make_dataset

            path = make_dataset(args.out, args.scenes, args.per_scene, args.split, args.seed, glb=not args.no_glb)
            print(f"wrote {path} (+ {path.name.replace('.json.gz', '_gt.json.gz')}) and scenes under "
                  f"{Path(args.out) / 'scenes'}; run them with: omnistream nav --episodes {path} --agent oracle "
                  f"--out runs/oracle")
            return 0
        if not args.episodes or not args.out:
            raise ValueError("nav needs --episodes FILE and --out DIR (or the make-episodes subcommand)")
        from omnistream.navigation.runner import run_cli

        return run_cli(args)
    except (OSError, ImportError) as e:  # missing episode/scene file, unwritable --out, habitat-sim not installed
        print(f"omnistream: error: {e}", file=sys.stderr)
        return 2


def _cmd_robot(args) -> int:
    from omnistream.apps.robot import run_cli

    return run_cli(args)


def _add_robot_parser(sub) -> None:
    from omnistream.apps.robot import add_config_args

    r = sub.add_parser(
        "robot",
        help="headless robot app: navigate (and talk) with a watchdog, e-stop, /health and /status",
        description="Runs the navigation agent (and the voice/video conversation) on a robot attached through "
        "the ZeroMQ bridge (omnistream.robot.bridge), or on the simulated MuJoCo robot with --sim. Control socket "
        "(JSON over ZeroMQ): instruction, estop, resume (releases the latch; the robot stays still), continue, cancel, "
        "status. Every config key is also a flag.",
    )
    add_config_args(r)
    r.set_defaults(func=_cmd_robot)


def _add_nav_parser(sub) -> None:
    n = sub.add_parser(
        "nav",
        help="run vision-language navigation episodes (VLN-CE format) with an agent in a simulator",
        description="Runs each episode to STOP or --max-steps, writes OUT/results.jsonl as episodes finish "
        "(a rerun with the same --out resumes), OUT/summary.json, a summary table (NE, OS, SR, SPL, nDTW, "
        "SDTW) and a top-down plot per episode in OUT/plots. `nav make-episodes` generates scenes and episodes.",
    )
    n.add_argument("--episodes", help="VLN-CE split file ({split}.json.gz; {split}_gt.json.gz is read if present)")
    n.add_argument("--sim", choices=["mujoco", "habitat"], default="mujoco",
                   help="simulator backend (default mujoco: the embedded one on generated scenes)")
    n.add_argument("--agent", choices=["oracle", "random", "janus"], default="oracle", help="agent (default oracle)")
    n.add_argument("--model", help="JanusVLN checkpoint directory (for --agent janus)")
    n.add_argument("--out", help="output directory")
    n.add_argument("--scenes-dir", help="directory the episodes' scene_id are relative to "
                   "(default: 'scenes' next to the episode file)")
    n.add_argument("--max-steps", type=int, default=500, help="step limit per episode (default 500)")
    n.add_argument("--limit", type=int, help="run only the first N episodes")
    n.add_argument("--width", type=int, default=640, help="camera width (default 640)")
    n.add_argument("--height", type=int, default=480, help="camera height (default 480)")
    n.add_argument("--seed", type=int, default=0, help="random agent seed (default 0)")
    n.add_argument("--no-plots", action="store_true", help="skip the per-episode PNG plots")
    n.add_argument("--no-progress", action="store_true", help="no progress bar")
    n.add_argument("--overwrite", action="store_true", help="start over in --out even if it holds another run's "
                   "results (default: resume the same run, refuse a different one)")
    _add_model_args(n)  # --device/--dtype/--attn of the JanusVLN agent, checked before anything loads
    n.set_defaults(func=_cmd_nav, nav_command=None)
    nsub = n.add_subparsers(dest="nav_command", metavar="{make-episodes,make-tiny}")
    from omnistream.navigation.tiny import add_arguments as add_tiny_janus_arguments

    t = nsub.add_parser("make-tiny", help="write a tiny random JanusVLN checkpoint (for --agent janus)",
                        description="Qwen2.5-VL + VGGT aggregator + merger weights in JanusVLN's layout, seeded "
                        "random and tiny; it loads through the same path as a released JanusVLN checkpoint.")
    add_tiny_janus_arguments(t)
    g = nsub.add_parser("make-episodes", help="generate scenes (MJCF + .glb + JSON) and VLN-CE episodes",
                        description="Procedural multi-room scenes, episodes with templated instructions, "
                        "reference paths, geodesic distances and ground-truth trajectories.")
    g.add_argument("--scenes", type=int, default=4, help="number of scenes (default 4)")
    g.add_argument("--per-scene", type=int, default=5, help="episodes per scene (default 5)")
    g.add_argument("--split", default="val", help="split name: writes OUT/{split}.json.gz (default val)")
    g.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    g.add_argument("--no-glb", action="store_true", help="skip the .glb export (habitat-sim stages)")
    g.add_argument("--out", required=True, help="dataset directory")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="omnistream",
        description="Streaming multimodal agent runtime: audio/video in, text (and speech) out.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser(
        "make-tiny",
        help="write a tiny random Qwen2.5-Omni checkpoint in the real Hugging Face format",
        description="Write config.json, model.safetensors, tokenizer, processor configs and spk_dict.pt "
        "with seeded random weights; it loads through the same path as Qwen/Qwen2.5-Omni-7B.",
    )
    m.add_argument("dir", help="output directory")
    m.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    m.add_argument("--hidden", type=_positive_int, default=64, help="hidden size of every part (default 64)")
    m.add_argument("--layers", type=_positive_int, default=2, help="layers per transformer (default 2)")
    m.add_argument("--if-missing", action="store_true", help="do nothing if DIR already holds a checkpoint")
    m.add_argument("--shape", choices=["tiny", "3b", "7b"], default="tiny",
                   help="tiny (default), or the published Qwen2.5-Omni-3B / -7B sizes: config only, no weight "
                   "file; loading creates random weights on the chosen device and dtype")
    m.add_argument("--config-only", action="store_true",
                   help="tiny shape without model.safetensors (random weights created at load time)")
    m.set_defaults(func=_cmd_make_tiny)

    c = sub.add_parser(
        "chat",
        help="stream audio/video/text into the Thinker and stream the reply",
        description="Encode the inputs block by block as they would arrive live (2-s audio blocks, "
        "2-frame video patches, TMRoPE positions), prefill them into the Thinker while 'the user is "
        "still talking', then stream the text reply. Prints time-to-first-token and timings.",
    )
    c.add_argument("--model", default=str(DEFAULT_TINY), help="checkpoint directory or hub id "
                   f"(default {DEFAULT_TINY}; write it with `omnistream make-tiny`)")
    c.add_argument("--audio", type=_input_path, help="speech input: any file PyAV decodes (wav, flac, mp3, ...)")
    c.add_argument("--video", type=_input_path, help="video input: a file or stream URL PyAV opens (mp4, rtsp://, ...)")
    c.add_argument("--text", help="text typed by the user, after the audio/video")
    c.add_argument("--system", default=None, help="system prompt (default: the Qwen2.5-Omni one)")
    c.add_argument("--max-new-tokens", type=_positive_int, default=64, help="reply length limit (default 64)")
    c.add_argument("--temperature", type=_non_negative, default=0.0, help="0 = greedy (default)")
    c.add_argument("--voice", help="speak the reply in this voice (from the checkpoint's spk_dict.pt, "
                   "e.g. Chelsie or Ethan); implied by --out")
    c.add_argument("--out", help="write the spoken reply to this WAV file (24 kHz); without --out/--voice "
                   "the reply is text only and the Talker is not loaded")
    c.add_argument("--max-speech-s", type=_positive, default=30.0, help="speech length limit in seconds (default 30)")
    c.add_argument("--seed", type=int, default=0, help="seed for sampling and the Token2Wav noise (default 0)")
    c.add_argument("--window", type=_window, help="bound the Thinker's KV cache to 4 attention sinks + a sliding "
                   "window of "
                   "this many tokens (e.g. 8192) or seconds of media (e.g. 600s); default: growing cache")
    c.add_argument("--realtime", action="store_true",
                   help="pace the inputs at real time, as a live microphone/camera would deliver them")
    _add_model_args(c)
    c.set_defaults(func=_cmd_chat)

    d = sub.add_parser(
        "demo",
        help="the `make demo` job: a speech clip and a generated video through the encoders into the Thinker",
        description="Writes the tiny checkpoint and a short generated video if missing, then runs `chat` "
        "with the bundled espeak-ng speech clip.",
    )
    d.add_argument("--model", default=str(DEFAULT_TINY), help=f"checkpoint (default {DEFAULT_TINY})")
    d.add_argument("--max-new-tokens", type=_positive_int, default=24, help="reply length limit (default 24)")
    d.add_argument("--out", default=".cache/demo-reply.wav", help="where the spoken reply goes")
    _add_model_args(d)
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser(
        "serve",
        help="OpenAI-Realtime-compatible voice/video chat server (WebSocket /v1/realtime + browser page at /)",
        description="Serve the Realtime protocol (session.update, input_audio_buffer.*, conversation.item.*, "
        "response.*; pcm16 24 kHz audio both ways) with server VAD (silero-vad) and barge-in; GET /health, "
        "GET /livez, GET /status, GET /metrics (Prometheus), POST /admin/drain, WebRTC calls (POST "
        "/v1/realtime/calls, SDP offer -> answer), ephemeral keys (POST /v1/realtime/client_secrets), and the "
        "browser client at /.",
    )
    s.add_argument("--model", default=str(DEFAULT_TINY), help=f"checkpoint directory (default {DEFAULT_TINY})")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--api-key", default=os.environ.get("OMNISTREAM_API_KEY"),
                   help="require this key (Authorization: Bearer KEY, or the openai-insecure-api-key.KEY "
                   "subprotocol); default: $OMNISTREAM_API_KEY, unset: no key")
    s.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="browser origin allowed to connect besides the server's own page (repeatable; '*': any)")
    s.add_argument("--max-sessions", type=_positive_int, default=8, help="concurrent sessions (default 8)")
    s.add_argument("--rate-limit", type=_non_negative, default=100.0,
                   help="client events per second per session, token bucket (default 100; 0: off)")
    s.add_argument("--layout", help="run the stages as ZeroMQ processes: all-in-one, split or a layout YAML "
                   "(default: everything in this process)")
    s.add_argument("--spares", action="store_true", help="with --layout: keep one loaded standby process per "
                   "stage, so a crashed stage is replaced in well under a second (twice the memory)")
    s.add_argument("--voice", help="default voice (a speaker of the checkpoint; OpenAI voice names map to it)")
    s.add_argument("--allowed-hosts", action="append", metavar="HOST",
                   help="Host header names accepted besides IP addresses, localhost and --host (repeatable; "
                   "'.example.com' also matches subdomains; '*': any, turning off the DNS-rebinding check)")
    s.add_argument("--window", type=_window, default="auto",
                   help="bound each session's KV cache: auto (sinks + a window sized from the model's context, "
                   "the default), tokens (8192), seconds of media (600s), or none (grows with the session)")
    s.add_argument("--headroom", type=float, default=0.9,
                   help="admission control: refuse a session when the sessions, all replying, would use more than "
                   "this fraction of the busiest stage (default 0.9; 0: off, only --max-sessions)")
    s.add_argument("--block-sparse-dit", action="store_true",
                   help="Token2Wav's DiT attends only to the key blocks its mask allows: ~25%% less speech compute "
                   "on a CPU, audio within 6e-5 of the exact path (not bit-equal; default: exact)")
    s.add_argument("--threads", type=_positive_int, default=None,
                   help="without --layout: torch threads of the in-process engine (default on a CPU: all cores but "
                   "one, which the event loop needs for VAD and the WebSockets, shared by the engine's two threads: "
                   "Token2Wav runs on its own; with --layout each stage sets its own)")
    s.add_argument("--hang-s", type=_positive, default=30.0,
                   help="with --layout: a stage that answers no ping for this long is restarted (default 30)")
    s.add_argument("--max-turn-s", type=_positive, default=120.0,
                   help="a user turn is committed when it gets this long (default 120)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=256, help="reply text limit (default 256)")
    s.add_argument("--max-speech-s", type=_positive, default=30.0, help="reply speech limit in seconds (default 30)")
    s.add_argument("--no-vad", action="store_true", help="sessions start with turn_detection null (manual commit)")
    s.add_argument("--seed", type=int, default=None, help="seed every session's sampling and speech noise "
                   "(reproducible replies for tests and benchmarks; default: unseeded)")
    s.add_argument("--max-sessions-per-ip", type=_non_negative_int, default=4,
                   help="sessions one client address may hold; more get HTTP 429 (default 4; 0: no cap)")
    s.add_argument("--trusted-proxy", action="append", type=_ip_network, metavar="ADDR",
                   help="a load balancer (address or CIDR, repeatable) whose X-Forwarded-For names the client for "
                   "--max-sessions-per-ip (default: 127.0.0.1 and ::1)")
    s.add_argument("--drain-grace-s", type=_positive, default=30.0,
                   help="on SIGTERM or POST /admin/drain: no new sessions, running replies get this long to finish "
                   "(then cut), idle sessions are closed with 1012, the process exits 0 (default 30; match "
                   "Kubernetes terminationGracePeriodSeconds)")
    s.add_argument("--log-json", action="store_true", help="one JSON object per log line (session open/close and "
                   "per-turn latency lines carry their figures as keys)")
    s.add_argument("--client-secret-ttl", type=_float_at_least(1.0, strict=False), default=600.0, metavar="SECONDS",
                   help="lifetime of the ephemeral keys POST /v1/realtime/client_secrets mints (default 600, max 7200)")
    s.add_argument("--ice-server", action="append", metavar="URL",
                   help="STUN/TURN server for WebRTC calls, e.g. stun:stun.example.com:3478 (repeatable; default: "
                   "host candidates only, enough on one network)")
    _add_model_args(s)
    s.set_defaults(func=_cmd_serve)
    _add_nav_parser(sub)
    _add_robot_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_args(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_flush_denormal(True)  # CPU: denormal floats (random or quiet signals) cost 10-100x
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user-facing errors: one line that says what to do
        from omnistream.checkpoints import CheckpointError
        from omnistream.encoders.media import MediaError

        if isinstance(e, (CheckpointError, MediaError, ValueError)) and not args.verbose:
            print(f"omnistream: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
