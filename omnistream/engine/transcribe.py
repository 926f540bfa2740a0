"""Input transcription by the Thinker itself: its ASR prompt on a copy of a user turn's audio.

Realtime clients ask for the user's words (``audio.input.transcription`` / beta
``input_audio_transcription``). A second speech model is not needed: Qwen2.5-Omni's Thinker is
trained for speech recognition, and the turn's audio is already encoded (the conversation kept a
copy of its audio blocks, :attr:`omnistream.engine.conversation.Conversation.turn_audio`). So a
transcription is one more, short Thinker run -- on a fresh cache of its own, never the
conversation's, so the dialogue is untouched -- framed as Qwen's cookbook frames ASR
(``cookbooks/universal_audio_understanding.ipynb`` of QwenLM/Qwen2.5-Omni: system prompt "You are a
speech recognition model.", a user turn with the audio followed by the instruction "Transcribe the
English audio into text without any punctuation marks."; the language is left out here, as the
turn may be in any language), decoded greedily.

:func:`transcribe_task` is a scheduler task (:mod:`omnistream.engine.scheduler`): the prompt is
prefilled one audio block per tick and every decode step is a ``thinker.decode`` Need, so the
stage batches it with the replies' steps (at low priority) instead of stalling them;
:class:`Transcriptions` keeps a stage's queue of them per session, in commit order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator, Sequence

import torch

from omnistream.engine.scheduler import Need, Running

log = logging.getLogger(__name__)

ASR_SYSTEM_PROMPT = "You are a speech recognition model."
ASR_INSTRUCTION = "Transcribe the audio into text."
AUDIO_TOKENS_PER_TRANSCRIPT_TOKEN = 5  # 25 audio tokens/s; speech is ~2.5 words (~4 tokens) per second


def transcript_budget(audio_tokens: int) -> int:
    """Most tokens a transcript of ``audio_tokens`` may take (a checkpoint that never stops is cut there)."""
    return 32 + audio_tokens // AUDIO_TOKENS_PER_TRANSCRIPT_TOKEN


def asr_prompt(tok) -> tuple[list[int], list[int]]:
    """The token ids before the audio segment and after it (chat-template framing of one ASR turn)."""
    head = f"<|im_start|>system\n{ASR_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    tail = f"{ASR_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    return tok(head, add_special_tokens=False).input_ids, tok(tail, add_special_tokens=False).input_ids


def transcribe_task(ck, blocks: Sequence[torch.Tensor], on_delta: Callable[[str], None],
                    max_new_tokens: int | None = None, usage: dict | None = None,
                    hold: Callable[[], bool] = lambda: False) -> Generator:
    """Transcribe the audio ``blocks`` (each (n, D): the encoder's output for one block of the turn).

    Yields ``None`` after each bounded piece of prefill and ``Need("thinker.decode", (thinker, token))``
    for each decode step; ``on_delta`` gets the text as it decodes (whole characters), at most
    ``max_new_tokens`` tokens (None: :func:`transcript_budget`); ``usage`` (a dict) gets the token
    counts: ``input_tokens`` prefilled (``audio_tokens`` of them), ``output_tokens`` decoded. While
    ``hold()`` is true nothing runs (the worker holds it while a reply of the session waits for its
    first token, so that token's forward is not slowed by this one's rows). Returns the transcript.
    Raises ValueError when there is no audio to transcribe."""
    from omnistream.engine.turns import TextDeltas
    from omnistream.model.thinker import StreamingThinker, sample

    if not blocks:
        raise ValueError("the turn holds no audio to transcribe")
    tok = ck.tokenizer
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    head, tail = asr_prompt(tok)
    yield  # nothing in the tick that starts it: the reply's first token, decoded beside it, goes first
    while hold():
        yield
    th = StreamingThinker(ck.thinker, tokenizer=tok)  # its own cache: the conversation's is never touched
    th.append_text(head)
    th.begin_audio()
    for b in blocks:
        yield  # one block of prefill per tick: the replies' decode steps go on between them
        while hold():
            yield
        th.append_audio_block(b)
    th.end_segment()
    th.append_text(tail)
    usage = {} if usage is None else usage
    usage.update(input_tokens=th.n_tokens, audio_tokens=sum(int(b.shape[0]) for b in blocks), output_tokens=0)
    deltas, texts = TextDeltas(tok), []
    if max_new_tokens is None:
        max_new_tokens = transcript_budget(usage["audio_tokens"])
    for _ in range(max_new_tokens):
        token = sample(th.next_token_logits())  # greedy
        if token in stop:
            break
        while hold():
            yield
        yield Need("thinker.decode", (th, token))
        usage["output_tokens"] += 1
        texts.append(deltas.push(token))
        if texts[-1]:
            on_delta(texts[-1])
    texts.append(deltas.flush())
    if texts[-1]:
        on_delta(texts[-1])
    return "".join(texts)  # the deltas add up to it


class Transcription:
    """One committed turn's transcription: the scheduler key of its task, and what it produced."""

    def __init__(self, sid: str, item: str):
        self.sid, self.item = sid, item
        self.texts: list[str] = []  # the deltas sent so far
        self.usage: dict[str, int] = {}  # filled by the task
        self.run: Running | None = None
        self.after: list[Callable[[], None]] = []  # run once its final event is out (a reply's end)


class Transcriptions:
    """The input transcriptions of a stage's sessions: per session a queue in commit order whose head
    runs (beside the replies, in the same batched forwards: :meth:`tasks`).

    ``emit(t, text, final, error)`` sends one event of transcription ``t`` (its ``seq`` is
    ``len(t.texts)``); nothing here knows how. :meth:`after` holds a callback (the ``Done`` of the
    turn's reply) until the session's queued transcriptions are out, which is what puts every
    transcript before the end of the reply that answers its turn.
    """

    def __init__(self, ck, emit: Callable[..., None]):
        self.ck, self.emit = ck, emit
        self.queues: dict[str, deque[Transcription]] = {}

    def start(self, sid: str, item: str, blocks: Sequence[torch.Tensor], hold: Callable[[], bool]) -> None:
        t = Transcription(sid, item)

        def delta(text: str) -> None:
            t.texts.append(text)
            self.emit(t, text, False, None)

        t.run = Running(transcribe_task(self.ck, blocks, delta, usage=t.usage, hold=hold))
        self.queues.setdefault(sid, deque()).append(t)

    def tasks(self):
        """(key, Running) of the head transcription of each session."""
        for queue in list(self.queues.values()):
            if queue:
                yield queue[0], queue[0].run

    def ended(self, t: Transcription, error: BaseException | None) -> None:
        """Its task ended (the scheduler's ``on_end``): the final event, then what waited for it."""
        t.run = None
        queue = self.queues.get(t.sid)
        if queue and queue[0] is t:
            queue.popleft()
            if not queue:
                del self.queues[t.sid]
        if error is not None:
            log.info("transcription of %s (session %s) failed: %s", t.item, t.sid, error)
        self.emit(t, "" if error else "".join(t.texts), True, None if error is None else f"{type(error).__name__}: {error}")
        for fn in t.after:
            fn()

    def after(self, sid: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the transcriptions queued for ``sid`` are out (at once when there are none)."""
        if queue := self.queues.get(sid):
            queue[-1].after.append(fn)
        else:
            fn()

    def drop(self, sid: str) -> None:
        """The session closed: its transcriptions stop (nothing more is sent)."""
        for t in self.queues.pop(sid, ()):
            if t.run is not None and t.run.gen is not None:
                t.run.gen.close()
