"""Streaming Qwen2.5-Omni Talker: codec tokens while the Thinker is still writing its reply.

transformers' ``Qwen2_5OmniForConditionalGeneration.generate`` runs the Talker only after the
Thinker has finished. Its input, for a prompt of L tokens and a reply ``t_0 .. t_{n-1}``, is

* prefill: ``proj(h + e)`` of every prompt token (``e`` = the Thinker's layer-0 input embedding,
  zero at audio/image/video feature slots; ``h`` = its final-norm hidden state), then the voice's
  text-bos embedding ``+ codec_pad``, then ``h(t_0) + e(t_0) + codec_bos``; positions are
  ``get_rope_index(prompt ids + [voice bos, t_0])``;
* decode step k >= 1: ``codec_embed(c_{k-1}) + r_{k-1}`` with ``r = [h+e of t_1 .. t_{n-2},
  e(<tts_text_eod>), e(<tts_pad>)]``, the last element repeated once ``r`` is exhausted; the last
  reply token ``t_{n-1}`` (the stop token, or the last one at max length) is never read.

:class:`StreamingTalker` builds the same inputs incrementally: the prompt rows go into the Talker's
KV cache as the Thinker prefills them (:meth:`StreamingTalker.sync`), ``t_0`` triggers the reply
prefill and the first codec token, and codec token k is generated as soon as the Thinker's token
k+1 arrives (which shows that ``t_k`` is not the last, so ``r_{k-1} = h+e of t_k``): one step
behind the text. :meth:`StreamingTalker.finish` appends the text-eos and pad rows and decodes on
until a codec eos or the length limit. Greedy decoding reproduces transformers' codes.

transformers 5.x quirk: ``generate`` drops an all-ones attention mask before the first forward,
and the Talker's ``forward`` applies the ``get_rope_index`` positions and the codec pad/bos
prefill embeddings only when it gets a mask; ``Qwen2_5OmniForConditionalGeneration.generate``
(batch 1, no padding) therefore runs the Talker with sequential positions and without codec
pad/bos. This module follows the model's intended input (transformers' forward with its mask, as
the original Qwen code always passes it); ``TalkerConfig(hf_dropped_mask=True)`` reproduces the
installed ``generate`` instead.

Multi-turn: transformers re-reads the whole conversation prompt every turn (earlier turns'
replies included, as plain prompt rows). The Talker's cache holds exactly that prefix, so
:meth:`StreamingTalker.end_turn` crops it back to the prompt rows (dropping the voice bos, ``t_0``
and the codec steps of the turn), and the next :meth:`sync` appends the Thinker's records of the
reply tokens and the new user turn as prompt rows: the same input as transformers' for the
conversation the Thinker's cache holds, without re-running the prompt.

Many sessions: a scheduler queues each session's rows with :meth:`StreamingTalker.feed` /
:meth:`StreamingTalker.close_text` (``push``/``finish`` = those + decoding while ``ready()``) and
runs :func:`step_talkers` on every ``ready()`` talker: one batched Talker forward per tick, each row
against its own cache and sampled with its own generator, exactly as alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from omnistream.model.graphs import ATTR as GRAPHS_ATTR
from omnistream.model.thinker import StreamingThinker, ThinkerStep


@dataclass
class TalkerConfig:
    """Codec decoding settings; the defaults are ``Qwen2_5OmniForConditionalGeneration.generate``'s."""

    do_sample: bool = True
    top_k: int | None = 40
    top_p: float | None = 0.8
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    max_new_tokens: int = 4096  # codec tokens, the eos included
    eos_token_ids: tuple | None = None  # None: (codec_pad, codec_end) of the Talker config
    seed: int | None = None
    hf_dropped_mask: bool = False  # reproduce transformers 5.x generate (see the module docstring)


