"""The protocol's messages: what travels between omnistream's stages (encoders, thinker, talker,
token2wav) and their client, as msgspec structs of one tagged union (:data:`Message`).

This module says *what* is sent; :mod:`omnistream.runtime.wire` (the codec) says *how*: it turns a
message into ZMQ frames and back, validating on the way in, and re-exports every name here so that
stages and tests use one door, ``wire.X``. The split keeps the vocabulary (read when a feature adds a
field) apart from the byte-level machinery (read when the format changes).

Tensors are typed fields: a field declared :data:`Tensor` (model tensors, decoded as torch) or
:data:`Array` (media, decoded as numpy) holds the array itself, in process and after decoding; the
codec finds those fields by their ``Annotated`` marker and carries each array as a frame of its own.

Ops of one session travel the stage chain in order; ``req`` > 0 asks for a :class:`Result`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "AddItem",
    "Array",
    "AudioChunk",
    "BeginTurn",
    "Clear",
    "CloseSession",
    "Codes",
    "Commit",
    "DeleteItem",
    "Done",
    "Embeds",
    "EndReply",
    "Epoch",
    "Error",
    "Frame",
    "Hello",
    "Message",
    "OpenSession",
    "Ping",
    "Pong",
    "PromptRows",
    "Ready",
    "ReplyError",
    "Respond",
    "Result",
    "Shutdown",
    "Step",
    "Tensor",
    "TextDelta",
    "Transcript",
    "Truncate",
    "TruncatePrompt",
]

#: Bumped on any incompatible change to the structs of this module; checked in Hello/Ready so a stale
#: worker fails loudly at handshake time instead of mis-parsing frames mid-session.
PROTOCOL_VERSION = 5  # 2: per-reply settings in Respond, usage and tool calls in Done; 3: Transcript;
# 4: conversation items (item ids on Commit/Respond, AddItem, DeleteItem), per-reply voice and out-of-band replies;
# 5: tensors are typed fields whose [dtype, shape, frame] headers the encoder writes (TensorRef is array-like)

NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class _TensorField:
    """``Annotated`` marker of a tensor-valued field; ``torch``: the receiver gets a torch tensor."""

    __slots__ = ("torch",)

    def __init__(self, torch: bool):
        self.torch = torch


#: A model tensor (embeddings, hidden states, positions): a ``torch.Tensor`` on any device in the
#: process (:func:`omnistream.runtime.wire.to_cpu` before it leaves), decoded as a CPU torch tensor (bfloat16 restored).
Tensor = Annotated[Any, _TensorField(torch=True)]
#: Media (PCM, camera frames): a numpy ndarray, decoded as one (no torch needed to receive it).
Array = Annotated[Any, _TensorField(torch=False)]


class _Msg(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Base of the tagged union: the class name is the tag (msgpack field ``type``).

    ``reply_work``: a message that only carries work of one reply (a decoded token for the talker,
    codes for token2wav). After a barge-in such a message of an older epoch is dropped where it is
    delivered (:meth:`omnistream.runtime.worker.Worker.deliver`), once for every type; state
    updates (prompt rows, the end of a reply) are never dropped: they keep the caches consistent."""

    reply_work: ClassVar[bool] = False


class Hello(_Msg):
    """Worker -> coordinator on connect; ``protocol`` must equal :data:`PROTOCOL_VERSION`."""
    stage: str
    pid: int
    protocol: int = PROTOCOL_VERSION


class Ready(_Msg):
    """Coordinator -> worker (or worker after model load): handshake complete."""
    stage: str
    pid: int
    protocol: int = PROTOCOL_VERSION


class Ping(_Msg):
    """Liveness probe; ``t`` is the sender's ``time.monotonic()`` for RTT measurement."""
    seq: NonNeg
    t: float


class Pong(_Msg):
    """Answer to :class:`Ping`, echoing ``seq``/``t`` and naming the responding stage; ``stats``: its
    load (:class:`omnistream.engine.load.LoadMeter`) and its workers' batch figures, for admission
    control and ``/status``."""
    seq: NonNeg
    t: float
    stage: str
    stats: dict[str, Any] = {}


