"""Conversation items of one Realtime session: what the client created, and what the pipeline holds.

The protocol names every piece of the conversation by an item id (``conversation.item.created``,
``previous_item_id``, ``conversation.item.delete`` / ``retrieve``); the pipeline's conversation core
(:class:`omnistream.engine.conversation.Conversation`) keeps the same ids for what it holds, because
every commit and every reply carries its item id down the pipeline. :class:`ItemStore` is the server's
side of that: the items in conversation order as they were created or produced (what
``conversation.item.retrieve`` returns), and for each the pipeline item it belongs to.

Several protocol items can share one pipeline item: the images and audio of a user message join the
open user turn and become part of the item its commit closes; the ``message`` and ``function_call``
items of one reply are one assistant turn in the model's context. Deleting one of them deletes the
pipeline item, so every protocol item that shares it is deleted with it (one
``conversation.item.deleted`` each): the model never sees half a turn.

Audio of user items is kept for ``retrieve`` only for the last :data:`RETAINED_AUDIO_ITEMS` audio
items and :data:`RETAINED_AUDIO_S` seconds in all (a session can last hours: the PCM of every turn
would grow without bound); an older item is returned without its audio (``audio`` absent). Reply
audio is not kept (the client played it; its transcript is in the item).

Items are inserted (``previous_item_id`` not the last item, or ``"root"``) and deleted only while no
reply runs and no user turn is open (``item_busy``): the pipeline re-prefills its cache from the
change, which must not happen under a reply being decoded or a turn being encoded. Errors follow the
OpenAI API's codes (``item_delete_invalid_item_id``, ``item_retrieve_invalid_item_id``,
``item_create_invalid_previous_item_id``); a window cache that already evicted an item cannot take it
out or insert before it (``item_evicted``). Every error leaves the conversation as it was.

Parsing ``conversation.item.create`` (:func:`parse_item`) lives here too, beside what it feeds.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np

from omnistream.apps.limits import SessionLimits
from omnistream.apps.realtime import (
    FunctionOutput,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    MessageCreate,
    decode_image,
    decode_pcm16,
)
from omnistream.apps.realtime_config import _DEFAULT_LIMITS, SAMPLE_RATE, ProtocolError, _str
from omnistream.apps.realtime_events import encode_pcm16
from omnistream.runtime.client import ClientError

RETAINED_AUDIO_ITEMS = 4  # user audio items whose PCM conversation.item.retrieve returns
RETAINED_AUDIO_S = 60.0  # ... and at most this many seconds of it in all


class ItemStore:
    """The session's conversation items in order (see the module docstring)."""

    def __init__(self, audio_items: int = RETAINED_AUDIO_ITEMS, audio_s: float = RETAINED_AUDIO_S):
        self.order: list[str] = []
        self.items: dict[str, dict] = {}  # id -> the item as created / produced (server event JSON)
        self.engine: dict[str, str | None] = {}  # id -> the pipeline item it is part of (None: none it can name)
        self.audio: OrderedDict[str, np.ndarray] = OrderedDict()  # id -> committed PCM, (n,) int16 at 24 kHz
        self.audio_items, self.max_audio = audio_items, int(audio_s * SAMPLE_RATE)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    @property
    def last(self) -> str | None:
        return self.order[-1] if self.order else None

    def add(self, item: dict, engine: str | None, after: str | None = None) -> str | None:
        """Put ``item`` after the item ``after`` (None: at the end; ``"root"``: first, and after every
        item sharing ``after``'s pipeline item); returns its ``previous_item_id``."""
        if after is None:
            i = len(self.order)
        elif after == "root":
            i = 0
        else:
            i = self.order.index(self.group(after)[-1]) + 1
        self.order.insert(i, item["id"])
        self.items[item["id"]], self.engine[item["id"]] = item, engine
        return self.order[i - 1] if i else None

    def update(self, item: dict) -> None:
        """The item's final form (a reply's message once its text is known)."""
        if item["id"] in self.items:
            self.items[item["id"]] = item

    def link(self, ids: list[str], engine: str | None) -> None:
        """The items ``ids`` (media of the open turn) became part of the pipeline item ``engine``."""
        for i in ids:
            if i in self.engine:
                self.engine[i] = engine

    def group(self, item_id: str) -> list[str]:
        """``item_id`` and every item sharing its pipeline item, in conversation order."""
        e = self.engine[item_id]
        return [item_id] if e is None else [i for i in self.order if self.engine[i] == e]

    def remove(self, ids: list[str]) -> None:
        for i in ids:
            self.order.remove(i)
            self.items.pop(i)
            self.engine.pop(i)
            self.audio.pop(i, None)

    def keep_audio(self, item_id: str, pcm: np.ndarray) -> None:
        """Keep the committed PCM (n,) int16 of a user audio item, dropping the oldest beyond the bounds."""
        self.audio[item_id] = pcm[: self.max_audio]
        while len(self.audio) > self.audio_items or sum(len(a) for a in self.audio.values()) > self.max_audio:
            self.audio.popitem(last=False)

    def set_transcript(self, item_id: str, text: str) -> None:
        """The input transcription of a user audio item (what the API fills in once it completes)."""
        for part in self.items.get(item_id, {}).get("content", []):
            if part.get("type") == "input_audio":
                part["transcript"] = text

    def render(self, item_id: str) -> dict:
        """The item for ``conversation.item.retrieved``: user audio parts with their audio (base64
        pcm16) while it is kept."""
        item = copy.deepcopy(self.items[item_id])
        pcm = self.audio.get(item_id)
        if pcm is not None:
            for part in item.get("content", []):
                if part.get("type") == "input_audio":
                    part["audio"] = encode_pcm16(pcm)
        return item


