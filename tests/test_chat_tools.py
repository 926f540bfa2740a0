"""OmniChat's function calling: tools and tool_choice reach the reply, calls are reported, outputs go back.

The tiny checkpoint has random weights: a call appears only because a forced ``tool_choice`` constrains
decoding; the arguments are checked against the tool's JSON schema by ``jsonschema`` (an independent
validator), and the spoken answer after the function's output by its PCM.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from omnistream.chat import OmniChat
from omnistream.model.talker import TalkerConfig
from omnistream.model.token2wav import StreamingConfig

SMALL = StreamingConfig(chunk_codes=12, left_codes=12, right_codes=6, vocoder_context_frames=8)
TOOLS = [
    {"type": "function", "name": "set_light", "description": "Switch a light.",
     "parameters": {"type": "object", "properties": {"room": {"type": "string", "enum": ["kitchen", "hall"]},
                                                     "on": {"type": "boolean"}},
                    "required": ["room", "on"], "additionalProperties": False}},
    {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}},
]


def test_forced_call_is_reported_not_spoken_and_the_answer_after_its_output_is(tiny):
    chat = OmniChat(tiny, voice="Chelsie", talker_config=TalkerConfig(max_new_tokens=25, seed=0), token2wav=SMALL)
    chat.say("lights in the kitchen please")
    events = list(chat.reply(200, seed=0, tools=TOOLS, tool_choice={"type": "function", "name": "set_light"},
                             instructions="Use the tools."))
    kinds = [e.kind for e in events]
    assert "audio" not in kinds and kinds[-1] == "call"  # a function call is never spoken
    (call,) = chat.reply_calls
    assert [e.call for e in events if e.kind == "call"] == [call] and call.name == "set_light"
    jsonschema.validate(json.loads(call.arguments), TOOLS[0]["parameters"])
    chat.function_output('{"ok": true}')
    events = list(chat.reply(8, seed=0, tools=TOOLS))  # auto: the model may answer in words (and does)
    assert any(e.kind == "audio" for e in events) and chat.stats.codec_tokens > 0
    assert chat.reply_calls == []


def test_bad_tools_or_choice_fail_before_decoding(tiny):
    chat = OmniChat(tiny)
    chat.say("hi")
    n = chat.thinker.n_tokens
    with pytest.raises(ValueError, match="not among the tools"):
        list(chat.reply(8, tools=TOOLS, tool_choice={"type": "function", "name": "launch"}))
    with pytest.raises(ValueError, match="name"):
        list(chat.reply(8, tools=[{"type": "function", "name": "bad name!"}]))
    assert chat.thinker.n_tokens == n  # nothing was prefilled or decoded
    text = "".join(e.text for e in chat.reply(4))  # the chat goes on
    assert chat.reply_ids and text == tiny.tokenizer.decode(chat.reply_ids, skip_special_tokens=True)
