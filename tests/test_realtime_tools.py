"""Function calling, per-response settings and usage (issue 14).

Oracles, independent of the code under test:

* the tools section must be the text Qwen2.5's chat template renders (a capture of vLLM's
  ``apply_chat_template`` output, written out here by hand);
* a forced call (``tool_choice`` ``required`` / a named function) must validate with ``jsonschema``
  against the tool's schema, from the random-weight tiny checkpoint, greedy and sampled; the same
  prompt decoded freely gives no valid call (so the grammar is what makes it valid);
* after a reply with its own instructions and tools, the context must be what transformers' own
  Thinker computes for the conversation *without* them (next-token logits), and ``usage`` must equal
  the tokenizer's count of the prefilled text and the length of transformers' greedy reply;
* batched equals solo: sessions with and without a forced call, decoded in one batch, each equal
  their solo run;
* the official ``openai`` SDK against ``omnistream serve`` (in process) sees the protocol's events;
  the split layout (stage processes) gives the in-process results.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from omnistream.engine.conversation import SYSTEM_PROMPT, Conversation
from omnistream.engine.tools import (
    CallSplitter,
    ToolCall,
    check_tool_choice,
    check_tools,
    format_call,
    parse_tool_calls,
    tool_response,
    tools_block,
)
from omnistream.runtime.client import (
    ArgumentsDelta,
    AudioDelta,
    InProcClient,
    ResponseDone,
    ResponseOptions,
    SessionOptions,
    TextDelta,
)

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.timeout(300)

LIGHT = {"type": "object", "properties": {"room": {"type": "string", "enum": ["kitchen", "hall", "attic"]},
                                          "on": {"type": "boolean"}},
         "required": ["room", "on"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "local"]},
                                         "precise": {"type": "boolean"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "set_light", "description": "Switch a light.", "parameters": LIGHT},
         {"type": "function", "name": "get_time", "parameters": TIME}]
SCHEMAS = {"set_light": LIGHT, "get_time": TIME}


def _valid(call: ToolCall, allowed) -> None:
    assert call.name in allowed
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


# ---------------------------------------------------------------------------------- the format
def test_tools_block_is_qwen25_template_text():
    tools = check_tools([{"type": "function", "name": "execute_python", "description": "Run python",
                          "parameters": {"type": "object", "properties": {"thought": {"type": "string"},
                                                                          "code": {"type": "string"}},
                                         "required": ["thought", "code"]}}])
    expected = (  # Qwen2.5's template, as vLLM rendered it (system turn with tools, up to <|im_end|>)
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "execute_python", "description": "Run python", "parameters": '
        '{"type": "object", "properties": {"thought": {"type": "string"}, "code": {"type": "string"}}, '
        '"required": ["thought", "code"]}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    assert tools_block(tools) == expected
    assert tool_response("42") == "<tool_response>\n42\n</tool_response>"


def test_bad_tools_and_choices_are_refused():
    for bad in ([{"type": "code_interpreter"}], [{"name": "a b"}], [{"name": "f"}, {"name": "f"}],
                [{"name": "f", "parameters": {"type": "array"}}], [{"name": "f", "extra": 1}], {"name": "f"}):
        with pytest.raises(ValueError):
            check_tools(bad)
    tools = check_tools(TOOLS)
    assert check_tool_choice({"type": "function", "name": "get_time"}, tools) == "function:get_time"
    for bad in ("sometimes", {"type": "function", "name": "nope"}, 3):
        with pytest.raises(ValueError):
            check_tool_choice(bad, tools)


def test_parse_calls_and_hold_them_back_while_streaming():
    tools = check_tools(TOOLS)
    call = ToolCall("get_time", '{"zone": "utc"}')
    text = "Let me look.\n" + format_call(call) + "\n" + "<tool_call>\nnot json\n</tool_call>"
    shown, calls = parse_tool_calls(text, tools)
    assert calls == [call] and "Let me look." in shown and "not json" in shown and "get_time" not in shown
    assert parse_tool_calls(format_call(ToolCall("unknown", "{}")), tools)[1] == []
    sp, out = CallSplitter(), []
    for ch in "Hi <tool and more " + format_call(call):  # one character at a time
        out.append(sp.push(ch))
    assert "".join(out) + sp.flush() == "Hi <tool and more " and sp.calling


# ---------------------------------------------------------------------------------- forced calls
@pytest.mark.parametrize("choice,allowed", [("required", {"set_light", "get_time"}),
                                            ("function:get_time", {"get_time"})])
def test_forced_call_validates_against_the_schema(tiny, choice, allowed):
    tools = check_tools(TOOLS)
    for temperature, seed in ((0.0, None), (1.0, 0), (1.5, 2)):
        c = Conversation(tiny)
        c.end_turn("What time is it? And switch on the kitchen light.")
        r = c.begin_reply(200, temperature, seed, tools=tools, tool_choice=choice)
        texts = [text for _, text in c.decode(r)]
        c.end_reply()
        assert r.ended and not any(texts)  # a call is not text for the user
        text, calls = r.result()
        assert text == "" and len(calls) == 1, r.result()
        _valid(calls[0], allowed)
    free = Conversation(tiny)  # control: the same prompt decoded freely is no call
    free.end_turn("What time is it? And switch on the kitchen light.")
    r = free.begin_reply(60, tools=tools, tool_choice="auto")  # (a forced call takes ~70 tokens here)
    list(free.decode(r))
    assert r.calls == []


def test_forced_call_with_length_bounded_strings_is_json(tiny):
    """xgrammar's length-bounded strings let raw control characters through (a robot ``navigate`` call
    once held ``\x1e``): the grammar gets them as a pattern of plain characters, and every sampled call
    parses with a strict JSON parser and validates against the original schema."""
    say = {"type": "object", "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 40}},
           "required": ["text"], "additionalProperties": False}
    tools = check_tools([{"type": "function", "name": "say", "description": "Say something.", "parameters": say}])
    for seed in range(4):
        c = Conversation(tiny)
        c.end_turn("Tell the robot where to go.")
        r = c.begin_reply(120, 1.5, seed, tools=tools, tool_choice="required")
        list(c.decode(r))
        c.end_reply()
        calls = r.result()[1]
        assert len(calls) == 1, r.result()
        args = json.loads(calls[0].arguments)  # strict: no raw control characters
        jsonschema.validate(args, say)


def _hf_greedy(ck, ids: list[int], n: int, stop) -> list[int]:
    """transformers' own Thinker, no cache: greedy tokens after ``ids`` (the oracle)."""
    out, x = [], list(ids)
    with torch.inference_mode():
        for _ in range(n):
            t = int(ck.thinker(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long))
                    .logits[0, -1].argmax())
            out.append(t)
            x.append(t)
            if t in stop:
                break
    return out


