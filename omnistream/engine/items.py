"""The conversation's item log: what each item of a :class:`~omnistream.engine.conversation.Conversation`
is, where it lies in the Thinker's cache, and how to prefill it again.

The Realtime API lets a client insert a message anywhere (``conversation.item.create`` with
``previous_item_id``) and delete any item (``conversation.item.delete``). A KV cache cannot have a
row taken out of its middle (every later row attended to it), so an edit at item k cuts the Thinker
back to item k's first token and prefills what follows again: the new item, then items k+1.. from
their *recipes*. A recipe is the exact sequence of :class:`~omnistream.model.thinker.StreamingThinker`
calls that built the item (``append_text`` per prefill chunk, ``begin_audio`` /
``append_audio_block`` / ``begin_video`` / ``append_video_patch`` / ``end_segment``), so a replay
runs the same forwards in the same order as the first time and the cache ends up as a fresh
conversation built with the same items would hold it (segments cut by ``segment_s`` included).

Cost: media embeddings are kept as they were encoded (the encoders are not run again). That is
``25 x D`` values per second of audio (Qwen2.5-Omni-7B, D = 3584, bf16: ~180 KB/s) and
``h*w/4 x D`` per video patch (64 tokens per 1-s patch at the served size: ~460 KB/s), about an
eighth of the KV cache the same tokens take (28 layers x K and V x 512 values per token). It is
bounded where the cache is: with a window, an item whose first token left the window can never be
cut to (the evicted rows cannot come back), and neither can any item before it, so their recipes
are dropped (:meth:`ItemLog.forget_before`) and an edit there is refused (``item_evicted``). With the
growing cache the log grows with the cache (by that eighth).

:class:`ItemEdits` holds the operations (``add_message``, ``delete_item``, ``item_ids``, the
out-of-band restore); it is mixed into the ``Conversation``, whose turn rules it replays.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

ROLES = ("user", "assistant", "system")
MEDIA_OPS = {"append_audio_block": "audio", "append_video_patch": "video"}
log = logging.getLogger(__name__)


class TurnTooLong(ValueError):
    """A user turn (or message) with more tokens than the model's context can take (answered ``turn_too_long``)."""


