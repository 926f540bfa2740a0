"""The official ``openai`` Python SDK's realtime client, pointed at ``omnistream serve`` by
``base_url``, runs a whole voice turn; every server event it receives validates as the SDK's own
pydantic model for that event type."""

from __future__ import annotations

import asyncio
import base64
import typing

import numpy as np
import pytest

from omnistream.apps.server import ServerConfig, serving
from omnistream.runtime.client import InProcClient, SessionOptions

openai = pytest.importorskip("openai")
rt = pytest.importorskip("openai.types.realtime")
pytestmark = pytest.mark.timeout(180)


def _models() -> dict:
    """Event type -> the SDK's model (the RealtimeServerEvent union is not discriminated)."""
    out = {}
    for m in typing.get_args(typing.get_args(rt.RealtimeServerEvent)[0]):
        for t in typing.get_args(m.model_fields["type"].annotation):
            out[t] = m
    return out


@pytest.mark.slow
def test_openai_sdk_voice_turn(tiny):
    from omnistream.encoders.audio import PolyphaseResampler
    from omnistream.encoders.media import read_audio

    pcm, rate = read_audio("omnistream/assets/hello.flac")
    r = PolyphaseResampler(rate, 24000)
    x = np.concatenate([r.push(pcm.mean(axis=1)), r.flush()])
    speech = np.round(np.clip(x, -1, 1) * 32767).astype("<i2")
    models = _models()

    async def body():
        cfg = ServerConfig(port=0, api_key="sk-test", defaults=SessionOptions(max_new_tokens=8, max_speech_s=1.0, seed=0))
        async with serving(InProcClient(tiny), cfg) as server:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-test")
            events = []
            async with client.realtime.connect(model="omnistream") as conn:
                await conn.session.update(session={
                    "type": "realtime", "output_modalities": ["audio"], "instructions": "Answer briefly.",
                    "max_output_tokens": 8,
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                              "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}}})
                for i in range(0, len(speech), 4800):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(speech[i:i + 4800].tobytes()).decode())
                await conn.input_audio_buffer.commit()
                await conn.response.create()
                async for ev in conn:
                    events.append(ev)
                    if ev.type == "error":
                        pytest.fail(f"server error: {ev.error}")
                    if ev.type == "response.done":
                        break
            return events

    events = asyncio.run(asyncio.wait_for(body(), 150))
    types = [e.type for e in events]
    assert types[0] == "session.created" and "session.updated" in types
    for t in ("input_audio_buffer.committed", "conversation.item.created", "response.created",
              "response.output_audio.delta", "response.output_audio_transcript.delta", "response.output_audio.done"):
        assert t in types, t
    upd = next(e for e in events if e.type == "session.updated").session
    assert upd.instructions == "Answer briefly." and upd.audio.input.turn_detection is None
    assert upd.audio.output.voice == "Chelsie"  # an OpenAI voice name maps to the model's default voice
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    assert len(audio) > 0 and len(audio) % 2 == 0
    done = events[-1]
    assert done.response.status in ("completed", "incomplete") and done.response.usage.output_tokens <= 8
    assert int(done.response.metadata["audio_samples"]) == len(audio) // 2
    for e in events:  # strict: every event is a valid instance of the SDK's model for its type
        models[e.type].model_validate(e.model_dump(exclude_unset=True))