def test_reply_settings_leave_the_context_and_usage_counts(tiny):
    tok, tools = tiny.tokenizer, check_tools(TOOLS)
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    c = Conversation(tiny)
    c.end_turn("hello there")
    r = c.begin_reply(12, instructions="Answer in one word.", tools=tools, tool_choice="none")
    list(c.decode(r))
    c.end_reply()
    # "none": the tools are not offered; the instructions are, for this reply only
    prompt = ids(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
                 "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>assistant\n")
    expect = _hf_greedy(tiny, prompt, 12, c.stop_ids)
    assert r.tokens == expect
    assert r.usage()["input_tokens"] == len(prompt) and r.usage()["output_tokens"] == len(expect)
    # the next reply (with tools) sees the conversation without the first reply's instructions
    c.end_turn("and now?")
    r2 = c.begin_reply(1, tools=tools, tool_choice="auto")
    history = ids(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
                  "<|im_start|>assistant\n") + r.tokens + ([] if r.ended else ids("<|im_end|>")) + ids("\n")
    turn = ids(f"<|im_start|>user\nand now?<|im_end|>\n<|im_start|>system\n{tools_block(tools)}<|im_end|>\n"
               "<|im_start|>assistant\n")
    with torch.inference_mode():
        x = torch.tensor([history + turn])
        ref = tiny.thinker(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
    assert torch.allclose(c.thinker.next_token_logits(), ref, atol=1e-4)
    assert r2.usage()["input_tokens"] == len(turn)
    list(c.decode(r2))
    c.end_reply()
    # ... and after it, nothing of the tools is left either
    c.end_turn("bye")
    r3 = c.begin_reply(1)
    history += ids("<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n") + r2.tokens + \
        ([] if r2.ended else ids("<|im_end|>")) + ids("\n") + ids("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")
    with torch.inference_mode():
        x = torch.tensor([history])
        ref = tiny.thinker(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
    assert torch.allclose(c.thinker.next_token_logits(), ref, atol=1e-4)
    assert r3.usage()["input_tokens"] == len(ids("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"))


# ---------------------------------------------------------------------------------- through the client
SESSIONS = {  # name -> (session options, user text, response options)
    "forced": (SessionOptions(max_new_tokens=8), "lights please",
               ResponseOptions(max_new_tokens=200, tools=check_tools(TOOLS), tool_choice="required")),
    "plain": (SessionOptions(max_new_tokens=14), "tell me a long story about the sea", None),
    "named": (SessionOptions(max_new_tokens=8, temperature=1.0, seed=5), "what time is it",
              ResponseOptions(max_new_tokens=200, tools=check_tools(TOOLS), tool_choice="function:get_time",
                              instructions="Use the tools.")),
    "spoken": (SessionOptions(voice="Chelsie", max_new_tokens=6, max_speech_s=0.4, seed=1), "hi",
               ResponseOptions(audio=False)),  # a voice session, a text-only reply
}


async def _session(c, name):
    options, text, ropts = SESSIONS[name]
    sid = await c.open_session(options)
    await c.commit(sid, text)
    texts, audio, done, args = [], 0, None, []
    async for ev in (c.respond(sid, ropts) if ropts is not None else c.respond(sid)):
        if isinstance(ev, TextDelta):
            texts.append(ev.text)
        elif isinstance(ev, ArgumentsDelta):
            args.append((ev.name, ev.text))
        elif isinstance(ev, AudioDelta):
            audio += len(ev.pcm)
        elif isinstance(ev, ResponseDone):
            done = ev
    await c.close_session(sid)
    assert done is not None and "".join(texts) == done.text
    return "".join(texts), audio, done.tool_calls, done.usage, args


def _run_all(client, names, together: bool):
    async def main():
        await client.start()
        try:
            if together:
                return dict(zip(names, await asyncio.gather(*[_session(client, n) for n in names]))), client.status()
            return {n: await _session(client, n) for n in names}, client.status()
        finally:
            await client.close()

    return asyncio.run(asyncio.wait_for(main(), 240))


def _check_results(out):
    _valid(out["forced"][2][0], {"set_light", "get_time"})
    _valid(out["named"][2][0], {"get_time"})
    for name in ("forced", "named"):
        text, audio, calls, usage, args = out[name]
        assert text == "" and audio == 0 and len(calls) == 1 and usage["output_tokens"] > 0
        assert {n for n, _ in args} == {calls[0].name} and "".join(a for _, a in args) == calls[0].arguments
    assert out["plain"][2] == [] and out["plain"][0]
    assert out["spoken"][1] == 0  # text only: no audio at all, though the session has a voice


def test_batched_forced_calls_equal_solo(tiny):
    solo = {n: _run_all(InProcClient(tiny), [n], False)[0][n] for n in SESSIONS}
    batched, status = _run_all(InProcClient(tiny), list(SESSIONS), True)
    assert batched == solo
    assert status["scheduler"]["thinker"]["thinker.decode"]["max_batch"] > 1
    _check_results(batched)


@pytest.mark.slow
@pytest.mark.process
def test_split_layout_equals_in_process(tiny, tiny_dir):
    from omnistream.runtime.procclient import MultiProcClient

    inproc = _run_all(InProcClient(tiny), list(SESSIONS), False)[0]
    split = _run_all(MultiProcClient(tiny_dir, "split", hang_timeout_s=300), list(SESSIONS), False)[0]
    assert split == inproc
    _check_results(split)


# ---------------------------------------------------------------------------------- the openai SDK
openai = pytest.importorskip("openai")


def test_openai_sdk_function_calling(tiny):
    from omnistream.apps.server import ServerConfig, serving

    tok = tiny.tokenizer
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}

    async def until_done(conn, events):
        async for ev in conn:
            events.append(ev)
            if ev.type == "error":
                pytest.fail(f"server error: {ev.error}")
            if ev.type == "response.done":
                return ev.response

    async def body():
        cfg = ServerConfig(port=0, api_key="sk-test", defaults=SessionOptions(max_new_tokens=8, max_speech_s=0.4,
                                                                               seed=1))
        async with serving(InProcClient(tiny), cfg) as server:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-test")
            async with client.realtime.connect(model="omnistream") as conn:
                await conn.session.update(session={
                    "type": "realtime", "output_modalities": ["audio"], "tools": TOOLS, "tool_choice": "auto",
                    "audio": {"input": {"turn_detection": None}, "output": {"voice": "marin"}}})
                first, calls, rest = [], [], []
                # 1. a text-only reply in a voice session, with its own instructions and token limit
                await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "hello"}]})
                await conn.response.create(response={"output_modalities": ["text"], "instructions": "Be brief.",
                                                     "max_output_tokens": 6, "tool_choice": "none"})
                r1 = await until_done(conn, first)
                # 2. a forced call
                await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "switch on the light"}]})
                await conn.response.create(response={"tool_choice": "required", "max_output_tokens": 200})
                r2 = await until_done(conn, calls)
                call = next(e for e in calls if e.type == "response.function_call_arguments.done")
                # 3. its output, then the conversation goes on
                await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                          "output": '{"ok": true}'})
                await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
                r3 = await until_done(conn, rest)
            return r1, first, r2, calls, call, r3, rest

    r1, first, r2, calls, call, r3, rest = asyncio.run(asyncio.wait_for(body(), 200))
    from test_openai_sdk import _models

    models = _models()
    for e in first + calls + rest:  # every event is a valid instance of the SDK's model for its type
        models[e.type].model_validate(e.model_dump(exclude_unset=True))
    # 1: text only, usage = the prefilled prompt and transformers' greedy reply
    types = [e.type for e in first]
    assert not any("audio" in t and "transcript" not in t for t in types) and "response.output_text.delta" in types
    prompt = ids(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                 "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n")
    expect = _hf_greedy(tiny, prompt, 6, stop)
    assert r1.usage.input_tokens == len(prompt) and r1.usage.output_tokens == len(expect)
    assert r1.output[0].content[0].text == tok.decode([t for t in expect if t not in stop])
    # 2: one function_call item, arguments valid, nothing spoken
    types = [e.type for e in calls]
    assert not any(t.startswith("response.output_audio") for t in types)
    assert [o.type for o in r2.output] == ["function_call"] and r2.status == "completed"
    item = r2.output[0]
    assert item.call_id == call.call_id and item.arguments == call.arguments and item.name == call.name
    _valid(ToolCall(call.name, call.arguments), {"set_light", "get_time"})
    deltas = [e for e in calls if e.type == "response.function_call_arguments.delta"]
    assert "".join(e.delta for e in deltas) == call.arguments and len(deltas) > 1  # streamed as decoded
    order = [e.type for e in calls]
    assert order.index("response.output_item.added") < order.index("response.function_call_arguments.delta") < \
        order.index("response.function_call_arguments.done") < order.index("response.output_item.done")
    # 3: the output is a <tool_response> turn; usage counts exactly it plus the tools' system turn
    turn = ids(f"<|im_start|>user\n{tool_response(json.dumps({'ok': True}))}<|im_end|>\n<|im_start|>system\n"
               f"{tools_block(check_tools(TOOLS))}<|im_end|>\n<|im_start|>assistant\n")
    assert r3.usage.input_tokens == len(turn) and 0 < r3.usage.output_tokens <= 4
    assert [o.type for o in r3.output] == ["message"]
    assert not any(e.type.startswith("response.output_audio") for e in rest)
    created = [e.item for e in rest if e.type == "conversation.item.created"]
    assert created[0].type == "function_call_output" and created[0].call_id == call.call_id


