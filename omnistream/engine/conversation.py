"""The conversation core: the one place for the rules of a Thinker conversation.

Both ways of running a conversation -- :class:`omnistream.chat.OmniChat` in process and the
thinker stage worker (:mod:`omnistream.runtime.workers`, which also serves the in-process client)
-- hold a :class:`Conversation` and only move its inputs and outputs. The rules it owns:

* the system prompt and the chat-template framing of every turn (``<|im_start|>user`` ...
  ``<|im_end|>\\n<|im_start|>assistant\\n``);
* media segments: audio blocks and video patches go into the open segment; with a window, a long
  media turn is cut into segments of at most ``segment_s`` seconds (:class:`~omnistream.engine.turns.SegmentCutter`);
* feeding the Talker: every row the Thinker prefills outside a reply is handed to a
  :class:`TalkerFeed` as prompt rows (in process: the ``StreamingTalker`` itself; across stages: a
  ``PromptRows`` message), and cut back when the Thinker is;
* decoding: :meth:`Conversation.begin_reply` returns a :class:`Reply` whose ``next_token`` samples
  from the Thinker's logits; the caller runs the forward that appends the token (alone, or batched
  with other sessions' tokens by the stage scheduler) and hands the step back to ``accept``, which
  returns the text delta; ``Conversation.end_reply`` closes the assistant turn;
* truncation to what the user heard (one codec token per reply text token, ``SpeechRates`` samples each);
* per-reply settings: instructions and tools for one reply go into a system turn just before it
  (Qwen's tool format, :mod:`omnistream.engine.tools`) and are taken out of the context again when
  it ends (the reply's tokens are re-prefilled after the cut), so later replies never see them;
  ``tool_choice`` ``required`` / a named function decodes under a grammar that forces a valid call;
* usage: the tokens prefilled for a reply (everything since the previous reply ended, and what an
  item edit prefilled again) and generated;
* input transcription: with ``keep_audio``, a copy of the turn's audio blocks is kept for
  :meth:`Conversation.take_turn_audio` (transcribed on a cache of its own: :mod:`omnistream.engine.transcribe`);
* conversation items: every closed user turn, reply and inserted message is an item
  (:mod:`omnistream.engine.items`); :meth:`Conversation.add_message` inserts one anywhere and
  :meth:`Conversation.delete_item` removes one, cutting the caches back to the edit and prefilling
  the items after it again, so they equal those of a fresh conversation built with the same items;
* out-of-band replies (``begin_reply(out_of_band=True)``): ``end_reply`` restores the context to
  what it was before the reply, as if it had never happened.

Nothing here knows about sockets, threads or batches: that is what lets one copy serve all paths.
The bookkeeping the rules are built from (speech rates, the window choice, turn stats, text deltas,
the segment cutter) lives in :mod:`omnistream.engine.turns`; the item log in :mod:`omnistream.engine.items`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Protocol

import torch

from omnistream.engine.items import Item, ItemEdits, ItemError, TurnTooLong, text_ops
from omnistream.engine.tools import (
    ArgumentStream,
    CallConstraint,
    CallSplitter,
    ToolCall,
    parse_tool_calls,
    tools_block,
)
from omnistream.engine.turns import SegmentCutter, SpeechRates, TextDeltas, TurnStats
from omnistream.memory.window_config import AUDIO_TOKENS_PER_SECOND, text_config
from omnistream.model.thinker import StreamingThinker, ThinkerStep, sample

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


class TalkerFeed(Protocol):
    """Where the Talker's prompt rows go (the Talker's KV cache follows the Thinker's)."""

    def prompt_rows(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    next_position: int) -> None:
        """Rows ``(n, D)`` with their TMRoPE ``positions (3, n)``; ``next_position``: the voice bos slot."""

    def truncate_prompt(self, n_tokens: int) -> None:
        """The Thinker was cut back to ``n_tokens``."""