class AudioChunk(_Msg):
    """A piece of PCM for ``session``; ``epoch`` lets receivers drop audio from before a barge-in."""
    session: str
    epoch: NonNeg
    seq: NonNeg
    sample_rate: Annotated[int, msgspec.Meta(gt=0)]
    pcm: Array  # (n,) or (n, channels)


class TextDelta(_Msg):
    """Incremental text (thinker output or transcript) for ``session`` at ``epoch``; with ``call``,
    the text is the arguments of the function call ``call`` being written."""
    session: str
    epoch: NonNeg
    seq: NonNeg
    text: str
    call: str | None = None


class Error(_Msg):
    """A stage failed a request; ``session`` is None for stage-wide failures."""
    session: str | None
    code: str
    message: str


class Epoch(_Msg):
    """Barge-in broadcast: everything for ``session`` with a smaller epoch is stale, drop it."""
    session: str
    epoch: NonNeg


class Shutdown(_Msg):
    """Ask the receiving stage to drain and exit."""


# ---- session work along the stage chain (encoders -> thinker -> talker -> token2wav) ----------
# Every op travels the chain in order, so a stage sees a session's ops in the order the client
# sent them; ``req`` > 0 asks for a :class:`Result` (from the stage that owns the op's outcome).
Options = dict[str, Any]  # SessionOptions fields (omnistream.runtime.client.SessionOptions)
ItemId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]  # a conversation item's id (the server's)


class OpenSession(_Msg):
    """Create the session's state (idempotent: a stage that has it keeps it); ``fresh`` rebuilds it."""
    session: str
    epoch: NonNeg
    options: Options
    req: NonNeg = 0
    fresh: bool = False


class CloseSession(_Msg):
    session: str


class BeginTurn(_Msg):
    """Encoders -> thinker: a media user turn opens (audio, or audio-in-video when ``video``)."""
    session: str
    epoch: NonNeg
    video: bool


class Frame(_Msg):
    """Client -> encoders: a camera frame (H, W, 3) uint8 RGB taken at session time ``t_s``."""
    session: str
    epoch: NonNeg
    t_s: float
    image: Array  # (H, W, 3)


class Commit(_Msg):
    """End the user turn, with optional typed ``text``; ``transcribe``: the item id under which the
    turn's audio is transcribed (``Transcript`` messages), None: no transcription."""
    session: str
    epoch: NonNeg
    text: str | None = None
    req: NonNeg = 0
    transcribe: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    item: ItemId | None = None  # the conversation item the closed turn becomes (None: an anonymous one)


class Clear(_Msg):
    """Drop the open user turn."""
    session: str
    epoch: NonNeg
    req: NonNeg = 0


class Respond(_Msg):
    """Generate the reply of ``epoch`` to the committed turn, with this reply's own settings:
    ``max_new_tokens`` (0: the session's), ``instructions`` and ``tools`` (for this reply only: see
    :meth:`omnistream.engine.conversation.Conversation.begin_reply`), ``tool_choice`` (``auto``,
    ``none``, ``required`` or ``function:NAME``) and ``audio`` (False: text only, no Talker work);
    ``item``: the conversation item the reply becomes; ``voice``: this reply's speaker (None: the
    session's); ``out_of_band``: the reply is not added to the conversation."""
    session: str
    epoch: NonNeg
    max_new_tokens: NonNeg = 0
    instructions: str | None = None
    tools: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=128)] = []
    tool_choice: str = "auto"
    audio: bool = True
    item: ItemId | None = None
    voice: str | None = None  # (checked against the checkpoint's voices by the thinker: a bad one fails the reply)
    out_of_band: bool = False


class AddItem(_Msg):
    """Put a ``role`` (user | assistant | system) text message into the conversation as ``item``,
    ``after`` an item (None: at the end, ``"root"``: at the start); the thinker answers the ``req``."""
    session: str
    epoch: NonNeg
    item: ItemId
    role: Literal["user", "assistant", "system"]
    text: str
    after: ItemId | None = None
    req: NonNeg = 0


