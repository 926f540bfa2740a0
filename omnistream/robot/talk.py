"""Talk mode: a voice/video conversation through the `Client` interface (microphone + camera in, speaker out).

One session on an `InProcClient` (the Thinker-Talker in this process) or a `MultiProcClient` (stages
under the runtime supervisor, which restarts them; the navigation loop pauses while they are down).

Turns: audio blocks go to the session as they arrive; a turn ends after `silence_s` of quiet following
speech (an RMS energy detector: the robot has no push-to-talk) or at the end of a `file:` source; camera
frames go in at `fps` while the user speaks. The reply's audio goes to the speaker sink as it streams.

Instructions by voice: the robot's agent interface is offered to every reply as function tools,
``navigate(instruction)``, ``stop()`` and ``status()`` (omnistream/robot/tools.py), with the session's
``talk_tool_choice`` (``auto``: the model decides; a tool's name forces that call). A call is carried out
through the control socket's command path, its output goes back as the function's output and the model
answers after it (spoken), up to ``MAX_TOOL_ROUNDS`` calls in a row. :meth:`TalkLoop.say` runs a typed
turn the same way (from any thread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np

log = logging.getLogger("omnistream.robot.talk")

SYSTEM_PROMPT = ("You are a robot that can talk and move. Use your tools to move, to stop and to see how you are "
                 "doing; then answer the user briefly.")
MAX_TOOL_ROUNDS = 3  # calls the model may chain in one turn before it must answer in words


class EnergyTurns:
    """End of turn = `silence_s` of blocks below `threshold` RMS after at least `min_speech_s` of speech."""

    def __init__(self, threshold: float = 0.01, silence_s: float = 0.8, min_speech_s: float = 0.2):
        self.threshold, self.silence_s, self.min_speech_s = threshold, silence_s, min_speech_s
        self.speech = self.silence = 0.0

    def feed(self, block: np.ndarray, rate: int) -> bool:
        dur = len(block) / rate
        if float(np.sqrt(np.mean(np.square(block)))) >= self.threshold if len(block) else False:
            self.speech += dur
            self.silence = 0.0
        elif self.speech >= self.min_speech_s:
            self.silence += dur
            if self.silence >= self.silence_s:
                self.speech = self.silence = 0.0
                return True
        return False

    @property
    def in_speech(self) -> bool:
        return self.speech > 0


class TalkLoop:
    """Runs in its own thread with its own asyncio loop (the Client API is asyncio-facing)."""

    def __init__(self, app):
        from omnistream.robot.tools import RobotTools

        self.app, self.cfg = app, app.cfg
        self.client = None
        self.sid: str | None = None
        self.tools = RobotTools(app)
        self.turns = 0
        self.replies: list[dict] = []
        self.error: str | None = None
        self.mic = self.speaker = None
        self.ready = threading.Event()  # the session is open: say() may be called
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn_lock: asyncio.Lock | None = None
        self._stages_ok = True

    def open_devices(self) -> None:
        """At start-up, in the caller's thread: a missing device fails the start with the device list."""
        from omnistream.robot.audio_io import open_sink, open_source

        if self.cfg.mic:
            self.mic = open_source(self.cfg.mic)  # AudioDeviceError lists the devices present
        if self.cfg.speaker:
            self.speaker = open_sink(self.cfg.speaker)

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from omnistream.runtime.client import InProcClient, SessionOptions

        self._loop = asyncio.get_running_loop()
        self._turn_lock = asyncio.Lock()
        if self.cfg.talk_layout:
            from omnistream.runtime.procclient import MultiProcClient

            self.client = MultiProcClient(self.cfg.talk_model, self.cfg.talk_layout)
        else:
            from omnistream.checkpoints import load_omni

            ck = await asyncio.to_thread(load_omni, self.cfg.talk_model, talker=self.speaker is not None)
            self.client = InProcClient(ck)
        await self.client.start()
        voice = self.cfg.voice if self.speaker is not None else None
        sid = self.sid = await self.client.open_session(SessionOptions(
            voice=voice, system_prompt=SYSTEM_PROMPT, max_new_tokens=self.cfg.talk_max_new_tokens,
            max_speech_s=self.cfg.talk_max_speech_s, seed=self.cfg.talk_seed))
        self.ready.set()
        turns = EnergyTurns()
        t_session = time.monotonic()
        last_frame = 0.0
        try:
            while not self.app.stop_event.is_set() and self.mic is not None:
                block = await asyncio.to_thread(self.mic.read)
                end = block is None  # a file source ended: its last turn ends with it
                if block is not None:
                    await self.client.push_audio(sid, block, self.mic.rate)
                    now = time.monotonic()
                    if turns.in_speech and now - last_frame >= 0.5 and self.app.camera is not None:
                        got = self.app.camera.read_latest(self.cfg.max_frame_age_s)
                        if got is not None:
                            await self.client.push_frame(sid, got[0], now - t_session)
                            last_frame = now
                    end = turns.feed(block, self.mic.rate)
                if end:
                    await self._turn(None)
                if block is None:
                    break
            while not self.app.stop_event.is_set():  # the source ended: stay up for status/health
                self._stages_ok = self._check_stages()
                await asyncio.sleep(0.2)
        finally:
            self.ready.clear()
            await self.client.close()

    def say(self, text: str, tool_choice: str | None = None, timeout_s: float = 120.0) -> dict:
        """A typed user turn (from any thread), answered like a spoken one: its record (text, audio samples,
        tool calls with their outputs). ``tool_choice``: this turn's (default: the config's)."""
        if not self.ready.wait(timeout_s):
            raise TimeoutError("the talk session is not open")
        fut = asyncio.run_coroutine_threadsafe(self._turn(text, tool_choice), self._loop)
        return fut.result(timeout_s)

    def _choice(self, name: str | None) -> str:
        """A configured choice (auto | none | required | a tool's name) as the conversation takes it."""
        name = name or self.cfg.talk_tool_choice
        return name if name in ("auto", "none", "required") else f"function:{name}"

    async def _turn(self, text: str | None, tool_choice: str | None = None) -> dict:
        """Commit the user turn and answer it: replies, and after each that called tools, the tools' outputs
        (one user turn of ``<tool_response>`` blocks) and the next reply, until one calls nothing."""
        from omnistream.engine.tools import tool_response
        from omnistream.robot.tools import CALL_MAX_TOKENS
        from omnistream.runtime.client import ResponseOptions

        async with self._turn_lock:
            await self.client.commit(self.sid, text)
            tools = self.tools.definitions() if self.cfg.voice_instructions else []
            choice = self._choice(tool_choice) if tools else "none"
            record = {"text": "", "audio_samples": 0, "calls": []}
            for round_ in range(MAX_TOOL_ROUNDS + 1):
                forced = choice not in ("auto", "none")  # the whole call must fit, whatever the text limit
                calls = await self._respond(ResponseOptions(tools=tools, tool_choice=choice, max_new_tokens=(
                    max(CALL_MAX_TOKENS, self.cfg.talk_max_new_tokens) if forced else None)), record)
                if not calls:
                    break
                outputs = []
                for c in calls:
                    out = await asyncio.to_thread(self.tools.execute, c)
                    record["calls"].append({"name": c.name, "arguments": c.arguments, "output": out[:1000]})
                    outputs.append(tool_response(out))
                await self.client.commit(self.sid, "\n".join(outputs))
                choice = "auto" if round_ + 1 < MAX_TOOL_ROUNDS else "none"  # a forced call is not forced again
            self.turns += 1
            record["text"] = record["text"][-500:]
            self.replies.append(record)
            del self.replies[:-20]
            if self.speaker is not None and hasattr(self.speaker, "flush"):
                self.speaker.flush()
            log.info("talk turn %d: %d chars, %d samples, calls %s", self.turns, len(record["text"]),
                     record["audio_samples"], [c["name"] for c in record["calls"]] or "none")
            return record

    async def _respond(self, options, record: dict) -> list:
        """One reply: text into ``record``, audio to the speaker; the function calls it made."""
        from omnistream.runtime.client import ArgumentsDelta, AudioDelta, ResponseDone, TextDelta

        async for ev in self.client.respond(self.sid, options):
            if isinstance(ev, TextDelta):
                record["text"] += ev.text
            elif isinstance(ev, AudioDelta):
                if self.speaker is not None:
                    await asyncio.to_thread(self.speaker.write, ev.pcm)
                    record["audio_samples"] += len(ev.pcm)
            elif isinstance(ev, ResponseDone):
                return list(ev.tool_calls)
            elif isinstance(ev, ArgumentsDelta):
                continue  # the call is carried out once complete (ResponseDone.tool_calls)
            else:  # SessionError: the session goes on
                log.warning("talk: %s", ev)
        return []

    def _check_stages(self) -> bool:
        st = self.client.status() if self.client is not None else {}
        return all(s.get("alive", True) and s.get("state", "ready") in ("ready", None)
                   for s in st.get("stages", []))

    def stages_ready(self) -> bool:
        try:
            return self._check_stages() if self.client is not None else True
        except Exception:  # noqa: BLE001 - a status call must not stop the robot loop
            return False

    def status(self) -> dict:
        return {"turns": self.turns, "replies": self.replies[-3:], "error": self.error, **self.tools.counts,
                "client": self.client.status() if self.client is not None else None}

    def close(self) -> None:
        for x in (self.mic, self.speaker):
            if x is not None:
                try:
                    x.close()
                except Exception as e:  # noqa: BLE001
                    log.warning("talk: closing %s failed: %s", type(x).__name__, e)