def test_bad_function_output_and_choice_get_errors(tiny):
    from omnistream.apps.server import ServerConfig, serving

    async def body():
        import websockets

        cfg = ServerConfig(port=0, defaults=SessionOptions(max_new_tokens=4))
        async with serving(InProcClient(tiny), cfg) as server:
            async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
                async def expect(ev, code):
                    await ws.send(json.dumps(ev))
                    while True:
                        m = json.loads(await ws.recv())
                        if m["type"] == "error":
                            assert m["error"]["code"] == code, m
                            return

                await expect({"type": "conversation.item.create", "item": {
                    "type": "function_call_output", "call_id": "call_nope", "output": "x"}}, "invalid_value")
                await expect({"type": "session.update", "session": {"tool_choice": {"type": "function",
                                                                                     "name": "f"}}}, "invalid_value")
                await expect({"type": "response.create", "response": {"tool_choice": "required"}}, "invalid_value")
                await expect({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f",
                                                                               "parameters": {"type": "array"}}]}},
                             "invalid_value")
                await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
                while (m := json.loads(await ws.recv()))["type"] != "response.done":
                    pass
                return m

    done = asyncio.run(asyncio.wait_for(body(), 120))
    assert done["response"]["status"] in ("completed", "incomplete")
    assert done["response"]["usage"]["input_tokens"] > 0  # the system prompt, prefilled for the first reply


