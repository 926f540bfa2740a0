"""A whole conversation in process: streamed turn in, text + speech out, barge-in and truncation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omnistream.chat import OmniChat
from omnistream.model.talker import TalkerConfig
from omnistream.model.token2wav import StreamingConfig

GREEDY = TalkerConfig(do_sample=False, max_new_tokens=120)
SMALL = StreamingConfig(chunk_codes=12, left_codes=12, right_codes=6, vocoder_context_frames=8)


def collect(events):
    text, pcm, order = "", [], []
    for ev in events:
        order.append(ev.kind)
        if ev.kind == "text":
            text += ev.text
        else:
            pcm.append(ev.pcm)
    return text, (np.concatenate(pcm) if pcm else np.zeros(0, np.float32)), order


def test_text_only_chat_never_builds_the_talker(tiny):
    chat = OmniChat(tiny)
    assert chat.talker is None and not chat.thinker.record
    chat.say("hello there")
    text, pcm, order = collect(chat.reply(max_new_tokens=6))
    assert set(order) <= {"text"} and pcm.size == 0
    assert text == tiny.tokenizer.decode(chat.reply_ids, skip_special_tokens=True)


def test_spoken_reply_streams_text_and_pcm(tiny):
    chat = OmniChat(tiny, voice="Chelsie", talker_config=GREEDY, token2wav=SMALL)
    chat.say("tell me a story")
    text, pcm, order = collect(chat.reply(max_new_tokens=10, seed=0))
    s = chat.stats
    assert text == tiny.tokenizer.decode(chat.reply_ids, skip_special_tokens=True)
    assert s.codec_tokens == len(chat.reply_codes) > 0
    # every codec token became exactly 2 mel frames of 240 samples of speech
    assert pcm.shape == (480 * s.codec_tokens,) and np.isfinite(pcm).all() and np.abs(pcm).max() <= 1
    assert 0 < s.ttft_s <= s.first_audio_s <= s.decode_s
    assert order.count("audio") > 1  # chunk by chunk, not one blob at the end
    # the first chunk came out as soon as its codes and look-ahead existed
    assert chat._t2w.first_packet["codes"] == SMALL.first_packet_codes


def test_cancel_stops_within_one_chunk_and_truncation_keeps_what_was_heard(tiny):
    chat = OmniChat(tiny, voice="Chelsie", talker_config=GREEDY, token2wav=SMALL)
    chat.say("talk for a while")
    played, after_cancel = 0, 0
    for ev in chat.reply(max_new_tokens=40, seed=0):
        if ev.kind == "audio":
            if chat._cancel.is_set():
                after_cancel += 1
            else:
                played += len(ev.pcm)
                chat.cancel()  # the user talks over the first chunk
    assert chat.stats.cancelled and after_cancel == 0
    n_reply = chat.stats.reply_tokens
    full = list(chat.reply_ids)
    kept = chat.truncate_to_played(played)
    assert kept == min(n_reply, math.ceil(played / 480)) and chat.reply_ids == full[:kept]

    # Oracle: a fresh conversation in which the assistant said exactly the kept tokens.
    ref = OmniChat(tiny)
    ref.say("talk for a while")
    ref.thinker.append_text(full[:kept])
    ref.conv.text("<|im_end|>\n")
    for c in (chat, ref):
        c.say("and then?")
    assert chat.thinker.n_tokens == ref.thinker.n_tokens
    torch.testing.assert_close(chat.thinker.next_token_logits(), ref.thinker.next_token_logits(), atol=1e-5, rtol=0)
    # and the Talker follows: the next spoken reply works
    text, pcm, _ = collect(chat.reply(max_new_tokens=4, seed=1))
    assert pcm.size == 480 * chat.stats.codec_tokens > 0


@pytest.mark.slow
def test_windowed_chat_keeps_memory_bounded(tiny):
    from omnistream.chat import parse_window
    from omnistream.memory.window_cache import WindowConfig

    assert parse_window("600s").window_tokens == parse_window("600s", video=False).window_tokens
    assert parse_window("96").window_tokens == 96 and parse_window(None) is None
    chat = OmniChat(tiny, voice="Chelsie", talker_config=GREEDY, token2wav=SMALL,
                    window=WindowConfig(sink_tokens=4, window_tokens=48, chunk_tokens=32))
    sizes = set()
    for turn in range(4):  # far more tokens than the window holds
        chat.say(f"a fairly long user message number {turn} that keeps the conversation going")
        text, pcm, _ = collect(chat.reply(max_new_tokens=8, seed=turn))
        assert pcm.size == 480 * chat.stats.codec_tokens > 0
        sizes.add(chat.thinker.cache.memory_bytes())
    assert chat.thinker.n_tokens > 4 * 48  # seen
    assert len(sizes) == 1  # preallocated, never grown


def test_cancel_between_replies_does_not_mute_the_next_and_late_truncate_is_refused(tiny):
    """A barge-in that lands after a reply ended must not silence the next reply, and a truncation
    that arrives after the user's next turn began must not cut into that turn."""
    from omnistream.model.talker import TalkerConfig

    chat = OmniChat(tiny, voice="Chelsie", talker_config=TalkerConfig(max_new_tokens=30, seed=0))
    chat.say("hello")
    first = list(chat.reply(max_new_tokens=6, seed=0))
    assert any(e.kind == "audio" for e in first)
    chat.cancel()  # between replies: nothing is running
    chat.say("again")
    second = list(chat.reply(max_new_tokens=6, seed=0))
    assert sum(len(e.pcm) for e in second if e.kind == "audio") > 0
    chat.begin_turn(audio=False, video=False)  # the user's next turn has begun
    n = chat.thinker.n_tokens
    with pytest.raises(RuntimeError, match="moved on"):
        chat.truncate_to_played(480)
    assert chat.thinker.n_tokens == n
    chat.end_turn("ok")
    assert list(chat.reply(max_new_tokens=2))
