"""Incremental prefill and decode of the Qwen2.5-Omni Thinker against a persistent KV cache.

:class:`StreamingThinker` appends text, encoded audio blocks and encoded video patches to one
``DynamicCache`` as they arrive, with TMRoPE positions carried across chunks and turns
(:mod:`omnistream.encoders.tmrope`). Encoded features take the place of the placeholder tokens'
embeddings, exactly as the model's ``masked_scatter`` does for an offline forward. ``generate``
decodes token by token (a generator), and ``truncate`` rolls the cache and positions back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from omnistream.encoders.tmrope import AUDIO, IMAGE, VIDEO, Piece, TMRoPE


class StreamingThinker:
    """One conversation's KV cache over ``thinker`` (a ``Qwen2_5OmniThinkerForConditionalGeneration``)."""

    KEEP_HIDDEN = 256  # cut points (ends of recent appends) whose logits truncate() can restore

    def __init__(self, thinker, rope: TMRoPE | None = None, tokenizer=None):
        from transformers import DynamicCache

        self.thinker = thinker
        self.lm = thinker.model.language_model
        self.embed = thinker.get_input_embeddings()
        self.rope = rope if rope is not None else TMRoPE.from_config(thinker.config, tokenizer)
        self._cache_cls = DynamicCache
        self.reset()

    def reset(self) -> None:
        """Forget everything: empty cache, fresh positions."""
        self.cache = self._cache_cls(config=self.lm.config)
        self.rope.reset()
        self.last_hidden: torch.Tensor | None = None  # (D,) final-norm hidden state of the last token
        self.last_logits: torch.Tensor | None = None  # (V,)
        self._hidden_at: dict[int, torch.Tensor] = {}  # token count -> last hidden (recent forwards)
        self._feats: dict[str, list[torch.Tensor]] = {}

    @property
    def n_tokens(self) -> int:
        return self.cache.get_seq_length()

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    # ------------------------------------------------------------------ the forward
    @torch.inference_mode()
    def _forward(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> None:
        if embeds.shape[0] == 0:
            return
        out = self.lm(
            inputs_embeds=embeds[None].to(self.device, self.dtype),
            position_ids=position_ids.to(self.device)[:, None, :],
            cache=self.cache,
            use_cache=True,
        )
        self.last_hidden = out.last_hidden_state[0, -1]
        self.last_logits = self.thinker.lm_head(self.last_hidden)
        self._hidden_at[self.n_tokens] = self.last_hidden
        if len(self._hidden_at) > self.KEEP_HIDDEN:
            del self._hidden_at[min(self._hidden_at)]

    def append_embeds(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Run the LM on ``embeds`` (n, D) at ``position_ids`` (3, n) against the cache (caller-placed)."""
        if embeds.shape[0] != position_ids.shape[-1]:
            raise ValueError(f"{embeds.shape[0]} embeddings but {position_ids.shape[-1]} positions")
        self.rope.external(position_ids)
        self._forward(embeds, position_ids)

    @torch.inference_mode()
    def _run(self, pieces: Sequence[Piece]) -> None:
        """Embed the pieces (token ids or the open segment's features) and forward them at once."""
        if not pieces:
            return
        parts = []
        for p in pieces:
            if p.kind in (AUDIO, IMAGE, VIDEO):
                feats = self._stream(p.kind)
                parts.append(feats[p.src : p.src + len(p.ids)].to(self.device, self.dtype))
            else:
                parts.append(self.embed(torch.tensor(p.ids, device=self.device)))
        self._forward(torch.cat(parts), torch.cat([p.pos for p in pieces], dim=1))

    def _stream(self, kind: str) -> torch.Tensor:
        chunks = self._feats.get(kind, [])
        if len(chunks) > 1:
            self._feats[kind] = chunks = [torch.cat(chunks)]
        return chunks[0]

    def _add_feats(self, kind: str, embeds: torch.Tensor, n: int) -> None:
        if embeds.ndim != 2 or embeds.shape[0] != n:
            raise ValueError(f"{kind} features of shape {tuple(embeds.shape)}, expected ({n}, D)")
        self._feats.setdefault(kind, []).append(embeds.detach())

    # ------------------------------------------------------------------ appending
    def append_text(self, ids) -> None:
        """Text token ids (a list or 1-D tensor)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        self._run(self.rope.text(ids))

    def begin_audio(self) -> None:
        self._begin(self.rope.begin_audio)

    def begin_image(self) -> None:
        self._begin(self.rope.begin_image)

    def begin_video(self, second_per_grid: float = 1.0, *, with_audio: bool = False) -> None:
        """A video segment; ``with_audio`` interleaves its audio track ("use_audio_in_video")."""
        if with_audio:
            self._begin(self.rope.begin_audio_video, second_per_grid)
        else:
            self._begin(self.rope.begin_video, second_per_grid)

    def _begin(self, fn, *args) -> None:
        self._feats = {}
        self._run(fn(*args))

    def append_audio_block(self, embeds: torch.Tensor) -> None:
        """One encoded audio block (n, D) of the open audio / audio-in-video segment."""
        self._add_feats(AUDIO, embeds, embeds.shape[0])
        self._run(self.rope.audio_block(embeds.shape[0]))

    def append_video_patch(self, embeds: torch.Tensor, grid) -> None:
        """One encoded temporal patch of the open image/video segment; ``grid`` is (h, w) or
        (1, h, w) in unmerged patches (``grid_thw`` of that patch), ``embeds`` is (h*w/4, D)."""
        if len(grid) == 3 and int(grid[0]) != 1:
            raise ValueError("append one temporal patch at a time (grid_t == 1)")
        kind = IMAGE if self.rope.open_segment == IMAGE else VIDEO
        m = self.rope.merge
        self._add_feats(kind, embeds, (int(grid[-2]) // m) * (int(grid[-1]) // m))
        self._run(self.rope.video_patch(grid[-2:]))

    def end_segment(self) -> None:
        """Close the open segment (flushes held-back audio-in-video tokens, appends the eos)."""
        self._run(self.rope.end())
        self._feats = {}

    def append_audio(self, blocks: Sequence[torch.Tensor]) -> None:
        """A whole audio segment from its encoded blocks."""
        self.begin_audio()
        for b in blocks:
            self.append_audio_block(b)
        self.end_segment()

    def append_image(self, embeds: torch.Tensor, grid_thw) -> None:
        """A whole image segment; ``embeds`` are the vision tower's merged features."""
        self.begin_image()
        per = embeds.shape[0] // int(grid_thw[0])
        for k in range(int(grid_thw[0])):
            self.append_video_patch(embeds[k * per : (k + 1) * per], grid_thw[1:])
        self.end_segment()

    # ------------------------------------------------------------------ decoding
    def next_token_logits(self) -> torch.Tensor:
        """Logits (V,) for the token after everything appended so far."""
        if self.last_logits is None:
            raise RuntimeError("no logits: append something first (truncate() clears them)")
        return self.last_logits

    def generate(
        self,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` token ids; each is appended to the cache before it is
        yielded (so the cache always holds every yielded token). Stops after a ``stop_ids`` token."""
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        stop = {int(s) for s in stop_ids}
        for _ in range(max_new_tokens):
            tok = sample(self.next_token_logits(), temperature, top_k, top_p, gen)
            self.append_text([tok])
            yield tok
            if tok in stop:
                return

    # ------------------------------------------------------------------ rewinding
    @torch.inference_mode()
    def truncate(self, n_tokens: int) -> None:
        """Crop the cache back to ``n_tokens`` tokens and rewind the positions exactly.

        The cut must lie outside multimodal segments. If ``n_tokens`` is the end of one of the
        recent appends (e.g. any decoded token) its logits are restored, else they are cleared
        until the next append.
        """
        removed = self.n_tokens - n_tokens
        self.rope.truncate(n_tokens)  # validates the cut point first
        if n_tokens == 0:
            self.cache = self._cache_cls(config=self.lm.config)
        elif removed:
            self.cache.crop(-removed)  # transformers 5: a negative count of tokens to drop
        self._feats = {}
        self._hidden_at = {k: v for k, v in self._hidden_at.items() if k <= n_tokens}
        self.last_hidden = self._hidden_at.get(n_tokens)
        self.last_logits = None if self.last_hidden is None else self.thinker.lm_head(self.last_hidden)


def sample(logits: torch.Tensor, temperature=0.0, top_k=None, top_p=None, generator=None) -> int:
    """Greedy when ``temperature`` is 0, else temperature / top-k / top-p (nucleus) sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