def test_reply_settings_with_a_window_cache(tiny):
    """A window holding the session cuts the reply's system turn out exactly as the growing cache
    does; a window that already evicted past it keeps it (and the conversation goes on)."""
    from omnistream.engine.turns import parse_window

    tools = check_tools(TOOLS)
    logits = {}
    for spec in (None, "4096", "64"):
        c = Conversation(tiny, window=parse_window(spec))
        c.end_turn("hello")
        r = c.begin_reply(6, instructions="Be brief.", tools=tools, tool_choice="function:get_time")
        list(c.decode(r))
        c.end_reply()
        c.end_turn("and?")
        logits[spec] = c.thinker.next_token_logits()
    assert torch.allclose(logits["4096"], logits[None], atol=1e-4)
    assert torch.isfinite(logits["64"]).all()


def test_beta_dialect_function_call(tiny):
    """The beta session shape (flat fields, ``modalities``) takes tools too; a named choice forces that call."""
    from omnistream.apps.server import ServerConfig, serving

    async def body():
        import websockets

        async with serving(InProcClient(tiny), ServerConfig(port=0, defaults=SessionOptions(max_new_tokens=4))) as sv:
            async with websockets.connect(f"ws://127.0.0.1:{sv.port}/v1/realtime",
                                          additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
                for ev in ({"type": "session.update", "session": {
                                "modalities": ["text"], "turn_detection": None, "tools": TOOLS,
                                "tool_choice": {"type": "function", "name": "get_time"}}},
                           {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                                         "content": [{"type": "input_text",
                                                                                      "text": "time?"}]}},
                           {"type": "response.create", "response": {"max_output_tokens": 200}}):
                    await ws.send(json.dumps(ev))
                events = []
                while not events or events[-1]["type"] != "response.done":
                    events.append(json.loads(await ws.recv()))
                return events

    events = asyncio.run(asyncio.wait_for(body(), 120))
    assert not [e for e in events if e["type"] == "error"], events
    upd = next(e for e in events if e["type"] == "session.updated")["session"]
    assert upd["tool_choice"] == {"type": "function", "name": "get_time"} and upd["tools"][1]["name"] == "get_time"
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["name"] == "get_time"
    _valid(ToolCall(done["name"], done["arguments"]), {"get_time"})
    out = events[-1]["response"]["output"]
    assert [o["type"] for o in out] == ["function_call"] and out[0]["call_id"] == done["call_id"]
    assert not any("text.delta" in e["type"] or "audio" in e["type"] for e in events)