class DeleteItem(_Msg):
    """Take ``item`` out of the conversation (the thinker's cache is re-prefilled from there)."""
    session: str
    epoch: NonNeg
    item: ItemId
    req: NonNeg = 0


class Truncate(_Msg):
    """Keep only the first ``played_samples`` (24 kHz) of the last reply (thinker answers with tokens kept)."""
    session: str
    epoch: NonNeg
    played_samples: NonNeg
    req: NonNeg = 0


class Embeds(_Msg):
    """Encoders -> thinker: one encoded audio block (n, D) or video patch (with its (1, h, w) grid)."""
    session: str
    epoch: NonNeg
    kind: Literal["audio", "video"]
    embeds: Tensor  # (n, D)
    grid: Annotated[list[NonNeg], msgspec.Meta(max_length=3)] = []


class PromptRows(_Msg):
    """Thinker -> talker: per-token (embeds, hidden) (n, D) and TMRoPE ``positions`` (3, n) (``feed_prompt``)."""
    session: str
    embeds: Tensor  # (n, D)
    hidden: Tensor  # (n, D)
    positions: Tensor  # (3, n)
    next_position: int


class TruncatePrompt(_Msg):
    """Thinker -> talker: the Thinker's context was cut back to ``n_tokens``."""
    session: str
    n_tokens: NonNeg


class Step(_Msg):
    """Thinker -> talker: one decoded reply token with its input embedding and hidden state (D,)."""
    reply_work: ClassVar[bool] = True
    session: str
    epoch: NonNeg
    token: NonNeg
    embed: Tensor  # (D,)
    hidden: Tensor  # (D,)


class EndReply(_Msg):
    """Thinker -> talker -> token2wav: the reply text ended (``cancelled``: stop, do not finish)."""
    session: str
    epoch: NonNeg
    cancelled: bool


class Codes(_Msg):
    """Talker -> token2wav: codec tokens of the reply of ``epoch``."""
    reply_work: ClassVar[bool] = True
    session: str
    epoch: NonNeg
    codes: list[NonNeg]


class Done(_Msg):
    """A stage finished its part of a reply: ``text`` (thinker; ``speech`` says audio follows) or ``audio``."""
    session: str
    epoch: NonNeg
    part: Literal["text", "audio"]
    cancelled: bool
    text: str = ""
    reply_tokens: NonNeg = 0
    speech: bool = False
    stats: dict[str, float] = {}
    usage: dict[str, int] = {}  # input_tokens (prefilled for the reply), output_tokens (generated), ...
    tool_calls: list[dict[str, str]] = []  # {"name", "arguments" (JSON text)} per function call made


class ReplyError(_Msg):
    """A stage failed the reply of ``epoch`` (the reply ends with an error; the session goes on)."""
    session: str
    epoch: NonNeg
    code: str
    message: str


class Transcript(_Msg):
    """Input transcription of the user turn committed as ``item``: a piece of ``text``, or (``final``)
    the whole transcript; ``error`` set: it failed (``final`` too)."""
    session: str
    item: str
    seq: NonNeg
    text: str
    final: bool = False
    error: str | None = None
    usage: dict[str, int] = {}  # (final) input_tokens prefilled (audio_tokens of them), output_tokens decoded


class Result(_Msg):
    """Answer to an op with ``req`` > 0: ``value`` (e.g. tokens kept) or ``error``."""
    session: str
    req: NonNeg
    value: int = 0
    error: str | None = None
    code: str | None = None  # the error's stable code (client._error_code), e.g. turn_too_long


Message = (Hello | Ready | Ping | Pong | AudioChunk | TextDelta | Error | Epoch | Shutdown | OpenSession | CloseSession
           | BeginTurn | Frame | Commit | Clear | Respond | AddItem | DeleteItem | Truncate | Embeds | PromptRows
           | TruncatePrompt | Step | EndReply | Codes | Done | ReplyError | Transcript | Result)