class StreamingTalker:
    """One conversation's Talker KV cache, fed by a :class:`StreamingThinker`."""

    def __init__(self, talker, thinker_embed_tokens, voice: dict, config: TalkerConfig | None = None):
        if not isinstance(voice, dict) or "bos_token" not in voice:
            raise ValueError("voice must be a speaker entry (a dict with 'bos_token'), e.g. ckpt.voices['Chelsie']")
        self.talker = talker
        self.model = talker.model
        self._thinker_embed = thinker_embed_tokens
        self.voice = voice
        self.config = config if config is not None else TalkerConfig()
        c = self.config
        self.codec_bos, self.codec_pad = int(talker.codec_bos_token), int(talker.codec_pad_token)
        self.codec_mask, codec_end = int(talker.codec_mask_token), int(talker.codec_eos_token)
        eos = c.eos_token_ids if c.eos_token_ids is not None else (self.codec_pad, codec_end)
        self.eos_ids = {int(i) for i in eos}
        p = next(talker.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._codec_embed = talker.get_input_embeddings()
        with torch.inference_mode():
            te = thinker_embed_tokens.weight
            ids = torch.tensor([int(voice["bos_token"]), int(talker.text_eos_token), int(talker.text_pad_token)])
            self._voice_bos_e, self._text_eos_e, self._text_pad_e = thinker_embed_tokens(ids.to(te.device))
            self._codec_pad_e, self._codec_bos_e = self._codec_embed(
                torch.tensor([self.codec_pad, self.codec_bos], device=self.device)
            )
        self.vocab = talker.codec_head.out_features
        self._gen = torch.Generator(device=self.device)
        self.reset()

    def set_voice(self, voice: dict) -> None:
        """Speak the next reply as ``voice`` (a speaker entry). The voice enters only at a reply's
        prefill (its bos embedding); the prompt rows in the cache do not depend on it, so a
        per-response voice needs no rebuild and gives the codes of a Talker built with that voice."""
        if voice is self.voice:
            return
        te = self._thinker_embed
        with torch.inference_mode():
            self._voice_bos_e = te(torch.tensor([int(voice["bos_token"])], device=te.weight.device))[0]
        self.voice = voice

    @classmethod
    def from_checkpoint(cls, ckpt, voice: str = "Chelsie", config: TalkerConfig | None = None) -> StreamingTalker:
        """A Talker for ``ckpt`` (an :class:`~omnistream.checkpoints.OmniCheckpoint`) speaking as ``voice``."""
        if voice not in ckpt.voices:
            raise ValueError(f"unknown voice {voice!r}; available voices: {', '.join(sorted(ckpt.voices))}")
        return cls(ckpt.talker, ckpt.thinker.get_input_embeddings(), ckpt.voices[voice], config)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the conversation: empty cache, no prompt."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.n_prompt = 0  # prompt rows in the cache
        self._next_pos = 0  # position of the voice bos (the prompt's next text position)
        self._new_turn()

    def _new_turn(self) -> None:
        self._release_row()
        self.started = False  # reply prefill done
        self.finished = False  # text ended (finish() called)
        self.done = False  # codec eos, length limit or cancel reached
        self.stop_reason: str | None = None  # "eos", "length" or "cancelled"
        self.codes: list[int] = []  # codec tokens of this turn (eos excluded)
        self.n_generated = 0
        self._held: torch.Tensor | None = None  # latest reply row, not yet known not to be the last
        self._queue: deque = deque()  # reply rows r_k ready to be consumed
        self._last: int | None = None  # last codec token (the next step's input)
        self._pos = 0  # position of the next decode step
        seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        seen[[self.codec_mask, self.codec_pad, self.codec_bos]] = True  # transformers' talker_input_ids
        self._seen = seen
        if self.config.seed is not None:  # else a fresh random seed, leaving torch's global RNG alone
            self._gen.manual_seed(self.config.seed)
        else:
            self._gen.seed()

    def end_turn(self) -> None:
        """Close the turn: crop the cache back to the prompt rows (see the module docstring)."""
        self._crop(self.n_prompt)
        self._new_turn()

    def cancel(self) -> None:
        """Stop this turn's speech now (barge-in); pushes and ``finish`` then yield nothing.
        Without a reply under way there is nothing to stop: a barge-in that lands between replies
        must not mute the next one."""
        if not self.started:
            return
        if not self.done:
            self.done, self.stop_reason = True, "cancelled"
        self._queue.clear()
        self._held = None
        self._release_row()

    def _graphs(self):
        """The Talker model's static decode rows (omnistream.model.graphs), when enabled and usable."""
        g = getattr(self.talker, GRAPHS_ATTR, None)
        return None if self.config.hf_dropped_mask else g

    def _release_row(self) -> None:
        g = getattr(self.talker, GRAPHS_ATTR, None)
        if g is not None:
            g.release(self)

    def truncate_prompt(self, n_tokens: int) -> None:
        """Follow a :meth:`StreamingThinker.truncate` to ``n_tokens`` (between turns)."""
        if self.started:
            raise RuntimeError("truncate_prompt during a reply; call end_turn() first")
        if n_tokens < self.n_prompt:
            self._crop(n_tokens)
            self.n_prompt = n_tokens
            self._next_pos = None  # the next sync (or feed_prompt's next_position) sets it

    def _crop(self, n: int) -> None:
        from transformers import DynamicCache

        if n == 0:
            self.cache = DynamicCache(config=self.model.config)
        elif self.cache.get_seq_length() > n:
            self.cache.crop(n - self.cache.get_seq_length())  # transformers 5: negative = drop

    # ------------------------------------------------------------------ prompt
    @torch.inference_mode()
    def feed_prompt(self, embeds, hidden, positions, next_position: int | None = None) -> None:
        """Append prompt rows: the Thinker's per-token ``embeds`` and ``hidden`` (n, D) and their
        TMRoPE ``positions`` (3, n). ``next_position`` is where the voice bos goes if the prompt
        ended now (default: last position + 1, right when the prompt ends with text)."""
        if self.started:
            raise RuntimeError("feed_prompt during a reply; call end_turn() first")
        n = embeds.shape[0]
        if hidden.shape[0] != n or positions.shape[-1] != n:
            raise ValueError(f"{n} embeds, {hidden.shape[0]} hidden states, {positions.shape[-1]} positions")
        if n:
            x = (hidden + embeds).to(self.device, self.dtype)
            self._run(x, positions.reshape(3, n))
            self.n_prompt += n
        if next_position is not None:
            self._next_pos = int(next_position)
        elif n:
            self._next_pos = int(positions.reshape(3, n)[:, -1].max()) + 1

    def sync(self, thinker: StreamingThinker, release: bool = True) -> int:
        """Feed the Thinker's records appended since the last sync as prompt rows (call it as the
        Thinker prefills, and before a reply). Returns the number of rows fed. ``release`` frees
        the Thinker's records once fed. Switches the Thinker's recording on: a first sync before
        anything is appended attaches the Talker."""
        thinker.record = True
        start, end = self.n_prompt, thinker.n_tokens
        if end < start:
            raise RuntimeError(f"the Thinker holds {end} tokens, the Talker's prompt {start}: truncate_prompt first")
        e, h = thinker.records(start, end)
        self.feed_prompt(e, h, thinker.rope.positions[:, start:end], thinker.rope.next_position)
        if release:
            thinker.release_records(end)
        return end - start

    # ------------------------------------------------------------------ reply
    def push(self, step: ThinkerStep) -> list[int]:
        """Take the Thinker's next reply token; return the codec tokens that became computable."""
        return self.feed(step) + list(self._drain())

    def finish(self) -> Iterator[int]:
        """The text has ended: yield the remaining codec tokens (until codec eos or the limit)."""
        if not self.close_text():
            return iter(())
        return self._drain()

    def stream(self, steps: Iterable[ThinkerStep]) -> Iterator[int]:
        """All codec tokens for a reply given as Thinker steps (push each, then finish)."""
        for s in steps:
            yield from self.push(s)
        yield from self.finish()

    # ------------------------------------------------------------------ the scheduler's half
    # push() = feed() + decode while ready(); finish() = close_text() + decode while ready(). A scheduler
    # calls feed()/close_text() per session and step_talkers() on every ready() talker at once instead.
    def feed(self, step: ThinkerStep) -> list[int]:
        """Queue the Thinker's next reply token without decoding (the first one runs the reply
        prefill, per session, and returns its codec token). Decode with :func:`step_talkers`."""
        if self.done:
            return []
        if self.finished:
            raise RuntimeError("push after finish(); call end_turn() first")
        row = step.hidden + step.embed
        if not self.started:
            return self._prefill_reply(row)
        if self._held is not None:
            self._queue.append(self._held)
        self._held = row
        return []

    def close_text(self) -> bool:
        """The text has ended: queue the text-eos and pad rows. False when there is nothing to
        decode (no reply started, or already closed)."""
        if self.finished or not self.started:
            self.finished = True
            return False
        self.finished = True
        self._held = None  # the last reply token is never read (transformers neither)
        self._queue.append(self._text_eos_e)
        self._queue.append(self._text_pad_e)
        return True

    def ready(self) -> bool:
        """Whether a decode step can run now (a reply row is queued and the codec has not ended)."""
        return self.started and not self.done and bool(self._queue)

    def _take_row(self) -> torch.Tensor:
        """The next decode step's reply row (D_thinker,); once the text ended, the pad row repeats."""
        return self._queue.popleft() if (len(self._queue) > 1 or not self.finished) else self._queue[0]

    def _drain(self) -> Iterator[int]:
        while self.ready():
            tok = self._decode_step(self._take_row())
            if tok is not None:
                yield tok

    @torch.inference_mode()
    def _decode_step(self, row: torch.Tensor) -> int | None:
        if (g := self._graphs()) is not None:
            return g.step([self], [row])[0]
        x = self._codec_embed(torch.tensor([self._last], device=self.device))[0] + row.to(self.device, self.dtype)
        tok = self._emit(self._run(x[None], torch.full((3, 1), self._pos, dtype=torch.long)))
        self._pos += 1
        return tok

    @torch.inference_mode()
    def _prefill_reply(self, row0: torch.Tensor) -> list[int]:
        if self._next_pos is None:
            raise RuntimeError("prompt positions unknown after truncate_prompt: sync or feed_prompt first")
        if self.cache.get_seq_length() != self.n_prompt:
            raise RuntimeError("the cache holds a previous reply; call end_turn() first")
        p = self._next_pos
        voice = self._voice_bos_e.to(row0.device, row0.dtype)
        if self.config.hf_dropped_mask:
            x = torch.stack([voice, row0])
        else:
            x = torch.stack([
                voice + self._codec_pad_e.to(row0.device, row0.dtype),
                row0 + self._codec_bos_e.to(row0.device, row0.dtype),
            ])
        x = x.to(self.device, self.dtype)
        self.started = True
        tok = self._emit(self._run(x, torch.arange(p, p + 2).expand(3, -1)))
        self._pos = p + 2
        return [] if tok is None else [tok]

    @torch.inference_mode()
    def _run(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """proj + Talker LM over rows ``x`` (n, D_thinker) at ``positions`` (3, n); last logits."""
        if self.config.hf_dropped_mask:  # positions = cache index, as the Talker model defaults to
            n0 = self.cache.get_seq_length()
            positions = torch.arange(n0, n0 + x.shape[0]).expand(3, -1)
        out = self.model(
            inputs_embeds=self.talker.thinker_to_talker_proj(x)[None],
            position_ids=positions.to(self.device)[:, None, :],
            cache=self.cache,
            use_cache=True,
        )
        return self.talker.codec_head(out.last_hidden_state[0, -1]).float()

    # ------------------------------------------------------------------ sampling
    @torch.inference_mode()
    def _emit(self, logits: torch.Tensor) -> int | None:
        """Pick the next codec token as transformers' processors would; None at eos/limit."""
        c = self.config
        if c.repetition_penalty != 1.0:
            pen = torch.where(logits < 0, logits * c.repetition_penalty, logits / c.repetition_penalty)
            logits = torch.where(self._seen, pen, logits)
        logits = logits.clone()
        logits[self.codec_bos] = float("-inf")  # suppress_tokens=[codec_bos]
        if c.do_sample:
            tok = int(torch.multinomial(torch.softmax(_warp(logits, c), -1), 1, generator=self._gen))
        else:
            tok = int(torch.argmax(logits))
        self.n_generated += 1
        self._seen[tok] = True
        self._last = tok
        if tok in self.eos_ids:
            self.done, self.stop_reason = True, "eos"
            return None
        self.codes.append(tok)
        if self.n_generated >= c.max_new_tokens:
            self.done, self.stop_reason = True, "length"
        return tok


def step_talkers(talkers: Sequence[StreamingTalker]) -> list[int | None]:
    """One Talker decode step for every given talker, in one batched forward per Talker model.

    Each talker consumes its next reply row and emits its next codec token (None when it emitted
    its codec eos: it is then ``done``), sampled exactly as alone: its own generator, repetition
    penalty, top-k/top-p, eos ids and length limit (``_emit``). Every talker must be :meth:`ready`
    (checked before any advances); a group of one runs the solo step. Each row attends to its own
    session's cache (:class:`~omnistream.memory.batch.BatchCache`). The reply prefill (the first
    step, two rows) stays per session (:meth:`StreamingTalker.feed`).
    """
    if len({id(t) for t in talkers}) != len(talkers):
        raise ValueError("a StreamingTalker appears twice in one step")
    for i, t in enumerate(talkers):
        if not t.ready():
            raise RuntimeError(f"talker {i} has no decode row ready (check ready() first)")
    out: list[int | None] = [None] * len(talkers)
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(talkers):
        groups.setdefault(id(t.talker), []).append(i)
    for idx in groups.values():
        g = talkers[idx[0]]._graphs()
        if g is not None and all(talkers[i]._graphs() is g for i in idx):
            for i, tok in zip(idx, g.step([talkers[i] for i in idx])):
                out[i] = tok
        elif len(idx) == 1:
            t = talkers[idx[0]]
            out[idx[0]] = t._decode_step(t._take_row())
        else:
            for i, tok in zip(idx, _step_group([talkers[i] for i in idx])):
                out[i] = tok
    return out


@torch.inference_mode()
def _step_group(talkers: list[StreamingTalker]) -> list[int | None]:
    """One forward of B talkers (same Talker model): the batched form of ``_decode_step``."""
    from omnistream.memory.batch import BatchCache

    t0 = talkers[0]
    batch = BatchCache([t.cache for t in talkers])  # validates before any row is consumed
    rows = torch.stack([t._take_row().to(t0.device, t0.dtype) for t in talkers])  # (B, D_thinker)
    last = torch.tensor([t._last for t in talkers], device=t0.device)
    x = t0._codec_embed(last) + rows  # (B, D_thinker)
    pos = [torch.full((3, 1), t.cache.get_seq_length() if t.config.hf_dropped_mask else t._pos) for t in talkers]
    out = t0.model(
        inputs_embeds=t0.talker.thinker_to_talker_proj(x)[:, None],  # (B, 1, D_talker)
        position_ids=batch.prepare(pos, t0.device),  # (3, B, 1)
        attention_mask=batch.mask_mapping(t0.model),
        cache=batch,
        use_cache=True,
    )
    logits = t0.talker.codec_head(out.last_hidden_state[:, -1]).float()  # (B, V)
    toks = []
    for b, t in enumerate(talkers):
        toks.append(t._emit(logits[b]))
        t._pos += 1
    return toks


def _warp(logits: torch.Tensor, c: TalkerConfig) -> torch.Tensor:
    """Temperature, top-k, top-p, as transformers' TemperatureLogitsWarper / TopK / TopP."""
    if c.temperature is not None and c.temperature != 1.0:
        logits = logits / c.temperature
    if c.top_k:
        k = min(c.top_k, logits.shape[-1])
        logits = logits.masked_fill(logits < torch.topk(logits, k).values[-1], float("-inf"))
    if c.top_p is not None and c.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - c.top_p)
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits
