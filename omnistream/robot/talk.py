"""Talk mode: a voice/video conversation through the `Client` interface (microphone + camera in, speaker out).

One session on an `InProcClient` (the Thinker-Talker in this process) or a `MultiProcClient` (stages
under the runtime supervisor, which restarts them; the navigation loop pauses while they are down).

Turns: audio blocks go to the session as they arrive; a turn ends after `silence_s` of quiet following
speech (an RMS energy detector: the robot has no push-to-talk) or at the end of a `file:` source; camera
frames go in at `fps` while the user speaks. The reply's audio goes to the speaker sink as it streams.

Voice instructions: the system prompt asks the model to put a navigation request on a line
``NAVIGATE: <instruction>``; such a line in a reply becomes a navigation task (source "voice"), so "go to
the kitchen, please" said to the robot drives it there. The Client has no separate transcript; the
Thinker's own reply is where the spoken request is understood.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import numpy as np

log = logging.getLogger("omnistream.robot.talk")

SYSTEM_PROMPT = (
    "You are a robot that can talk and move. When the user asks you to go somewhere, first answer with one line "
    "'NAVIGATE: <the instruction>', then reply briefly."
)
_NAV = re.compile(r"^\s*NAVIGATE:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE)


def extract_instruction(text: str) -> str | None:
    """The navigation instruction of a reply (`NAVIGATE: ...` line), or None."""
    m = _NAV.search(text or "")
    return m.group(1)[:2000] if m and m.group(1).strip() else None


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
        self.app, self.cfg = app, app.cfg
        self.client = None
        self.turns = 0
        self.replies: list[dict] = []
        self.error: str | None = None
        self.mic = self.speaker = None
        self._loop: asyncio.AbstractEventLoop | None = None
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
        from omnistream.runtime.client import AudioDelta, InProcClient, ResponseDone, SessionOptions, TextDelta

        self._loop = asyncio.get_running_loop()
        if self.cfg.talk_layout:
            from omnistream.runtime.procclient import MultiProcClient

            self.client = MultiProcClient(self.cfg.talk_model, self.cfg.talk_layout)
        else:
            from omnistream.checkpoints import load_omni

            ck = await asyncio.to_thread(load_omni, self.cfg.talk_model, talker=self.speaker is not None)
            self.client = InProcClient(ck)
        await self.client.start()
        voice = self.cfg.voice if self.speaker is not None else None
        sid = await self.client.open_session(SessionOptions(voice=voice, system_prompt=SYSTEM_PROMPT,
                                                            max_new_tokens=self.cfg.talk_max_new_tokens,
                                                            max_speech_s=self.cfg.talk_max_speech_s))
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
                    await self.client.commit(sid)
                    text, samples = [], 0
                    async for ev in self.client.respond(sid):
                        if isinstance(ev, TextDelta):
                            text.append(ev.text)
                        elif isinstance(ev, AudioDelta) and self.speaker is not None:
                            await asyncio.to_thread(self.speaker.write, ev.pcm)
                            samples += len(ev.pcm)
                        elif isinstance(ev, ResponseDone):
                            break
                        else:  # SessionError: the session goes on
                            log.warning("talk: %s", ev)
                    self.turns += 1
                    reply = "".join(text)
                    self.replies.append({"text": reply[-500:], "audio_samples": samples})
                    del self.replies[:-20]
                    if self.speaker is not None and hasattr(self.speaker, "flush"):
                        self.speaker.flush()
                    log.info("talk turn %d: %d chars, %d samples", self.turns, len(reply), samples)
                    instr = extract_instruction(reply) if self.cfg.voice_instructions else None
                    if instr and "navigate" in self.cfg.modes:
                        self.app.submit(instr, None, "voice")
                if block is None:
                    break
            while not self.app.stop_event.is_set():  # the source ended: stay up for status/health
                self._stages_ok = self._check_stages()
                await asyncio.sleep(0.2)
        finally:
            await self.client.close()

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
        return {"turns": self.turns, "replies": self.replies[-3:], "error": self.error,
                "client": self.client.status() if self.client is not None else None}

    def close(self) -> None:
        for x in (self.mic, self.speaker):
            if x is not None:
                try:
                    x.close()
                except Exception as e:  # noqa: BLE001
                    log.warning("talk: closing %s failed: %s", type(x).__name__, e)
