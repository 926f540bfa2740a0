"""Conversation items, per-reply voice and out-of-band replies through the Client interface (issue 14).

The same cases run against the in-process client and the split stage layout (four processes), so
the new ops travel the real wire. Oracles, independent of the code under test:

* items: a conversation built by inserting (``after``) and deleting items must reply exactly as a
  fresh session that got the resulting items in order by plain appends (greedy text);
* out of band: the next in-band reply equals the one of a session that never made the out-of-band
  reply, and the out-of-band reply itself equals an in-band reply to the same conversation;
* voice: a reply in a per-reply voice is the same audio (seeded) as a session opened with that voice,
  and differs from the session voice's; the reply after it is spoken in the session's voice again.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import numpy as np
import pytest

from omnistream.runtime.client import (
    AudioDelta,
    ClientError,
    InProcClient,
    ResponseDone,
    ResponseOptions,
    SessionError,
    SessionOptions,
    TextDelta,
)
from omnistream.runtime.procclient import MultiProcClient

pytestmark = pytest.mark.timeout(600)
TEXT = SessionOptions(max_new_tokens=6, seed=0)
VOICE = SessionOptions(voice="Chelsie", max_new_tokens=4, max_speech_s=0.3, seed=3)
KINDS = ["inproc", pytest.param("split", marks=[pytest.mark.slow, pytest.mark.process])]


@pytest.fixture(scope="module", params=KINDS)
def run(request, tiny_dir):
    """``run(coro_fn)``: runs ``coro_fn(client)`` on a started client of the layout (module scope)."""
    from omnistream.checkpoints import load_omni

    client = InProcClient(load_omni(tiny_dir)) if request.param == "inproc" else \
        MultiProcClient(tiny_dir, request.param, hang_timeout_s=300)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(client.start())
    yield lambda fn: loop.run_until_complete(asyncio.wait_for(fn(client), 300))
    loop.run_until_complete(client.close())
    loop.close()
    if request.param != "inproc":
        assert not os.path.exists(client.run_dir)


async def reply(c, sid, options: ResponseOptions | None = None):
    """(text, pcm (n,) float32, the last event) of one respond()."""
    events = [ev async for ev in c.respond(sid, options or ResponseOptions())]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioDelta)] or [np.zeros(0, np.float32)])
    return text, pcm, events[-1]


# ---------------------------------------------------------------------------------- voice
def test_per_reply_voice_equals_a_session_opened_with_it(run):
    async def body(c):
        out = {}
        for name, opts, first in (("override", VOICE, ResponseOptions(voice="Ethan")),
                                  ("ethan", replace(VOICE, voice="Ethan"), None),
                                  ("chelsie", VOICE, None)):
            sid = await c.open_session(opts)
            await c.commit(sid, "hello there")
            a = await reply(c, sid, first)
            await c.commit(sid, "and again")
            b = await reply(c, sid)
            bad = await reply(c, sid, ResponseOptions(voice="Nobody"))  # refused before any work
            await c.close_session(sid)
            out[name] = a, b, bad
        return out

    out = run(body)
    (text, pcm, done), (_, pcm2, _), bad = out["override"]
    assert isinstance(done, ResponseDone) and len(pcm) > 0
    assert text == out["ethan"][0][0] == out["chelsie"][0][0]  # the voice does not change the text
    np.testing.assert_array_equal(pcm, out["ethan"][0][1])  # Ethan's speech, exactly
    assert len(pcm) != len(out["chelsie"][0][1]) or not np.array_equal(pcm, out["chelsie"][0][1])
    np.testing.assert_array_equal(pcm2, out["chelsie"][1][1])  # the next reply: the session's voice again
    assert isinstance(bad[2], SessionError) and "Nobody" in bad[2].message and bad[0] == "" and len(bad[1]) == 0


# ---------------------------------------------------------------------------------- items
async def _items_reply(c, script) -> str:
    """Open a text session, run ``script`` (a list of ops), reply; the reply text."""
    sid = await c.open_session(TEXT)
    for op, *args in script:
        if op == "add":
            item, role, text, *after = args
            await c.add_item(sid, item, role, text, after[0] if after else None)
        elif op == "commit":
            await c.commit(sid, args[1], item=args[0])
        elif op == "delete":
            await c.delete_item(sid, args[0])
        elif op == "reply":
            await reply(c, sid, ResponseOptions(item=args[0]))
    text, _, done = await reply(c, sid, ResponseOptions(item="r_last"))
    assert isinstance(done, ResponseDone) and c.take_errors(sid) == []
    await c.close_session(sid)
    return text


SYS = ("add", "s1", "system", "You answer in French.")
ASSISTANT = ("add", "a1", "assistant", "Bonjour, que puis-je faire ?")
USER = ("commit", "u1", "what is two plus two?")


def test_inserted_and_deleted_items_equal_plain_creation(run):

    async def body(c):
        plain = await _items_reply(c, [SYS, ASSISTANT, USER])
        inserted = await _items_reply(c, [USER, ("add", "a1", "assistant", ASSISTANT[3], "root"),
                                          ("add", "s1", "system", SYS[3], "root")])
        after = await _items_reply(c, [SYS, USER, ("add", "a1", "assistant", ASSISTANT[3], "s1")])
        deleted = await _items_reply(c, [SYS, ("commit", "junk", "ignore this"), ("reply", "r0"), ASSISTANT,
                                         ("delete", "junk"), ("delete", "r0"), USER])
        other = await _items_reply(c, [USER])  # control: the items matter
        return plain, inserted, after, deleted, other

    plain, inserted, after, deleted, other = run(body)
    assert plain and inserted == after == deleted == plain
    assert other != plain


def test_item_errors_leave_the_conversation_as_it_was(run):

    async def body(c):
        sid = await c.open_session(TEXT)
        await c.add_item(sid, "s1", "system", SYS[3])
        codes = []
        for call in (c.delete_item(sid, "nope"), c.add_item(sid, "x", "assistant", "hi", "nope"),
                     c.add_item(sid, "s1", "user", "again"), c.add_item(sid, "y", "tool", "hi"),
                     c.delete_item(sid, "z" * 300)):
            try:
                await call
            except ClientError as e:
                codes.append(e.code)
        await c.add_item(sid, "a1", "assistant", ASSISTANT[3])
        await c.commit(sid, USER[2], item="u1")
        text, _, done = await reply(c, sid)
        await c.close_session(sid)
        return codes, text, await _items_reply(c, [SYS, ASSISTANT, USER])

    codes, text, plain = run(body)
    assert codes == ["item_not_found", "item_not_found", "invalid_item", "invalid_item", "invalid_item"]
    assert text == plain


def test_out_of_band_reply_leaves_the_conversation(run):

    async def body(c):
        sid = await c.open_session(TEXT)
        await c.commit(sid, "hello there", item="u1")
        oob, _, _ = await reply(c, sid, ResponseOptions(out_of_band=True, instructions="Answer with one word."))
        await c.commit(sid, "what is two plus two?", item="u2")
        after, _, _ = await reply(c, sid, ResponseOptions(item="r1"))
        await c.close_session(sid)
        sid = await c.open_session(TEXT)  # never made it
        await c.commit(sid, "hello there", item="u1")
        await c.commit(sid, "what is two plus two?", item="u2")
        never, _, _ = await reply(c, sid, ResponseOptions(item="r1"))
        await c.close_session(sid)
        sid = await c.open_session(TEXT)  # the same reply in band
        await c.commit(sid, "hello there", item="u1")
        inband, _, _ = await reply(c, sid, ResponseOptions(instructions="Answer with one word.", item="r0"))
        await c.close_session(sid)
        return oob, after, never, inband

    oob, after, never, inband = run(body)
    assert after == never and oob == inband and oob


def test_block_sparse_dit_session_speaks_close_to_the_exact_one(run):
    """``SessionOptions.block_sparse_dit`` (``serve --block-sparse-dit``) reaches the token2wav worker:
    the seeded reply's audio differs from the exact path's (the option took effect) by no more than
    the block-sparse DiT's rounding (its mel is within 2e-6; the random BigVGAN amplifies that)."""
    async def body(c):
        out = []
        for opts in (VOICE, replace(VOICE, block_sparse_dit=True)):
            sid = await c.open_session(opts)
            await c.commit(sid, "hello there")
            out.append(await reply(c, sid))
            await c.close_session(sid)
        return out

    (text, exact, _), (text2, sparse, done) = run(body)
    assert isinstance(done, ResponseDone) and text == text2 and exact.shape == sparse.shape and exact.size
    assert not np.array_equal(exact, sparse)
    np.testing.assert_allclose(sparse, exact, atol=1e-3)