class ItemError(ValueError):
    """An item operation that cannot be done; ``code`` says why (the Realtime error code):
    ``item_not_found``, ``item_evicted`` (a window cache already evicted tokens the edit would cut),
    ``item_busy`` (a reply is being decoded or a user turn is open), ``invalid_item`` (a bad role,
    a duplicate id)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Item:
    """One conversation item: tokens ``start:end`` of the Thinker's cache, rebuilt by ``recipe``
    (a list of ``(StreamingThinker method name, args, kwargs)``; None once the window evicted the item)."""

    id: str
    role: str  # "user" | "assistant" | "system"
    start: int
    end: int
    recipe: list[tuple[str, tuple, dict]] | None
    text_at: int = 0  # a decoded reply: tokens from ``start`` to its first reply token (the turn's framing)
    media: dict[str, int] = field(default_factory=dict)  # audio / video tokens it holds

    def __post_init__(self):
        if not self.media and self.recipe:
            self.media = media_tokens(self.recipe)

    def text_ids(self) -> list[int]:
        """The token ids of an item made of text only (a message or a decoded reply)."""
        return [t for name, args, _ in self.recipe or () if name == "append_text" for t in args[0]]


def media_tokens(recipe) -> dict[str, int]:
    """Audio / video feature tokens a recipe prefills (what usage counts as audio / image tokens)."""
    n = {"audio": 0, "video": 0}
    for name, args, _ in recipe:
        if name in MEDIA_OPS:
            n[MEDIA_OPS[name]] += int(args[0].shape[0])
    return n


def text_ops(ids: list[int], chunk: int) -> list[tuple[str, tuple, dict]]:
    """A recipe that prefills ``ids`` in forwards of at most ``chunk`` tokens."""
    return [("append_text", (list(ids[i:i + chunk]),), {}) for i in range(0, len(ids), chunk)]


class ItemLog:
    """The items in conversation order (the session's system prompt is not one: it cannot be edited)."""

    def __init__(self):
        self.items: list[Item] = []
        self._auto = itertools.count(1)

    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def index(self, item_id: str) -> int:
        for k, it in enumerate(self.items):
            if it.id == item_id:
                return k
        raise ItemError("item_not_found", f"no item {item_id!r} in the conversation")

    def new_id(self, item_id: str | None, kind: str) -> str:
        """``item_id`` checked for reuse, or a fresh one (``turn-3``, ``reply-4``, ...) when None."""
        known = set(self.ids())
        if item_id is None:
            while (item_id := f"{kind}-{next(self._auto)}") in known:
                pass
            return item_id
        if not isinstance(item_id, str) or not item_id:
            raise ItemError("invalid_item", f"an item id must be a non-empty string, not {item_id!r}")
        if item_id in known:
            raise ItemError("invalid_item", f"an item with id {item_id!r} is already in the conversation")
        return item_id

    def position(self, after: str | None) -> int:
        """Where an item placed after ``after`` goes: the end (None), the beginning ("root"), or right after it."""
        if after is None:
            return len(self.items)
        if after == "root":
            return 0
        return self.index(after) + 1

    def forget_before(self, n: int) -> None:
        """The cache can no longer be cut back before token ``n`` (a window evicted it): the items
        that start before it can never be edited nor replayed, so their recipes (media embeddings)
        are freed."""
        for it in self.items:
            if it.start >= n:
                break
            it.recipe = None


class ItemEdits:
    """The item operations of :class:`~omnistream.engine.conversation.Conversation` (mixed into it:
    they work on its Thinker, Talker feed and reply bookkeeping; the turn rules stay there)."""

    def _init_items(self) -> None:
        self.items = ItemLog()  # the conversation's items (the system prompt is none)
        self._journal: list | None = None  # the open user turn's Thinker calls (its item's recipe)
        self._input_from = 0  # usage: input_tokens = n_tokens - this (the previous reply's end, less re-prefills)
        self._reply_at = 0  # where the open reply's assistant turn begins (its item's first token)
        self._reply_head: list[int] = []  # ... and the ids prefilled there before its first reply token
        self._prefix_ids = self.tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self._reply_item: Item | None = None  # the item of the last reply (truncate_to_played changes it)
        self._oob: tuple | None = None  # an out-of-band reply: the state end_reply restores

    def _record(self, item: Item) -> Item:
        """A closed turn / reply becomes ``item`` (the open turn's journal is its recipe)."""
        self.items.items.append(item)
        self._journal = None
        self._forget_evicted()
        return item

    def _heard(self, end: int, tail: list[int]) -> None:
        """truncate_to_played kept the last reply up to token ``end`` and closed it with ``tail``."""
        it = self._reply_item
        if it is not None and it.recipe is not None:
            it.recipe = text_ops(it.text_ids()[:end - it.start] + tail, self.TEXT_CHUNK)
        if it is not None:
            it.end = self.thinker.n_tokens

    def _window_start(self) -> int:
        """The first token the Thinker can still be cut back to (a window cache cannot bring back evicted tokens)."""
        cache = self.thinker.cache
        return self.thinker.n_tokens - cache.count if getattr(cache, "evicted", False) else 0

    def _can_cut(self, n: int) -> bool:
        """Can the Thinker be cut back to ``n`` tokens?"""
        return n >= self._window_start()

    def _forget_evicted(self) -> None:
        self.items.forget_before(self._window_start())

    def item_ids(self) -> list[str]:
        """The items' ids in conversation order."""
        return self.items.ids()

    def add_message(self, item_id: str, role: str, text: str, *, after: str | None = None) -> None:
        """Insert a ``role`` message (user, assistant or system) as item ``item_id``: at the end
        (``after`` None), at the beginning (``"root"``: right after the system prompt) or right after
        item ``after``. Appended at the end it takes the unanswered assistant prefix's place and opens
        none (the next :meth:`begin_reply` answers it, as after :meth:`end_turn`)."""
        if role not in ROLES:
            raise ItemError("invalid_item", f"role {role!r}: give one of {', '.join(ROLES)}")
        if not isinstance(text, str):
            raise ItemError("invalid_item", f"message text must be a string, not {type(text).__name__}")
        self._check_idle()
        item_id = self.items.new_id(item_id, "message")
        k = self.items.position(after)
        ids = self.tok(f"<|im_start|>{role}\n{text}<|im_end|>\n", add_special_tokens=False).input_ids
        if len(ids) > self.max_turn_tokens:
            raise TurnTooLong(f"the message has {len(ids)} tokens; one turn may have {self.max_turn_tokens}")
        self._edit(k, Item(item_id, role, 0, 0, text_ops(ids, self.TEXT_CHUNK)))

    def delete_item(self, item_id: str) -> None:
        """Take item ``item_id`` out of the conversation (the items after it are prefilled again)."""
        self._check_idle()
        self._edit(self.items.index(item_id), None)

    def _check_idle(self) -> None:
        if self.reply is not None or self.turn_open:
            raise ItemError("item_busy", "a reply is being decoded or a user turn is open: edit the "
                                         "conversation after it")

    def _edit(self, k: int, new: Item | None) -> None:
        """Insert ``new`` before item ``k`` (``k == len``: at the end), or delete item ``k`` (``new``
        None): cut the caches back to item k's first token, prefill ``new`` and replay items k.. from
        their recipes, so caches, spans and positions equal a fresh conversation of the same items.
        Everything is checked before anything changes."""
        items, th = self.items.items, self.thinker
        end = items[-1].end if items else self._base
        cut = items[k].start if k < len(items) else end
        rest = items[k if new is not None else k + 1:]
        if not self._can_cut(cut) or any(it.recipe is None for it in rest):
            raise ItemError("item_evicted", f"the window cache already evicted tokens of the conversation at "
                                            f"token {cut}; only items inside the window can be edited")
        reopen = self._prefix_pending() and bool(rest)  # an edit before the last item keeps the open prefix
        old_n, reply = th.n_tokens, self._reply_item
        th.truncate(cut)
        self._truncate_feed(cut)
        if new is None:
            if items.pop(k) is reply:
                self.last_reply = self._reply_item = None
        else:
            items.insert(k, new)
        for it in items[k:]:  # the new item, then the ones after the edit, through the same calls
            it.start = th.n_tokens
            for name, args, kw in it.recipe:
                getattr(th, name)(*args, **kw)
                self._sync()
            it.end = th.n_tokens
            for kind, n in it.media.items():
                self._media_tokens[kind] += n  # (usage: media tokens prefilled for the next reply)
        self._prefix_at = None
        if reopen:
            self._open_prefix()
        if self._reply_item is not None:
            self._reply_end = self._reply_item.end
            self.last_reply = (self._reply_item.start + self._reply_item.text_at, self.last_reply[1])
        else:
            self._reply_end = min(self._reply_end, cut)
        self._input_from += cut - old_n  # usage: tokens cut and prefilled again count as prefilled for the next reply
        self._forget_evicted()

    def _restore(self) -> bool:
        """An out-of-band reply ends: the context goes back to what it was before ``begin_reply``
        (the assistant prefix end_turn opened is prefilled again if the reply's system turn took its
        place). False when a window already evicted past that point (the reply then stays, logged)."""
        n0, pending, reply_end, input_from, media = self._oob
        cut = n0 if self._context_at is None else self._context_at  # (a system turn may have taken the prefix's place)
        self._oob, self._context_at = None, None
        if not self._can_cut(cut):
            log.warning("an out-of-band reply stays in the context: the window evicted past its start")
            return False
        self.thinker.truncate(cut)
        self._truncate_feed(cut)
        if pending and self.thinker.n_tokens < n0:
            self._open_prefix()
        elif pending:
            self._prefix_at = self._reply_at
        self._reply_end, self._input_from, self._media_tokens = reply_end, input_from, media
        self.last_reply = self._reply_item = None  # (its truncate_to_played would cut a reply heard in full)
        return True