# ---------------------------------------------------------------------------------- parsing
def parse_item(ev: dict, event_id, limits: SessionLimits = _DEFAULT_LIMITS) -> ItemCreate | MessageCreate | FunctionOutput:
    """``conversation.item.create`` -> a user message, an assistant/system text message or a function
    output (ProtocolError for anything else; text and images bounded by ``limits`` before decoding)."""
    err = lambda code, msg, param=None: ProtocolError(code, msg, param, event_id)
    item = ev.get("item")
    if not isinstance(item, dict):
        raise err("missing_required_parameter", "Missing required parameter: 'item'", "item")
    prev = ev.get("previous_item_id")
    if prev is not None and not isinstance(prev, str):
        raise err("invalid_type", "previous_item_id must be a string", "previous_item_id")
    item_id = item.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not 0 < len(item_id) <= 64):
        raise err("invalid_value", "item.id must be a string of 1-64 characters", "item.id")
    if item.get("type") == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not 0 < len(call_id) <= 64:
            raise err("missing_required_parameter", "item.call_id must be the call's id (a string)", "item.call_id")
        output = _str(output, "item.output", event_id, max_len=limits.max_text_chars)
        return FunctionOutput(event_id, item_id, prev, call_id, output)
    if item.get("type", "message") != "message":
        raise err("unsupported_item", f"item.type {item.get('type')!r} is not supported ('message' or "
                  "'function_call_output')", "item.type")
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        raise err("unsupported_item", f"item.role {role!r} is not supported (user, assistant or system)", "item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise err("missing_required_parameter", "item.content must be a non-empty list", "item.content")
    if len(content) > 64:
        raise err("invalid_value", "item.content holds more than 64 parts", "item.content")
    if role != "user":  # text only: assistant output_text / text parts, system input_text parts
        kinds = ("output_text", "text") if role == "assistant" else ("input_text",)
        texts = []
        for i, part in enumerate(content):
            p = f"item.content[{i}]"
            if not isinstance(part, dict):
                raise err("invalid_type", f"{p} must be an object", p)
            if part.get("type") not in kinds:
                raise err("invalid_value", f"{p}.type {part.get('type')!r} is not supported in a {role} message "
                          f"({', '.join(kinds)})", f"{p}.type")
            texts.append(_str(part.get("text"), f"{p}.text", event_id, max_len=limits.max_text_chars))
        text = "\n".join(texts)
        if len(text) > limits.max_text_chars:
            raise err("input_too_large", f"the item holds {len(text)} characters of text: at most "
                      f"{limits.max_text_chars} are taken in one item", "item.content")
        return MessageCreate(event_id, item_id, prev, role, text)
    texts, images, audio = [], [], []
    n_chars = sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if n_chars > limits.max_text_chars:  # before any image is decoded
        raise err("input_too_large", f"the item holds {n_chars} characters of text: at most {limits.max_text_chars} "
                  "are taken in one item", "item.content")
    n_images = sum(isinstance(p, dict) and p.get("type") == "input_image" for p in content)
    if n_images > limits.max_item_images:
        raise err("input_too_large", f"the item holds {n_images} images: at most {limits.max_item_images} are "
                  "taken in one item", "item.content")
    for i, part in enumerate(content):
        p = f"item.content[{i}]"
        if not isinstance(part, dict):
            raise err("invalid_type", f"{p} must be an object", p)
        kind = part.get("type")
        if kind in ("input_text", "text"):
            texts.append(_str(part.get("text"), f"{p}.text", event_id, max_len=limits.max_text_chars))
        elif kind == "input_image":
            images.append(decode_image(part.get("image_url"), f"{p}.image_url", event_id, limits))
        elif kind == "input_audio":
            audio.append(decode_pcm16(part.get("audio"), f"{p}.audio", event_id))
        else:
            raise err("invalid_value", f"{p}.type {kind!r} is not supported (input_text, input_image, input_audio)",
                      f"{p}.type")
    return ItemCreate(event_id, item_id, prev, "\n".join(texts) if texts else None, images,
                      np.concatenate(audio) if audio else None)


# ---------------------------------------------------------------------------------- handlers
def _busy(conn, what: str, event_id: str | None) -> None:
    if conn.response is not None:
        raise ProtocolError("item_busy", f"cannot {what} while a response is in progress: wait for its "
                            "response.done (or cancel it)", event_id=event_id)
    if conn._turn_open():
        raise ProtocolError("item_busy", f"cannot {what} while a user turn is open: commit or clear the input "
                            "audio buffer first", event_id=event_id)


def _new_id(conn, item_id: str | None, event_id: str | None) -> str:
    from omnistream.apps.realtime_reply import new_id

    if item_id is not None and item_id in conn.items:
        raise ProtocolError("invalid_value", f"an item with id {item_id!r} already exists in the conversation",
                            "item.id", event_id)
    return item_id or new_id("item")


def _place(conn, prev: str | None, event_id: str | None) -> str | None:
    """Where a new item goes: None (at the end) or an insertion point (``"root"`` or an item id)."""
    if prev is None or (prev == conn.items.last and prev is not None):
        return None
    if prev != "root" and prev not in conn.items:
        raise ProtocolError("item_create_invalid_previous_item_id", f"Error adding item: the previous item with "
                            f"id '{prev}' does not exist.", "previous_item_id", event_id)
    if prev != "root" and conn.items.engine[prev] is None:
        raise ProtocolError("invalid_value", f"item {prev!r} is part of a turn the pipeline holds without an id "
                            "(answered before it was committed): nothing can be inserted after it",
                            "previous_item_id", event_id)
    return prev


def _engine_error(e: ClientError, what: str, item_id: str, event_id: str | None) -> ProtocolError:
    """The pipeline's refusal (:class:`omnistream.engine.items.ItemError` codes) as the API's error."""
    if e.code == "item_not_found":
        code, param = {"delete": ("item_delete_invalid_item_id", None),
                       "add": ("item_create_invalid_previous_item_id", "previous_item_id")}[what]
        msg = ("Error deleting item: the item with id '{}' does not exist." if what == "delete" else
               "Error adding item: the previous item with id '{}' does not exist.").format(item_id)
        return ProtocolError(code, msg, param, event_id)
    if e.code in ("item_evicted", "item_busy"):
        return ProtocolError(e.code, str(e), event_id=event_id)
    return ProtocolError("invalid_value" if e.code == "invalid_item" else e.code or "invalid_request", str(e),
                         event_id=event_id)


async def _insert(conn, item: dict, role: str, text: str, after: str | None, event_id: str | None) -> None:
    """A text message into the pipeline's conversation (``after``: None, ``"root"`` or a protocol id),
    then into the store and announced."""
    _busy(conn, "add an item there", event_id)
    await conn._apply_pending(opening=True)  # deferred session settings first: the item joins their conversation
    engine_after = after if after in (None, "root") else conn.items.engine[after]
    try:
        await conn.client.add_item(conn.sid, item["id"], role, text, after=engine_after)
    except ClientError as e:
        raise _engine_error(e, "add", after or "", event_id) from None
    prev = conn.items.add(item, item["id"], after)
    await conn.send(conn.ev.event("conversation.item.created", previous_item_id=prev, item=item))


async def create_message(conn, ev: MessageCreate) -> None:
    """An assistant or system text message (``conversation.item.create``), at the end or inserted."""
    item_id = _new_id(conn, ev.item_id, ev.event_id)
    after = _place(conn, ev.previous_item_id, ev.event_id)
    part = {"type": "input_text", "text": ev.text} if ev.role == "system" else \
        {"type": "text" if conn.ev.dialect == "beta" else "output_text", "text": ev.text}
    item = {"id": item_id, "object": "realtime.item", "type": "message", "role": ev.role, "status": "completed",
            "content": [part]}
    await _insert(conn, item, ev.role, ev.text, after, ev.event_id)


async def create_user(conn, ev: ItemCreate) -> None:
    """A user message: its images and audio join the open user turn, its text closes it (a commit
    carrying the item's id). A text-only message with a ``previous_item_id`` before the end is
    inserted there instead."""
    item_id = _new_id(conn, ev.item_id, ev.event_id)
    after = _place(conn, ev.previous_item_id, ev.event_id)
    if after is not None:
        if ev.images or ev.audio is not None or ev.text is None:
            raise ProtocolError("unsupported_feature", "only text user messages can be inserted before the end of "
                                "the conversation (images and audio join the open user turn)", "previous_item_id",
                                ev.event_id)
        item = conn.ev.user_item(item_id, [{"type": "input_text", "text": ev.text}])
        await _insert(conn, item, "user", ev.text, after, ev.event_id)
        return
    content, engine = [], None
    idle = conn.cfg.turn_detection is not None and not conn.buf.speaking and conn.turn_t0 is None
    for img in ev.images:
        if idle and ev.text is None and ev.audio is None:
            conn.idle_frame = img  # latest-only until speech (or a response) opens the turn
        else:
            await conn._flush_idle_frame()
            await conn._push_frame(img)
        content.append({"type": "input_image", "image_url": None})
    if ev.audio is not None:
        await conn._push_turn_audio(ev.audio)
        content.append({"type": "input_audio", "transcript": None})
    if ev.text is not None:
        await conn._flush_idle_frame()
        await conn._push_turn_audio(conn.buf.flush())
        if conn.turn_t0 is None:
            await conn._apply_pending(opening=True)  # a typed turn is a new turn too
        if await conn._lost_turn():
            return
        await conn._seal_frames_only_turn()
        await conn.client.commit(conn.sid, ev.text, item=item_id)
        conn.items.link(conn.turn_items, item_id)  # the turn's earlier media items are part of it
        conn._turn_closed()
        content.append({"type": "input_text", "text": ev.text})
        engine = item_id
    item = conn.ev.user_item(item_id, content)
    prev = conn.items.add(item, engine)
    if engine is None:
        conn.turn_items.append(item_id)  # named once the turn is committed
    if ev.audio is not None:
        conn.items.keep_audio(item_id, ev.audio)
    await conn.send(conn.ev.event("conversation.item.created", previous_item_id=prev, item=item))


async def function_output(conn, ev: FunctionOutput) -> None:
    """A function's output joins the conversation as Qwen's ``<tool_response>`` user turn; the
    client's ``response.create`` then continues."""
    from omnistream.engine.tools import tool_response

    if ev.call_id not in conn.calls:
        raise ProtocolError("invalid_value", f"no function call {ev.call_id!r} was made in this conversation",
                            "item.call_id", ev.event_id)
    if conn._turn_open():
        raise ProtocolError("invalid_request", "a user turn is open: commit or clear it before adding a "
                            "function_call_output", "item", ev.event_id)
    item_id = _new_id(conn, ev.item_id, ev.event_id)
    after = _place(conn, ev.previous_item_id, ev.event_id)
    item = conn.ev.output_item(item_id, ev.call_id, ev.output)
    if after is not None:
        await _insert(conn, item, "user", tool_response(ev.output), after, ev.event_id)
        return
    await conn._apply_pending(opening=True)
    await conn.client.commit(conn.sid, tool_response(ev.output), item=item_id)
    if await conn._take_errors():
        return
    prev = conn.items.add(item, item_id)
    await conn.send(conn.ev.event("conversation.item.created", previous_item_id=prev, item=item))


async def delete(conn, ev: ItemDelete) -> None:
    """``conversation.item.delete``: the item (and the items sharing its pipeline item) leave the
    conversation; the pipeline re-prefills its cache from there."""
    if ev.item_id not in conn.items:
        raise ProtocolError("item_delete_invalid_item_id", f"Error deleting item: the item with id '{ev.item_id}' "
                            "does not exist.", event_id=ev.event_id)
    engine = conn.items.engine[ev.item_id]
    if engine is None:
        raise ProtocolError("invalid_value", f"item {ev.item_id!r} is part of a turn the pipeline holds without an "
                            "id (answered before it was committed): it cannot be deleted", "item_id", ev.event_id)
    _busy(conn, "delete an item", ev.event_id)
    try:
        await conn.client.delete_item(conn.sid, engine)
    except ClientError as e:
        raise _engine_error(e, "delete", ev.item_id, ev.event_id) from None
    gone = conn.items.group(ev.item_id)
    conn.items.remove(gone)
    conn.calls = {k: v for k, v in conn.calls.items() if v not in gone}  # their outputs can no longer be given
    if conn.last_reply is not None and conn.last_reply.item_id in gone:
        conn.last_reply = None  # nothing left to truncate
    for i in gone:
        await conn.send(conn.ev.event("conversation.item.deleted", item_id=i))


async def retrieve(conn, ev: ItemRetrieve) -> None:
    """``conversation.item.retrieve``: the item as it was created or produced (user audio while kept)."""
    if ev.item_id not in conn.items:
        raise ProtocolError("item_retrieve_invalid_item_id", f"Error retrieving item: the item with id "
                            f"'{ev.item_id}' does not exist.", event_id=ev.event_id)
    await conn.send(conn.ev.event("conversation.item.retrieved", item=conn.items.render(ev.item_id)))
