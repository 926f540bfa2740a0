"""Conversation items in the engine core (issue 14): messages inserted anywhere, items deleted,
out-of-band replies -- with the Thinker's cache and the Talker's prompt rows kept consistent.

Oracle, independent of the item log: a fresh ``StreamingThinker`` (recording, as a Talker feed
needs) given the resulting item sequence directly -- chat-template text as token ids, audio turns
through ``append_audio`` with the same encoded blocks, a decoded reply as the ids it was decoded
as. After every edit the conversation must hold as many tokens at the same TMRoPE positions, its
next-token logits must agree within 1e-5, the next greedy reply must be the same tokens, and the
rows the Talker was handed (a recording feed) must equal the oracle's records.
"""

from __future__ import annotations

import pytest
import torch

from omnistream.engine.conversation import Conversation, ItemError
from omnistream.memory.window_cache import WindowConfig
from omnistream.model.thinker import StreamingThinker, window_thinker

pytestmark = pytest.mark.timeout(300)
ATOL = 1e-5


class Rows:
    """A recording Talker feed: the prompt rows (embeds, hidden, positions) the Talker would hold."""

    def __init__(self):
        self.e = self.h = self.p = None

    def prompt_rows(self, embeds, hidden, positions, next_position) -> None:
        self.e = embeds.clone() if self.e is None else torch.cat([self.e, embeds])
        self.h = hidden.clone() if self.h is None else torch.cat([self.h, hidden])
        self.p = positions.clone() if self.p is None else torch.cat([self.p, positions], dim=1)

    def truncate_prompt(self, n_tokens: int) -> None:
        self.e, self.h, self.p = self.e[:n_tokens], self.h[:n_tokens], self.p[:, :n_tokens]


def ids(tiny, s: str) -> list[int]:
    return tiny.tokenizer(s, add_special_tokens=False).input_ids


def msg(tiny, role: str, text: str) -> list[int]:
    return ids(tiny, f"<|im_start|>{role}\n{text}<|im_end|>\n")