class Reply:
    """One assistant reply being decoded. ``next_token`` -> (the caller appends the token to the
    Thinker, alone or in a batch) -> ``accept(step)`` -> text delta; until ``done``."""

    def __init__(self, conv: Conversation, max_new_tokens: int, temperature: float, seed: int | None,
                 tools: list[dict] | None = None, tool_choice: str = "auto", input_tokens: int = 0,
                 constraint: CallConstraint | None = None, media_tokens: dict | None = None,
                 out_of_band: bool = False):
        self.conv = conv
        self.out_of_band = out_of_band  # not added to the conversation: end_reply restores the context
        self.start = conv.thinker.n_tokens
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.deltas = TextDeltas(conv.tok)
        self.ended = False  # a stop token was decoded
        self.n_decoded = 0
        self.tokens: list[int] = []  # every token appended, the stop token included
        self.texts: list[str] = []  # the reply's text as decoded (tool-call blocks included)
        self.input_tokens = input_tokens  # tokens prefilled since the previous reply ended
        self.media_tokens = dict(media_tokens or {})  # of which audio / image (video patch) tokens
        self.tools = list(tools or []) if tool_choice != "none" else []
        self.tool_choice = tool_choice
        self.constraint = constraint  # forced call: the grammar's mask on the logits
        self.splitter = CallSplitter() if self.tools else None  # tool-call text is held back from the client
        self.arguments = ArgumentStream() if self.tools else None  # ... and streamed as the call's arguments
        self._arg_delta = ""
        self.gen, self.top_k, self.top_p = None, None, None
        if temperature > 0:  # the checkpoint's top-k / top-p, as the Thinker's generate uses them
            gc = conv.thinker.thinker.generation_config
            self.top_k, self.top_p = gc.top_k, gc.top_p
            self.gen = torch.Generator(device=conv.thinker.device)
            self.gen.manual_seed(seed) if seed is not None else self.gen.seed()  # global RNG untouched

    @property
    def ids(self) -> list[int]:
        return self.deltas.ids

    @property
    def done(self) -> bool:
        return self.ended or self.n_decoded >= self.max_new_tokens

    @property
    def forced(self) -> bool:
        """The reply must be a function call (``tool_choice`` required or a named function)."""
        return self.constraint is not None

    @property
    def calling(self) -> bool:
        """A tool call began: the rest of the reply is not text for the user (nor speech)."""
        return self.forced or (self.splitter is not None and self.splitter.calling)

    def next_token(self) -> int:
        """Sample the next token from this session's Thinker logits (greedy at temperature 0); under a
        forced call only tokens the call grammar allows can be drawn (the mask is this row's alone)."""
        logits = self.conv.thinker.next_token_logits()  # (V,)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        return sample(logits, self.temperature, self.top_k, self.top_p, self.gen)

    def accept(self, token: int) -> tuple[ThinkerStep, str]:
        """The token was appended to the Thinker: its step (for the Talker) and the new text for the
        user (a tool call's text is held back: see :attr:`calls`)."""
        th = self.conv.thinker
        self.n_decoded += 1
        self.tokens.append(int(token))
        if self.constraint is not None:
            self.constraint.accept(token)
        step = ThinkerStep(token, th.last_embed, th.last_hidden)
        if token in self.conv.stop_ids:
            self.ended = True
            return step, ""
        return step, self._shown(self.deltas.push(token))

    def flush(self) -> str:
        text = self._shown(self.deltas.flush())
        return text + (self.splitter.flush() if self.splitter is not None else "")

    def _shown(self, text: str) -> str:
        if not text:
            return text
        self.texts.append(text)
        if self.splitter is None:
            return text
        shown = self.splitter.push(text)
        if self.splitter.calling:
            self._arg_delta += self.arguments.push("".join(self.texts))
        return shown

    def take_arguments(self) -> tuple[str, str] | None:
        """(function name, new arguments text) of the call being written since the last call, if any."""
        if not self._arg_delta:
            return None
        delta, self._arg_delta = self._arg_delta, ""
        return self.arguments.name, delta

    @property
    def text(self) -> str:
        """The reply's text for the user (tool-call blocks taken out)."""
        return self.result()[0]

    @property
    def calls(self) -> list[ToolCall]:
        """The function calls the reply made (complete, well-formed ones only)."""
        return self.result()[1]

    def usage(self) -> dict[str, int]:
        """Token counts: ``input_tokens`` prefilled for this reply (since the previous one ended; the
        system prompt for the first), ``output_tokens`` generated (a stop token included)."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.n_decoded,
                "total_tokens": self.input_tokens + self.n_decoded, "audio_tokens": self.media_tokens.get("audio", 0),
                "image_tokens": self.media_tokens.get("video", 0)}

    def result(self) -> tuple[str, list[ToolCall]]:
        raw = "".join(self.texts)
        return parse_tool_calls(raw, self.tools) if self.tools else (raw, [])


REPLY_ROOM = 1024  # tokens of the context a turn leaves for the reply


class Conversation(ItemEdits):
    """A multi-turn Thinker conversation (see the module docstring for the rules it owns).

    ``feed``: where the Talker's prompt rows go (None: text only, nothing is recorded).
    ``window``: a :class:`~omnistream.memory.window_cache.WindowConfig` (sinks + sliding window)
    or None (the growing cache). ``segment_s`` applies only with a window.
    """

    def __init__(self, ck, *, system_prompt: str | None = SYSTEM_PROMPT, fps: float = 2.0, window=None,
                 segment_s: float | None = 60.0, feed: TalkerFeed | None = None):
        if segment_s is not None and not segment_s > 0:
            raise ValueError(f"segment_s must be > 0 or None, not {segment_s!r}")
        self.ck, self.tok, self.fps, self.feed = ck, ck.tokenizer, fps, feed
        self.segment_s = segment_s if window is not None else None
        self.rates = SpeechRates.from_checkpoint(ck)
        record = feed is not None
        if window is None:  # the growing cache: exact, memory grows with the session
            self.thinker = StreamingThinker(ck.thinker, tokenizer=ck.tokenizer, record=record)
        else:  # sinks + sliding window: bounded memory for hours-long sessions
            from omnistream.model.thinker import window_thinker

            self.thinker = window_thinker(ck.thinker, window, tokenizer=ck.tokenizer, record=record)
        self.stop_ids = {self.tok.convert_tokens_to_ids("<|im_end|>"), self.tok.convert_tokens_to_ids("<|endoftext|>")}
        ctx = getattr(text_config(ck.thinker.config), "max_position_embeddings", None) or 32768
        self.max_turn_tokens = max(1, ctx - REPLY_ROOM)  # one turn may not fill the context (TurnTooLong)
        self.sent = 0  # prompt rows the Talker holds
        self.reply: Reply | None = None  # the reply being decoded
        self.turn_start: int | None = None  # Thinker length where the open user turn began
        self.media: tuple[str, ...] = ()  # streams of the open turn ("audio", "video")
        self._cutter: SegmentCutter | None = None
        self.segments_cut = 0  # media segments closed early by segment_s (this conversation)
        self.last_reply: tuple[int, int] | None = None  # (reply start, reply text tokens)
        self._reply_end = 0  # Thinker length when the last reply (or its truncation) closed
        self._prefix_at: int | None = None  # where the unanswered "<|im_start|>assistant\n" begins
        self._prefix_end = 0  # ... and the Thinker length right after it
        self._context_at: int | None = None  # where the open reply's own system turn begins
        self._media_tokens = {"audio": 0, "video": 0}  # media tokens prefilled since the last reply
        self._turn_media = dict(self._media_tokens)  # ... when the open turn began (abort_turn restores it)
        self.stats = TurnStats()
        self.turn_end_t = time.perf_counter()
        self.keep_audio = False  # keep a copy of each turn's audio blocks (input transcription asked for)
        self.turn_audio: list[torch.Tensor] = []  # the last user turn's audio blocks, each (n, D)
        self._init_items()
        if system_prompt:
            self.text(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        self._base = self.thinker.n_tokens  # where the first item begins (after the system prompt)

    # ------------------------------------------------------------------ prefill
    TEXT_CHUNK = 512  # tokens per prefill forward: attention memory stays O(chunk x context), not O(n^2)

    def text(self, s: str) -> list[int]:
        """Append text (chat-template pieces included) and feed the Talker; returns its token ids.
        Long text is prefilled in chunks of ``TEXT_CHUNK`` tokens (incremental prefill is exact, so
        nothing changes but the peak memory: one 12k-token forward costs ~740 MB on the tiny model)."""
        t = time.perf_counter()
        ids = self.tok(s, add_special_tokens=False).input_ids
        for name, args, _ in text_ops(ids, self.TEXT_CHUNK):
            self._op(name, *args)
        self._sync()
        self.stats.prefill_s += time.perf_counter() - t
        return ids

    def _op(self, name: str, *args, **kw) -> None:
        """One StreamingThinker call, also written to the open user turn's recipe (see :mod:`.items`).
        Once a window has evicted the turn's first token the turn can never be replayed: its recipe
        is dropped at once, so an hour-long open turn holds no more media than the window does."""
        getattr(self.thinker, name)(*args, **kw)
        if self._journal is not None:
            self._journal.append((name, args, kw))
            if not self._can_cut(self.turn_start):
                self._journal = None  # (recorded with no recipe: edits there answer item_evicted)

    def _sync(self) -> None:
        """Hand what the Thinker prefilled since the last sync to the Talker (never during a reply:
        the reply's rows reach the Talker as prompt rows of the next turn)."""
        if self.feed is None or self.reply is not None:
            return
        th, start, end = self.thinker, self.sent, self.thinker.n_tokens
        if end < start:
            self._truncate_feed(end)
            start = end
        e, h = th.records(start, end)  # (n, D) each
        self.feed.prompt_rows(e, h, th.rope.positions[:, start:end], int(th.rope.next_position))
        th.release_records(end)
        self.sent = end

    def _truncate_feed(self, n: int) -> None:
        if self.feed is not None and self.sent > n:
            self.feed.truncate_prompt(n)
            self.sent = n

    # ------------------------------------------------------------------ a user turn
    @property
    def turn_open(self) -> bool:
        return self.turn_start is not None

    def begin_turn(self, *, audio: bool, video: bool) -> None:
        """Open a user turn that streams ``audio`` and/or ``video`` (both False: a typed turn)."""
        if self.reply is not None:
            raise RuntimeError("a reply is being decoded: end it before the next user turn")
        if self.turn_open:
            raise RuntimeError("a user turn is already open")
        self.stats = TurnStats()
        self._drop_prefix()  # two user turns in a row (e.g. tool outputs): one assistant turn after both
        self.turn_start = self.thinker.n_tokens
        self._turn_media = dict(self._media_tokens)
        self.turn_audio = []
        self._journal = []  # the turn's Thinker calls from here on: its item's recipe
        self.text("<|im_start|>user\n")
        self.media = tuple(k for k, on in (("audio", audio), ("video", video)) if on)
        self._cutter = SegmentCutter(self.segment_s, self.media, self._feed, self._cut) if self.media else None
        self._open_segment()

    def _open_segment(self) -> None:
        spg = 2.0 / self.fps  # seconds per temporal patch of 2 frames
        if self.media == ("audio", "video"):
            self._op("begin_video", spg, with_audio=True)
        elif self.media == ("video",):
            self._op("begin_video", spg)
        elif self.media == ("audio",):
            self._op("begin_audio")

    def _cut(self) -> None:
        self._op("end_segment")
        self._open_segment()
        self.segments_cut += 1

    def _feed(self, kind: str, item) -> None:
        embeds, grid = item
        self._media_tokens[kind] += int(embeds.shape[0])
        if kind == "audio":
            if self.keep_audio:  # (the turn cap bounds how many: the server commits a turn at its limit)
                self.turn_audio.append(embeds)
            self._op("append_audio_block", embeds)
        else:
            self._op("append_video_patch", embeds, grid)

    def append_audio(self, embeds: torch.Tensor) -> None:
        """One encoded audio block (n, D) of the open turn."""
        self._append("audio", (embeds, None), embeds.shape[0] / AUDIO_TOKENS_PER_SECOND)

    def append_video(self, embeds: torch.Tensor, grid) -> None:
        """One encoded temporal patch (h*w/4, D) with its ``grid`` ((1,) h, w) of the open turn."""
        self._append("video", (embeds, tuple(int(g) for g in grid)), 2.0 / self.fps)

    def _append(self, kind: str, item, seconds: float) -> None:
        if self._cutter is None or kind not in self.media:
            raise RuntimeError(f"{kind} for a turn that was not opened with {kind}")
        t = time.perf_counter()
        self._cutter.push(kind, item, seconds)
        self._sync()
        self.stats.prefill_s += time.perf_counter() - t
        if kind == "audio":
            self.stats.audio_blocks += 1
        else:
            self.stats.video_patches += 1

    def end_turn(self, text: str | None = None, *, item_id: str | None = None) -> None:
        """The user stopped: close the media segment, add the typed text, open the assistant turn.
        The turn becomes conversation item ``item_id`` (None: a fresh id; a used one raises
        ``ItemError`` and changes nothing). A turn that cannot be closed is dropped (so the next one
        starts clean) and the error raised."""
        t0 = time.perf_counter()
        item_id = self.items.new_id(item_id, "turn")
        if not self.turn_open:
            self.begin_turn(audio=False, video=False)
        if self._cutter is not None:
            try:
                self._cutter.flush()
                self._op("end_segment")
                self._sync()
            except Exception:
                self.abort_turn()
                raise
        tail = f"{text or ''}<|im_end|>\n"
        n = self.thinker.n_tokens - self.turn_start + len(self.tok(tail, add_special_tokens=False).input_ids)
        if n > self.max_turn_tokens:  # checked before the text is prefilled: nothing of it is computed
            self.abort_turn()
            raise TurnTooLong(f"the user turn has {n} tokens; the model's context leaves {self.max_turn_tokens} "
                              f"for one turn: send less text at once")
        self.text(tail)
        self._record(Item(item_id, "user", self.turn_start, self.thinker.n_tokens, self._journal))
        self._open_prefix()
        self.stats.end_of_input_s = time.perf_counter() - t0
        self.turn_end_t = t0
        self.turn_start, self._cutter, self.media = None, None, ()

    def _open_prefix(self) -> list[int]:
        """Open the assistant turn (``<|im_start|>assistant\\n``) that the next reply answers in."""
        self._prefix_at = self.thinker.n_tokens
        ids = self.text("<|im_start|>assistant\n")
        self._prefix_end = self.thinker.n_tokens
        return ids

    def _prefix_pending(self) -> bool:
        """Is the unanswered assistant prefix the last thing in the context?"""
        return self._prefix_at is not None and self.reply is None and self.thinker.n_tokens == self._prefix_end

    def take_turn_audio(self) -> list[torch.Tensor]:
        """The closed turn's audio blocks (kept when ``keep_audio``), handed over once: what an input
        transcription runs on (:mod:`omnistream.engine.transcribe`)."""
        blocks, self.turn_audio = self.turn_audio, []
        return blocks

    def _drop_prefix(self) -> None:
        """Take back the unanswered assistant prefix, if it is still the last thing in the context."""
        if self._prefix_pending() and self._can_cut(self._prefix_at):
            self.thinker.truncate(self._prefix_at)
            self._truncate_feed(self._prefix_at)
        self._prefix_at = None

    def abort_turn(self) -> None:
        """Forget the open user turn (``input_audio_buffer.clear``): the caches go back to where it began."""
        if not self.turn_open:
            return
        self.thinker.truncate(self.turn_start)
        self._truncate_feed(self.turn_start)
        self._media_tokens = self._turn_media
        self.turn_start, self._cutter, self.media, self.turn_audio, self._journal = None, None, (), [], None

    # ------------------------------------------------------------------ the reply
    def begin_reply(self, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None, *,
                    instructions: str | None = None, tools: list[dict] | None = None,
                    tool_choice: str = "auto", out_of_band: bool = False) -> Reply:
        """Open the assistant turn. ``instructions`` and ``tools`` (checked by
        :func:`omnistream.engine.tools.check_tools`) apply to this reply only: they are prefilled as
        a system turn right before it and cut out again by :meth:`end_reply`. ``out_of_band``
        (``conversation: "none"``): :meth:`end_reply` puts the context back as it was before this
        call (the reply and its system turn leave; no item is recorded; usage is still counted)."""
        if self.turn_open:
            self.end_turn()
        if self.reply is not None:
            raise RuntimeError("a reply is already being decoded")
        offered = tools if tools and tool_choice != "none" else []
        constraint = None
        if offered and tool_choice != "auto":  # built first: a bad choice changes nothing
            allowed = [t for t in offered if tool_choice in ("required", f"function:{t['name']}")]
            if not allowed:
                raise ValueError(f"tool_choice {tool_choice!r} names no offered tool")
            vocab = int(self.thinker.thinker.lm_head.weight.shape[0])  # logits width (padded vocabulary)
            constraint = CallConstraint(self.tok, vocab, self.stop_ids, allowed)
        elif tool_choice not in ("auto", "none") and not offered:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        context = "\n\n".join(p for p in (instructions, tools_block(offered) if offered else None) if p)
        pending = self._prefix_pending()
        self._oob = (self.thinker.n_tokens, pending, self._reply_end, self._input_from, dict(self._media_tokens)) \
            if out_of_band else None
        self._context_at = None
        if context:
            self._drop_prefix()  # the system turn goes between the user turn and the assistant prefix
            self._reply_at = self._context_at = self.thinker.n_tokens
            self._reply_head = self.text(f"<|im_start|>system\n{context}<|im_end|>\n<|im_start|>assistant\n")
        elif pending:  # the assistant turn end_turn opened
            self._reply_at, self._reply_head = self._prefix_at, self._prefix_ids
        else:  # no turn since the last reply or message: the reply opens its own assistant turn
            self._reply_at = self.thinker.n_tokens
            self._reply_head = self._open_prefix()
        self._prefix_at = None
        reply = Reply(self, max_new_tokens, temperature, seed, offered, tool_choice,
                      input_tokens=self.thinker.n_tokens - self._input_from, constraint=constraint,
                      media_tokens=self._media_tokens, out_of_band=out_of_band)
        self._media_tokens = {"audio": 0, "video": 0}
        self.reply = reply
        return reply

    def end_reply(self, cancelled: bool = False, *, item_id: str | None = None) -> Reply:
        """Close the assistant turn (the stop token, or ``<|im_end|>`` after a limit or a cancel); it
        becomes conversation item ``item_id`` (None or an id already used: a fresh one, logged -- a
        reply always ends). An out-of-band reply leaves the context instead (see :meth:`begin_reply`)."""
        r, self.reply = self.reply, None
        if r is None:
            raise RuntimeError("no reply to end")
        self.stats.reply_tokens = len(r.ids)
        self.stats.cancelled = cancelled
        if r.out_of_band and self._restore():
            return r
        try:
            item_id = self.items.new_id(item_id, "reply")
        except ItemError as e:
            log.warning("%s: the reply gets a fresh id", e)
            item_id = self.items.new_id(None, "reply")
        start = r.start
        if self._context_at is not None and not self._can_cut(self._context_at):
            self._context_at = None  # a window already evicted past it: the system turn stays (logged)
            log.warning("the reply's own instructions/tools stay in the context: the window evicted past them")
        if self._context_at is not None:  # this reply's own system turn leaves the context; the reply stays
            self.thinker.truncate(self._context_at)
            self._truncate_feed(self._context_at)
            self._reply_head = self.text("<|im_start|>assistant\n")
            start = self.thinker.n_tokens
            for i in range(0, len(r.tokens), self.TEXT_CHUNK):
                self.thinker.append_text(r.tokens[i:i + self.TEXT_CHUNK])
            self._context_at = None
        tail = ([] if r.ended else self.text("<|im_end|>")) + self.text("\n")
        self.last_reply = (start, len(r.ids))
        self._reply_end = self._input_from = self.thinker.n_tokens
        self._reply_item = self._record(Item(item_id, "assistant", self._reply_at, self._reply_end, text_ops(
            self._reply_head + r.tokens + tail, self.TEXT_CHUNK), text_at=start - self._reply_at))
        return r

    def decode(self, reply: Reply) -> Iterator[tuple[ThinkerStep, str]]:
        """Decode ``reply`` alone, one token per forward: (step, text delta) per token."""
        while not reply.done:
            tok = reply.next_token()
            self.thinker.append_text([tok])
            yield reply.accept(tok)

    # ------------------------------------------------------------------ barge-in
    def truncate_to_played(self, played_samples: int) -> int:
        """Keep only the part of the last reply the user heard (``played_samples`` of 24 kHz PCM).

        The Talker generates codec token k from reply text token k (one code = ``samples_per_code``
        samples), so the user heard about ``ceil(played / samples_per_code)`` text tokens. The
        Thinker's context is cut there and the turn closed. Returns the number of tokens kept.
        """
        if self.last_reply is None:
            raise RuntimeError("no reply to truncate")
        if self.thinker.n_tokens != self._reply_end or self.turn_open:  # cutting now would cut the new turn
            raise RuntimeError("the conversation has moved on since the last reply (a new turn began); "
                               "truncate it before the next turn starts")
        start, n_text = self.last_reply
        kept = min(n_text, math.ceil(max(0, played_samples) / self.rates.samples_per_code))
        self.thinker.truncate(start + kept)
        self._truncate_feed(start + kept)
        tail = self.text("<|im_end|>\n")
        self.last_reply = (start, kept)
        self._reply_end = self._input_from = self.thinker.n_tokens
        self._heard(start + kept, tail)
        return kept
