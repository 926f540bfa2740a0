"""Conversation items, out-of-band responses and per-response voice over the Realtime API (issue 14),
with the official ``openai`` SDK against ``omnistream serve`` (in process).

Oracles, independent of the code under test:

* a conversation built with ``previous_item_id`` insertions and a deletion replies (greedy text)
  exactly as a session that got the resulting items in order by plain creation;
* an out-of-band response's events carry ``conversation_id: null`` and the client's metadata, add
  no item, and the next in-band reply equals the one of a session that never made it;
* a response in its own voice is the same audio (seeded) as a session opened with that voice, and
  not the session voice's; an unknown voice is refused before any work;
* every event validates against the SDK's own model for its type.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
from test_server import hello24k  # noqa: F401 (the fixture: one copy)

from omnistream.runtime.client import InProcClient, SessionOptions

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)
DEFAULTS = SessionOptions(max_new_tokens=6, max_speech_s=0.3, seed=5)


async def until(conn, kind: str, events: list, errors: bool = False):
    """Events until the first of type ``kind`` (returned); an error fails the test unless ``errors``."""
    async for ev in conn:
        events.append(ev)
        if ev.type == "error" and not errors and kind != "error":
            pytest.fail(f"server error: {ev.error}")
        if ev.type == kind:
            return ev


def serve_and(tiny, body):
    """Run ``body(connect)`` against a server; ``connect()`` opens an SDK Realtime connection."""
    from omnistream.apps.server import ServerConfig, serving

    async def main():
        async with serving(InProcClient(tiny), ServerConfig(port=0, api_key="sk-test", defaults=DEFAULTS)) as server:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-test")
            return await body(lambda: client.realtime.connect(model="omnistream"))

    return asyncio.run(asyncio.wait_for(main(), 240))


async def text_session(conn, voice: str | None = None) -> None:
    out = {"output_modalities": ["text"]} if voice is None else {"output_modalities": ["audio"]}
    audio = {"input": {"turn_detection": None}, **({"output": {"voice": voice}} if voice else {})}
    await conn.session.update(session={"type": "realtime", **out, "audio": audio})


def message(role: str, text: str, item_id: str | None = None) -> dict:
    kind = {"user": "input_text", "system": "input_text", "assistant": "output_text"}[role]
    return {"type": "message", "role": role, **({"id": item_id} if item_id else {}),
            "content": [{"type": kind, "text": text}]}


def check_models(events) -> None:
    from test_openai_sdk import _models

    models = _models()
    for e in events:
        models[e.type].model_validate(e.model_dump(exclude_unset=True))


SYSTEM, ASSISTANT, USER = "You answer in French.", "Bonjour, que puis-je faire ?", "what is two plus two?"


def test_items_created_inserted_deleted_retrieved(tiny):

    async def body(connect):
        events = []
        async with connect() as conn:  # plain creation, in order
            await text_session(conn)
            for role, text, i in (("system", SYSTEM, "s1"), ("assistant", ASSISTANT, "a1"), ("user", USER, "u1")):
                await conn.conversation.item.create(item=message(role, text, i))
                await until(conn, "conversation.item.created", events)
            await conn.response.create()
            plain = (await until(conn, "response.done", events)).response
        async with connect() as conn:  # the same items by insertion, plus one deleted
            await text_session(conn)
            created = []
            await conn.conversation.item.create(item=message("user", USER, "u1"))
            created.append(await until(conn, "conversation.item.created", events))
            await conn.conversation.item.create(item=message("system", SYSTEM, "s1"), previous_item_id="root")
            created.append(await until(conn, "conversation.item.created", events))
            await conn.conversation.item.create(item=message("user", "ignore this", "j1"), previous_item_id="s1")
            created.append(await until(conn, "conversation.item.created", events))
            await conn.conversation.item.create(item=message("assistant", ASSISTANT, "a1"), previous_item_id="j1")
            created.append(await until(conn, "conversation.item.created", events))
            await conn.conversation.item.delete(item_id="j1")
            deleted = await until(conn, "conversation.item.deleted", events)
            await conn.conversation.item.retrieve(item_id="a1")
            got = await until(conn, "conversation.item.retrieved", events)
            errors = []
            for send in (conn.conversation.item.delete(item_id="nope"), conn.conversation.item.retrieve(item_id="j1"),
                         conn.conversation.item.create(item=message("assistant", "x"), previous_item_id="nope")):
                await send
                errors.append(await until(conn, "error", events))
            await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(9600)).decode())  # a turn opens
            await conn.conversation.item.delete(item_id="a1")
            errors.append(await until(conn, "error", events))
            await conn.input_audio_buffer.clear()
            await until(conn, "input_audio_buffer.cleared", events)
            await conn.response.create()  # the session goes on
            inserted = (await until(conn, "response.done", events)).response
        return plain, inserted, created, deleted, got, errors, events

    plain, inserted, created, deleted, got, errors, events = serve_and(tiny, body)
    check_models(events)
    assert plain.status == inserted.status and plain.status in ("completed", "incomplete")
    assert plain.output[0].content[0].text == inserted.output[0].content[0].text != ""
    assert [(e.item.id, e.previous_item_id) for e in created] == [("u1", None), ("s1", None), ("j1", "s1"),
                                                                  ("a1", "j1")]
    assert deleted.item_id == "j1"
    assert got.item.id == "a1" and got.item.role == "assistant" and got.item.content[0].text == ASSISTANT
    assert [e.error.code for e in errors] == ["item_delete_invalid_item_id", "item_retrieve_invalid_item_id",
                                              "item_create_invalid_previous_item_id", "item_busy"]
    assert "'nope' does not exist" in errors[0].error.message


def test_retrieve_returns_the_committed_user_audio(tiny, hello24k):  # noqa: F811 (the fixture)

    async def body(connect):
        events = []
        async with connect() as conn:
            await text_session(conn)
            await conn.input_audio_buffer.append(audio=base64.b64encode(hello24k.astype("<i2").tobytes()).decode())
            await conn.input_audio_buffer.commit()
            committed = await until(conn, "input_audio_buffer.committed", events)
            await conn.conversation.item.retrieve(item_id=committed.item_id)
            got = await until(conn, "conversation.item.retrieved", events)
        return got, events

    got, events = serve_and(tiny, body)
    check_models(events)
    part = got.item.content[0]
    assert part.type == "input_audio"
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(part.audio), "<i2"), hello24k)


def test_out_of_band_response(tiny):

    async def body(connect):
        events, oob = [], []
        async with connect() as conn:
            await text_session(conn)
            await conn.conversation.item.create(item=message("user", "hello there"))
            await until(conn, "conversation.item.created", events)
            await conn.response.create(response={"conversation": "none", "metadata": {"topic": "summary"},
                                                 "instructions": "Answer with one word."})
            await until(conn, "response.done", oob)
            await conn.conversation.item.create(item=message("user", USER))
            await conn.response.create()
            after = await until(conn, "response.done", events)
        async with connect() as conn:  # a session that never made it
            await text_session(conn)
            for text in ("hello there", USER):
                await conn.conversation.item.create(item=message("user", text))
            await conn.response.create()
            never = await until(conn, "response.done", events)
        return oob, after, never, events

    oob, after, never, events = serve_and(tiny, body)
    check_models(events + oob)
    types = [e.type for e in oob]
    assert "conversation.item.created" not in types and "response.output_text.delta" in types
    for e in oob:
        if e.type in ("response.created", "response.done"):
            assert e.response.conversation_id is None and e.response.metadata == {"topic": "summary"}
    assert after.response.conversation_id is not None
    assert after.response.output[0].content[0].text == never.response.output[0].content[0].text


def test_per_response_voice(tiny):
    async def body(connect):
        events, audio = [], {}
        for name, voice, override in (("override", "Chelsie", "Ethan"), ("ethan", "Ethan", None),
                                      ("chelsie", "Chelsie", None)):
            async with connect() as conn:
                await text_session(conn, voice)
                if name == "override":  # an unknown voice: an error, no response at all
                    await conn.response.create(response={"audio": {"output": {"voice": "Nobody"}}})
                    bad = await until(conn, "error", events)
                await conn.conversation.item.create(item=message("user", "hello there"))
                await conn.response.create(response={"audio": {"output": {"voice": override}}} if override else {})
                got = []
                done = await until(conn, "response.done", got)
                events += got
                audio[name] = (b"".join(base64.b64decode(e.delta) for e in got if e.type == "response.output_audio.delta"),
                               done.response)
        return audio, bad, events

    audio, bad, events = serve_and(tiny, body)
    check_models(events)
    assert bad.error.code == "invalid_value" and "Nobody" in bad.error.message
    assert not any(e.type == "response.created" for e in events[: events.index(bad)])
    assert audio["override"][1].audio.output.voice == "Ethan"
    assert audio["override"][0] and audio["override"][0] == audio["ethan"][0] != audio["chelsie"][0]


def test_item_store_keeps_the_last_audio_items_only():
    from omnistream.apps.realtime_items import ItemStore

    store = ItemStore(audio_items=2, audio_s=1.0)
    for i, n in enumerate((100, 200, 300)):
        store.add({"id": f"i{i}", "type": "message", "role": "user", "content": [{"type": "input_audio"}]}, f"i{i}")
        store.keep_audio(f"i{i}", np.full(n, i, np.int16))
    assert list(store.audio) == ["i1", "i2"] and "audio" not in store.render("i0")["content"][0]
    assert np.frombuffer(base64.b64decode(store.render("i2")["content"][0]["audio"]), "<i2").tolist() == [2] * 300
    store.keep_audio("i3", np.zeros(24000, np.int16))  # a second in all: the others go
    assert list(store.audio) == ["i3"]
    assert store.add({"id": "r", "content": []}, "r", after="root") is None and store.order[0] == "r"
    assert store.add({"id": "x", "content": []}, "i1", after="i0") == "i0" and store.group("x") == ["x", "i1"]


def test_deleting_a_function_call_takes_its_reply_out(tiny):
    """A forced call's reply is one pipeline item: deleting its function_call item takes it out of the
    model's context, and its call can no longer be answered; the next reply equals a session that got
    only the user message."""
    from test_realtime_tools import TOOLS

    async def body(connect):
        events = []
        async with connect() as conn:
            await text_session(conn)
            await conn.session.update(session={"type": "realtime", "tools": TOOLS})
            await conn.conversation.item.create(item=message("user", "switch on the light", "u1"))
            await conn.response.create(response={"tool_choice": "required", "max_output_tokens": 200})
            call = (await until(conn, "response.done", events)).response.output[0]
            await conn.conversation.item.delete(item_id=call.id)
            deleted = await until(conn, "conversation.item.deleted", events)
            await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                      "output": "{}"})
            err = await until(conn, "error", events)
            await conn.response.create(response={"tool_choice": "none"})
            after = (await until(conn, "response.done", events)).response
        async with connect() as conn:
            await text_session(conn)
            await conn.session.update(session={"type": "realtime", "tools": TOOLS})
            await conn.conversation.item.create(item=message("user", "switch on the light", "u1"))
            await conn.response.create(response={"tool_choice": "none"})
            never = (await until(conn, "response.done", events)).response
        return call, deleted, err, after, never, events

    call, deleted, err, after, never, events = serve_and(tiny, body)
    check_models(events)
    assert call.type == "function_call" and deleted.item_id == call.id and err.error.code == "invalid_value"
    assert after.output[0].content[0].text == never.output[0].content[0].text