@pytest.fixture(scope="module")
def blocks(tiny):
    """Two encoded 2-s audio blocks and a short one (the audio tower on random log-mel)."""
    mel = torch.randn(128, 460, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return [tiny.thinker.model.get_audio_features(mel[None, :, s:s + 200],
                                                      torch.ones(1, mel[:, s:s + 200].shape[1], dtype=torch.long))
                .last_hidden_state for s in range(0, mel.shape[1], 200)]


def audio_turn(c: Conversation, blocks, text: str, item_id: str) -> None:
    c.begin_turn(audio=True, video=False)
    for b in blocks:
        c.append_audio(b)
    c.end_turn(text, item_id=item_id)


def reply_ids(tiny, r, prefix: bool = True) -> list[int]:
    """What a decoded reply is in the context: its turn's framing, its tokens, the closing tags."""
    return (ids(tiny, "<|im_start|>assistant\n") if prefix else []) + r.tokens + \
        ([] if r.ended else ids(tiny, "<|im_end|>")) + ids(tiny, "\n")


def oracle(tiny, steps, window=None) -> StreamingThinker:
    """A fresh Thinker given ``steps``: token id lists, or ("audio", blocks, text) user turns."""
    th = StreamingThinker(tiny.thinker, tokenizer=tiny.tokenizer, record=True) if window is None else \
        window_thinker(tiny.thinker, window, tokenizer=tiny.tokenizer, record=True)
    for s in steps:
        if isinstance(s, tuple):
            th.append_text(ids(tiny, "<|im_start|>user\n"))
            th.append_audio(s[1])
            th.append_text(ids(tiny, f"{s[2]}<|im_end|>\n"))
        else:
            th.append_text(s)
    return th


def system(tiny) -> list[int]:
    from omnistream.engine.conversation import SYSTEM_PROMPT

    return msg(tiny, "system", SYSTEM_PROMPT)


def assert_same(tiny, c: Conversation, ref: StreamingThinker, rows: Rows | None, n_reply: int = 6) -> None:
    """Caches equal: length, positions, logits, the Talker's rows, and the next greedy reply."""
    n = ref.n_tokens
    assert c.thinker.n_tokens == n
    assert torch.equal(c.thinker.rope.positions[:, :n], ref.rope.positions[:, :n])
    assert torch.allclose(c.thinker.next_token_logits(), ref.next_token_logits(), atol=ATOL)
    if rows is not None:
        e, h = ref.records(0, n)
        assert rows.e.shape[0] == n and torch.equal(rows.p, ref.rope.positions[:, :n])
        assert torch.allclose(rows.e, e, atol=ATOL) and torch.allclose(rows.h, h, atol=ATOL)
    r = c.begin_reply(n_reply)
    if c.thinker.n_tokens > n:  # no assistant turn was open: the reply opened one
        ref.append_text(ids(tiny, "<|im_start|>assistant\n"))
    assert c.thinker.n_tokens == ref.n_tokens
    got = [(step.token, c.thinker.next_token_logits().clone()) for step, _ in c.decode(r)]
    c.end_reply()
    for tok, logits in got:
        assert int(torch.argmax(ref.next_token_logits())) == tok
        ref.append_text([tok])
        assert torch.allclose(logits, ref.next_token_logits(), atol=ATOL)


def start(tiny, blocks, rows: Rows | None = None, window=None):
    """u1 (typed), a1 (a greedy reply), u2 (audio + text): the conversation most tests edit."""
    c = Conversation(tiny, feed=rows, window=window)
    c.end_turn("hello there", item_id="u1")
    r = c.begin_reply(5)
    list(c.decode(r))
    c.end_reply(item_id="a1")
    audio_turn(c, blocks, "what is this?", "u2")
    return c, r


# ---------------------------------------------------------------------------------- edits
def test_delete_an_item_in_the_middle(tiny, blocks):
    rows = Rows()
    c, r = start(tiny, blocks, rows)
    c.delete_item("u1")
    assert c.item_ids() == ["a1", "u2"]
    ref = oracle(tiny, [system(tiny), reply_ids(tiny, r), ("audio", blocks, "what is this?"),
                        ids(tiny, "<|im_start|>assistant\n")])
    assert_same(tiny, c, ref, rows)


def test_insert_after_an_item_at_the_root_and_every_role(tiny, blocks):
    rows = Rows()
    c, r = start(tiny, blocks, rows)
    c.add_message("s1", "system", "Be kind.", after="u1")
    c.add_message("m0", "user", "first things first", after="root")
    c.add_message("x1", "assistant", "Sure.", after="a1")
    assert c.item_ids() == ["m0", "u1", "s1", "a1", "x1", "u2"]
    ref = oracle(tiny, [system(tiny), msg(tiny, "user", "first things first"), msg(tiny, "user", "hello there"),
                        msg(tiny, "system", "Be kind."), reply_ids(tiny, r), msg(tiny, "assistant", "Sure."),
                        ("audio", blocks, "what is this?"), ids(tiny, "<|im_start|>assistant\n")])
    assert_same(tiny, c, ref, rows)


def test_an_appended_message_takes_the_open_prefix_place(tiny, blocks):
    """Appended after a closed turn, a message replaces the unanswered assistant prefix; the next reply answers it."""
    c, r = start(tiny, blocks)
    c.add_message("m9", "user", "and then?")
    c.delete_item("u1")  # an edit before it: still no prefix after the appended message
    ref = oracle(tiny, [system(tiny), reply_ids(tiny, r), ("audio", blocks, "what is this?"),
                        msg(tiny, "user", "and then?")])
    assert_same(tiny, c, ref, None)


def test_a_truncated_reply_is_replayed_as_heard(tiny, blocks):
    rows = Rows()
    c = Conversation(tiny, feed=rows)
    c.end_turn("hello there", item_id="u1")
    r = c.begin_reply(8)
    list(c.decode(r))
    c.end_reply(item_id="a1")
    assert c.truncate_to_played(2 * c.rates.samples_per_code) == 2
    audio_turn(c, blocks, "and this?", "u2")
    c.add_message("m0", "system", "Answer briefly.", after="root")
    heard = ids(tiny, "<|im_start|>assistant\n") + r.tokens[:2] + ids(tiny, "<|im_end|>\n")
    ref = oracle(tiny, [system(tiny), msg(tiny, "system", "Answer briefly."), msg(tiny, "user", "hello there"), heard,
                        ("audio", blocks, "and this?"), ids(tiny, "<|im_start|>assistant\n")])
    assert_same(tiny, c, ref, rows)


def test_truncate_to_played_follows_an_edit_before_the_reply(tiny):
    c = Conversation(tiny)
    c.end_turn("hello there", item_id="u1")
    r = c.begin_reply(8)
    list(c.decode(r))
    c.end_reply(item_id="a1")
    c.add_message("m0", "user", "a much longer first message than the other", after="root")
    assert c.truncate_to_played(3 * c.rates.samples_per_code) == 3
    heard = ids(tiny, "<|im_start|>assistant\n") + r.tokens[:3] + ids(tiny, "<|im_end|>\n")
    ref = oracle(tiny, [system(tiny), msg(tiny, "user", "a much longer first message than the other"),
                        msg(tiny, "user", "hello there"), heard])
    assert_same(tiny, c, ref, None)


def test_a_reply_with_its_own_instructions_is_replayed_without_them(tiny):
    """The reply's system turn (instructions, tools) left the context at end_reply: its item is the reply alone."""
    c = Conversation(tiny)
    c.end_turn("hello there", item_id="u1")
    list(c.decode(r := c.begin_reply(5, instructions="Answer in one word.")))
    c.end_reply(item_id="a1")
    c.end_turn("why?", item_id="u2")
    c.delete_item("u1")
    ref = oracle(tiny, [system(tiny), reply_ids(tiny, r), msg(tiny, "user", "why?"), ids(tiny, "<|im_start|>assistant\n")])
    assert_same(tiny, c, ref, None)


def test_deleting_the_last_reply_ends_its_truncation(tiny):
    c = Conversation(tiny)
    c.end_turn("hello", item_id="u1")
    list(c.decode(c.begin_reply(4)))
    c.end_reply(item_id="a1")
    c.delete_item("a1")
    with pytest.raises(RuntimeError, match="no reply"):
        c.truncate_to_played(480)
    assert_same(tiny, c, oracle(tiny, [system(tiny), msg(tiny, "user", "hello")]), None)


# ---------------------------------------------------------------------------------- windows
def test_a_window_cache_edits_inside_the_window_and_refuses_evicted_items(tiny, blocks):
    big = WindowConfig(window_tokens=4096, sink_tokens=4)
    c, r = start(tiny, blocks, window=big)
    c.delete_item("u1")  # nothing evicted: the window's crop is exact
    ref = oracle(tiny, [system(tiny), reply_ids(tiny, r), ("audio", blocks, "what is this?"),
                        ids(tiny, "<|im_start|>assistant\n")], window=big)
    assert_same(tiny, c, ref, None)

    small = WindowConfig(window_tokens=64, sink_tokens=4, chunk_tokens=64)
    c, _ = start(tiny, blocks, window=small)
    assert c.thinker.cache.evicted
    before = (c.item_ids(), c.thinker.n_tokens, c.thinker.next_token_logits().clone())
    for op in (lambda: c.delete_item("u1"), lambda: c.add_message("m", "user", "x", after="u1")):
        with pytest.raises(ItemError) as e:
            op()
        assert e.value.code == "item_evicted"
    assert (c.item_ids(), c.thinker.n_tokens) == before[:2] and torch.equal(c.thinker.next_token_logits(), before[2])
    assert c.items.items[0].recipe is None  # an evicted item's recipe (and its media) is freed
    n = c.thinker.n_tokens - len(ids(tiny, "<|im_start|>assistant\n"))  # (the message takes the prefix's place)
    c.add_message("m", "user", "and?")  # appended inside the window: fine
    assert c.item_ids()[-1] == "m" and c.thinker.n_tokens == n + len(msg(tiny, "user", "and?"))
    c.delete_item("m")
    assert c.thinker.n_tokens == n and c.item_ids() == before[0]


def test_an_open_turn_longer_than_the_window_keeps_no_media(tiny, blocks):
    """A turn whose first token a window evicts while it is still open can never be replayed: its
    recipe (the media embeddings) is dropped at once, not held until the turn ends."""
    c = Conversation(tiny, window=WindowConfig(window_tokens=64, sink_tokens=4, chunk_tokens=64))
    c.begin_turn(audio=True, video=False)
    c.append_audio(blocks[0])
    assert c._journal and c._can_cut(c.turn_start)  # recording while the turn can still be cut to
    for b in blocks[1:] * 3:
        c.append_audio(b)
    assert c.thinker.cache.evicted and c._journal is None
    c.end_turn("what is this?", item_id="u1")
    assert c.items.items[-1].recipe is None
    with pytest.raises(ItemError) as e:
        c.delete_item("u1")
    assert e.value.code == "item_evicted"


def test_segments_cut_by_segment_s_are_replayed_as_cut(tiny, blocks):
    """With a window and segment_s = 2 s each 2-s audio block gets a segment of its own; an edit
    before the turn replays the same cuts (the oracle: one audio segment per block)."""
    win = WindowConfig(window_tokens=4096, sink_tokens=4)
    c = Conversation(tiny, window=win, segment_s=2.0)
    c.end_turn("hello there", item_id="u1")
    audio_turn(c, blocks, "what is this?", "u2")
    assert c.segments_cut == 2
    c.delete_item("u1")
    th = oracle(tiny, [system(tiny), ids(tiny, "<|im_start|>user\n")], window=win)
    for b in blocks:
        th.append_audio([b])
    th.append_text(ids(tiny, "what is this?<|im_end|>\n<|im_start|>assistant\n"))
    assert_same(tiny, c, th, None)


def test_an_audio_and_video_turn_is_replayed(tiny, blocks):
    """A camera + microphone turn (audio in video) after the edit is prefilled again with its patches."""
    D = tiny.thinker.config.text_config.hidden_size
    g = torch.Generator().manual_seed(5)
    patches = [torch.randn(64, D, generator=g) * 0.02 for _ in range(2)]
    rows = Rows()
    c = Conversation(tiny, feed=rows)
    c.end_turn("hello there", item_id="u1")
    c.begin_turn(audio=True, video=True)
    c.append_video(patches[0], (1, 16, 16))
    c.append_audio(blocks[0])
    c.append_video(patches[1], (1, 16, 16))
    c.end_turn("look", item_id="u2")
    c.add_message("m0", "user", "first", after="root")
    th = oracle(tiny, [system(tiny), msg(tiny, "user", "first"), msg(tiny, "user", "hello there"),
                       ids(tiny, "<|im_start|>user\n")])
    th.begin_video(1.0, with_audio=True)
    th.append_video_patch(patches[0], (1, 16, 16))
    th.append_audio_block(blocks[0])
    th.append_video_patch(patches[1], (1, 16, 16))
    th.end_segment()
    th.append_text(ids(tiny, "look<|im_end|>\n<|im_start|>assistant\n"))
    assert c.items.items[-1].media == {"audio": blocks[0].shape[0], "video": 128}
    assert_same(tiny, c, th, rows)


# ---------------------------------------------------------------------------------- out of band
@pytest.mark.parametrize("instructions", [None, "Answer in one word."])
def test_an_out_of_band_reply_leaves_no_trace(tiny, blocks, instructions):
    rows_a, rows_b = Rows(), Rows()
    a, _ = start(tiny, blocks, rows_a)
    b, _ = start(tiny, blocks, rows_b)
    n, pos, logits = a.thinker.n_tokens, a.thinker.rope.positions.clone(), a.thinker.next_token_logits().clone()
    r = a.begin_reply(6, instructions=instructions, out_of_band=True)
    list(a.decode(r))
    a.end_reply()
    assert r.usage()["output_tokens"] == 6 and r.usage()["input_tokens"] > 0
    assert a.thinker.n_tokens == n and torch.equal(a.thinker.rope.positions, pos)
    assert torch.allclose(a.thinker.next_token_logits(), logits, atol=ATOL)
    assert a.item_ids() == ["u1", "a1", "u2"]
    assert torch.equal(rows_a.p, rows_b.p) and torch.allclose(rows_a.h, rows_b.h, atol=ATOL)
    with pytest.raises(RuntimeError, match="no reply"):
        a.truncate_to_played(480)
    ra, rb = a.begin_reply(6), b.begin_reply(6)
    assert [s.token for s, _ in a.decode(ra)] == [s.token for s, _ in b.decode(rb)]
    assert ra.usage() == rb.usage()
    a.end_reply(item_id="a2")
    b.end_reply(item_id="a2")
    assert a.item_ids() == b.item_ids() == ["u1", "a1", "u2", "a2"]


def test_an_out_of_band_reply_after_a_reply(tiny):
    """No open turn: the out-of-band reply opens its own assistant turn and takes it back."""
    c = Conversation(tiny)
    c.end_turn("hello", item_id="u1")
    list(c.decode(r := c.begin_reply(4)))
    c.end_reply(item_id="a1")
    n = c.thinker.n_tokens
    list(c.decode(c.begin_reply(4, out_of_band=True)))
    c.end_reply()
    assert c.thinker.n_tokens == n
    c.delete_item("u1")
    assert_same(tiny, c, oracle(tiny, [system(tiny), reply_ids(tiny, r)]), None)


# ---------------------------------------------------------------------------------- errors
def test_bad_item_operations_get_their_codes_and_change_nothing(tiny):
    c = Conversation(tiny)
    c.end_turn("hello", item_id="u1")
    n = c.thinker.n_tokens
    cases = [(lambda: c.delete_item("nope"), "item_not_found"),
             (lambda: c.add_message("m", "user", "x", after="nope"), "item_not_found"),
             (lambda: c.add_message("m", "tool", "x"), "invalid_item"),
             (lambda: c.add_message("u1", "user", "x"), "invalid_item"),
             (lambda: c.end_turn("again", item_id="u1"), "invalid_item")]
    for op, code in cases:
        with pytest.raises(ItemError) as e:
            op()
        assert e.value.code == code, e.value
    assert c.thinker.n_tokens == n and c.item_ids() == ["u1"]
    c.begin_turn(audio=False, video=False)
    with pytest.raises(ItemError) as e:
        c.delete_item("u1")
    assert e.value.code == "item_busy"
    c.end_turn("more")
    r = c.begin_reply(2)
    with pytest.raises(ItemError) as e:
        c.add_message("m", "user", "x")
    assert e.value.code == "item_busy"
    list(c.decode(r))
    c.end_reply()
    assert len(c.item_ids()) == 3 and len(set(c.item_ids())) == 3  # auto ids are unique


def test_a_spoken_chat_after_an_edit_speaks_as_a_fresh_one(tiny):
    """OmniChat with a voice: the Talker's own cache follows the edit (its reply codes equal a fresh chat's)."""
    from omnistream.chat import OmniChat
    from omnistream.model.talker import TalkerConfig
    from omnistream.model.token2wav import StreamingConfig

    def chat():
        return OmniChat(tiny, voice="Chelsie", talker_config=TalkerConfig(do_sample=False, max_new_tokens=16),
                        token2wav=StreamingConfig(chunk_codes=12, left_codes=12, right_codes=6, vocoder_context_frames=8))

    a, b = chat(), chat()
    a.say("hello there")
    a.add_message("m0", "system", "Be kind.", after="root")
    b.add_message("m0", "system", "Be kind.")
    b.say("hello there")
    assert a.items == ["m0", "turn-1"] and b.items == ["m0", "turn-1"]
    for c in (a, b):
        list(c.reply(max_new_tokens=3, seed=0))
    assert a.reply_ids == b.reply_ids and a.reply_codes == b.reply_codes and len(a.reply_codes) > 0
    a.delete_item("m0")  # after a spoken reply: out and back in, the same conversation as b's
    a.add_message("m0", "system", "Be kind.", after="root")
    for c in (a, b):
        c.say("and then?")
        list(c.reply(max_new_tokens=3, seed=0))
    assert a.reply_ids == b.reply_ids and a.reply_codes == b.reply_codes and len(a.reply_codes) > 0


def test_usage_counts_what_an_edit_prefilled_again(tiny, blocks):
    """input_tokens / audio_tokens of the next reply = the tokens the Thinker forwarded since the
    previous reply ended (counted at the forward itself), replays of edited items included."""
    c = Conversation(tiny, feed=Rows())  # (recording: the forward is told which rows are audio features)
    c.end_turn("hello there", item_id="u1")
    list(c.decode(c.begin_reply(4)))
    c.end_reply(item_id="a1")
    seen, forward = [], c.thinker._forward
    c.thinker._forward = lambda embeds, pos, mask=None: (seen.append((embeds.shape[0], mask)), forward(embeds, pos, mask))[1]
    audio_turn(c, blocks, "what is this?", "u2")
    c.add_message("m0", "user", "first", after="root")
    r = c.begin_reply(2)
    c.thinker._forward = forward
    n_audio = sum(int(b.shape[0]) for b in blocks)
    assert r.usage()["input_tokens"] == sum(n for n, _ in seen) > c.thinker.n_tokens - c.items.items[-1].start
    assert r.usage()["audio_tokens"] == sum(int(m.sum()) for _, m in seen if m is not None) == 2 * n_audio
