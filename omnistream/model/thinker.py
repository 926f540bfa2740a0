"""Incremental prefill and decode of the Qwen2.5-Omni Thinker against a persistent KV cache.

:class:`StreamingThinker` appends text, encoded audio blocks and encoded video patches to one
growing KV cache as they arrive (a :class:`~omnistream.memory.growing_cache.GrowingCache`, a row of a
pool shared by the model's sessions; a ``DynamicCache`` for sliding-window models), with TMRoPE
positions carried across chunks and turns (:mod:`omnistream.encoders.tmrope`). Encoded features take
the place of the placeholder tokens' embeddings, exactly as the model's ``masked_scatter`` does for an
offline forward. ``generate`` decodes token by token (a generator), and ``truncate`` rolls the cache and
positions back.

For the Talker, ``record=True`` keeps, per appended token, its layer-0 input embedding (zeros at
audio/image/video feature slots, as ``Qwen2_5OmniForConditionalGeneration.generate`` zeroes them)
and its last hidden state (after the final norm: what ``output_hidden_states`` returns as its last
entry). Both come out of the forward that runs anyway; with recording off (the default) nothing is
kept. ``decode`` yields :class:`ThinkerStep` (token, embedding, hidden state) for a live Talker.

Many sessions: :func:`step_tokens` appends one token to each of several thinkers in one batched
forward (a scheduler tick), each row against its own cache (growing or window, see
:mod:`omnistream.memory.batch`), leaving every thinker as ``append_text`` would have alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from omnistream.encoders.tmrope import AUDIO, IMAGE, VIDEO, Piece, TMRoPE


@dataclass
class ThinkerStep:
    """One decoded text token with what the Talker reads of it: its input embedding and its
    final-norm hidden state (both (D,), in the Thinker's dtype)."""

    token: int
    embed: torch.Tensor
    hidden: torch.Tensor


class StreamingThinker:
    """One conversation's KV cache over ``thinker`` (a ``Qwen2_5OmniThinkerForConditionalGeneration``)."""

    KEEP_HIDDEN = 256  # cut points (ends of recent appends) whose logits truncate() can restore

    def __init__(self, thinker, rope: TMRoPE | None = None, tokenizer=None, *, record: bool = False):
        self.thinker = thinker
        self.lm = thinker.model.language_model
        self.embed = thinker.get_input_embeddings()
        self.rope = rope if rope is not None else TMRoPE.from_config(thinker.config, tokenizer)
        self._cache_cls = growing_cache_cls(self.lm)
        self.record = record  # keep per-token (embed, hidden) for a Talker; see records()
        self.reset()

    def reset(self) -> None:
        """Forget everything: empty cache, fresh positions."""
        self.cache = self._cache_cls(config=self.lm.config)
        self.rope.reset()
        self.last_hidden: torch.Tensor | None = None  # (D,) final-norm hidden state of the last token
        self.last_embed: torch.Tensor | None = None  # (D,) layer-0 input of the last token
        self.last_logits: torch.Tensor | None = None  # (V,)
        self._hidden_at: dict[int, torch.Tensor] = {}  # token count -> last hidden (recent forwards)
        self._feats: dict[str, list[torch.Tensor]] = {}
        # recorded chunks: starts[i] is the token index of chunk i's first row
        self._rec_starts: list[int] = []
        self._rec: list[tuple[torch.Tensor, torch.Tensor]] = []  # (embeds (n, D), hidden (n, D))

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
    def _forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, feat_mask=None) -> None:
        """``feat_mask`` (n,) bool marks feature rows, recorded as zero embeddings."""
        if embeds.shape[0] == 0:
            return
        embeds = embeds.to(self.device, self.dtype)
        start = self.n_tokens
        out = self.lm(
            inputs_embeds=embeds[None],
            position_ids=position_ids.to(self.device)[:, None, :],
            cache=self.cache,
            use_cache=True,
        )
        self._commit(embeds, out.last_hidden_state[0], start, feat_mask)

    def _commit(self, embeds, hidden, start: int, feat_mask=None, logits=None) -> None:
        """After a forward of ``embeds`` (n, D) -> ``hidden`` (n, D) appended at token ``start``: the
        records, the last embed / hidden / logits (``logits`` (V,) when a batched step computed them)."""
        if self.record:
            if self._rec and self._rec_end() != start:  # recording was off for a while: not contiguous
                self._rec_starts, self._rec = [], []
            rec_e = embeds if feat_mask is None else embeds.masked_fill(feat_mask.to(self.device)[:, None], 0)
            self._rec_starts.append(start)
            self._rec.append((rec_e, hidden))
        self.last_embed = embeds[-1]
        self.last_hidden = hidden[-1]
        self.last_logits = self.thinker.lm_head(self.last_hidden) if logits is None else logits
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
        parts, is_feat = [], []
        for p in pieces:
            if p.kind in (AUDIO, IMAGE, VIDEO):
                feats = self._stream(p.kind)
                parts.append(feats[p.src : p.src + len(p.ids)].to(self.device, self.dtype))
            else:
                parts.append(self.embed(torch.tensor(p.ids, device=self.device)))
            if self.record:
                is_feat += [p.kind in (AUDIO, IMAGE, VIDEO)] * len(p.ids)
        mask = torch.tensor(is_feat) if any(is_feat) else None
        self._forward(torch.cat(parts), torch.cat([p.pos for p in pieces], dim=1), mask)

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

    # ------------------------------------------------------------------ Talker records
    @property
    def records_start(self) -> int:
        """First token index whose record is still held (``n_tokens`` when none are)."""
        return self._rec_starts[0] if self._rec_starts else self.n_tokens

    def records(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Recorded (embeds (n, D), hidden (n, D)) of tokens ``start:end`` (``record=True`` only)."""
        end = self.n_tokens if end is None else end
        if not 0 <= start <= end <= self.n_tokens:
            raise ValueError(f"records {start}:{end} outside 0:{self.n_tokens}")
        if start == end:
            z = torch.empty(0, self.embed.embedding_dim, device=self.device, dtype=self.dtype)
            return z, z
        if start < self.records_start or self._rec_end() < end:
            raise RuntimeError(
                f"tokens {start}:{end} were not recorded (records hold {self.records_start}:{self._rec_end()}); "
                "construct the StreamingThinker with record=True before appending"
            )
        i = bisect.bisect_right(self._rec_starts, start) - 1
        es, hs = [], []
        while i < len(self._rec) and self._rec_starts[i] < end:
            s0, (e, h) = self._rec_starts[i], self._rec[i]
            a, b = max(start - s0, 0), min(end - s0, e.shape[0])
            es.append(e[a:b])
            hs.append(h[a:b])
            i += 1
        return torch.cat(es), torch.cat(hs)

    def release_records(self, upto: int) -> None:
        """Free the records of tokens before ``upto`` (a Talker that consumed them calls this)."""
        while self._rec and self._rec_starts[0] + self._rec[0][0].shape[0] <= upto:
            del self._rec_starts[0], self._rec[0]
        if self._rec and self._rec_starts[0] < upto:
            k = upto - self._rec_starts[0]
            e, h = self._rec[0]
            self._rec[0] = (e[k:], h[k:])
            self._rec_starts[0] = upto

    def _rec_end(self) -> int:
        return self._rec_starts[-1] + self._rec[-1][0].shape[0] if self._rec else self.n_tokens

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
        steps = self.decode(
            max_new_tokens, stop_ids, do_sample=temperature > 0, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed,
        )
        for step in steps:
            yield step.token

    def decode(
        self,
        max_new_tokens: int | None = None,
        stop_ids: Sequence[int] | None = None,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[ThinkerStep]:
        """Like :meth:`generate`, yielding :class:`ThinkerStep` (token, input embedding, hidden
        state) for a Talker. Unset arguments come from the checkpoint's ``generation_config``
        (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``max_new_tokens``;
        1024 new tokens, as ``Qwen2_5OmniForConditionalGeneration.generate``, when it has none).
        A repetition penalty in the generation config is not applied.
        """
        gc = self.thinker.generation_config
        if max_new_tokens is None:
            max_new_tokens = gc.max_new_tokens or 1024
        if stop_ids is None:
            eos = gc.eos_token_id
            stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if do_sample is None:
            do_sample = bool(gc.do_sample)
        if do_sample:
            temperature = temperature if temperature is not None else (gc.temperature or 1.0)
            top_k = top_k if top_k is not None else gc.top_k
            top_p = top_p if top_p is not None else gc.top_p
        else:
            temperature = 0.0
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed) if seed is not None else gen.seed()  # global RNG untouched
        stop = {int(s) for s in stop_ids}
        for _ in range(max_new_tokens):
            tok = sample(self.next_token_logits(), temperature, top_k, top_p, gen)
            self.append_text([tok])
            yield ThinkerStep(tok, self.last_embed, self.last_hidden)
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
        self._truncate_records(n_tokens)
        self._hidden_at = {k: v for k, v in self._hidden_at.items() if k <= n_tokens}
        self.last_hidden = self._hidden_at.get(n_tokens)
        self.last_embed = None
        self.last_logits = None if self.last_hidden is None else self.thinker.lm_head(self.last_hidden)

    def _truncate_records(self, n_tokens: int) -> None:
        while self._rec and self._rec_starts[-1] >= n_tokens:
            del self._rec_starts[-1], self._rec[-1]
        if self._rec:
            e, h = self._rec[-1]
            k = n_tokens - self._rec_starts[-1]
            self._rec[-1] = (e[:k], h[:k])


# ---------------------------------------------------------------------- batched decode
def step_tokens(thinkers: Sequence[StreamingThinker], tokens: Sequence[int]) -> None:
    """Append ``tokens[b]`` to ``thinkers[b]`` for every b, in one batched forward per group.

    Afterwards each thinker (cache, positions, ``last_embed``/``last_hidden``/``last_logits``, Talker
    records) is as if ``thinkers[b].append_text([tokens[b]])`` had run alone, up to fp32 rounding (a
    batched matmul may sum in another order: logits agree to ~1e-6 on the tiny model). This is the
    Thinker half of a scheduler tick: one forward for the decode steps of all replying sessions.

    Rows are grouped by language model and by :func:`~omnistream.memory.batch.cache_kind` (a kernel-mode
    window cache holds pre-RoPE keys and cannot share a forward with post-RoPE caches); one forward per
    group, a group of one runs the solo path. Each row attends to its own session's cache: growing
    caches (the default) and the window caches of a ``window_thinker`` live in rows of one pool per kind
    and are attended in place (:class:`~omnistream.memory.batch.PoolBatch`); other caches (a
    ``DynamicCache``, a mix of pools) are gathered into padded buffers per step
    (:class:`~omnistream.memory.batch.BatchCache`). The thinkers must be distinct, with no media segment
    open; everything is checked before any row advances.
    """
    from omnistream.memory.batch import batch_cache, cache_kind, check_model
    from omnistream.model.thinker_graphs import ATTR as GRAPHS_ATTR

    if len(thinkers) != len(tokens):
        raise ValueError(f"{len(thinkers)} thinkers but {len(tokens)} tokens")
    if len({id(t) for t in thinkers}) != len(thinkers):
        raise ValueError("a StreamingThinker appears twice in one step")
    for i, th in enumerate(thinkers):
        if th.rope.open_segment is not None:
            raise RuntimeError(f"thinker {i}: a {th.rope.open_segment} segment is open; end_segment() first")
    groups: dict[tuple, list[int]] = {}
    for i, th in enumerate(thinkers):
        groups.setdefault((id(_base_lm(th)), cache_kind(th.cache)), []).append(i)
    runs = []
    for idx in groups.values():  # validate every group before any row advances
        batch = None
        if len(idx) > 1:
            check_model(_base_lm(thinkers[idx[0]]))
            batch = batch_cache([thinkers[i].cache for i in idx])
            idx = [idx[j] for j in batch.order]  # a pooled batch runs in pool-row order
        runs.append(([thinkers[i] for i in idx], [int(tokens[i]) for i in idx], batch))
    for rows, toks, batch in runs:
        graphs = getattr(_base_lm(rows[0]), GRAPHS_ATTR, None)  # omnistream.model.thinker_graphs, when enabled
        if graphs is not None and graphs.step(rows, toks):
            continue
        if batch is None:
            rows[0].append_text(toks)
        else:
            _step_group(rows, toks, batch)


def growing_cache_cls(lm):
    """The growing cache of a session on ``lm``: a :class:`~omnistream.memory.growing_cache.GrowingCache`
    in a row of the model's growable pool (batched steps attend the rows in place), or a ``DynamicCache``
    where the model has sliding-window layers (which a padding mask and a flat row cannot serve)."""
    from transformers import DynamicCache

    from omnistream.memory.growing_cache import GrowingCache, pooled_growing_ok
    from omnistream.memory.pool import growing_pool

    if getattr(lm, "has_sliding_layers", False) or not pooled_growing_ok(lm.config):
        return DynamicCache
    return partial(GrowingCache, pool=growing_pool(lm))


def _base_lm(th: StreamingThinker):
    """The language model itself (a window thinker wraps it to map positions; the batch maps them per row)."""
    return getattr(th.lm, "inner", th.lm)


@torch.inference_mode()
def _step_group(thinkers: list[StreamingThinker], tokens: list[int], batch) -> None:
    """One forward of B rows (same language model, same cache kind; ``batch`` the BatchCache of
    their caches), one new token each."""
    t0 = thinkers[0]
    lm = _base_lm(t0)
    pieces = [th.rope.text([tok]) for th, tok in zip(thinkers, tokens)]  # one text piece of one token each
    starts = [th.n_tokens for th in thinkers]
    embeds = t0.embed(torch.tensor(tokens, device=t0.device)).to(t0.device, t0.dtype)  # (B, D)
    # (3, N, 1), each in its cache's frame; N = B, or a pool span's rows (idle rows between: see PoolBatch)
    position_ids = batch.prepare([p[0].pos for p in pieces], t0.device)
    out = lm(
        inputs_embeds=batch.spread(embeds)[:, None],  # (N, 1, D)
        position_ids=position_ids,
        attention_mask=batch.mask_mapping(lm),
        cache=batch,
        use_cache=True,
    )
    hidden = batch.pick(out.last_hidden_state[:, -1])  # (B, D)
    logits = t0.thinker.lm_head(hidden)  # (B, V)
    for b, th in enumerate(thinkers):
        th._commit(embeds[b : b + 1], hidden[b : b + 1], starts[b], logits=logits[b])


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


# ---------------------------------------------------------------------- a windowed Thinker
class _PositionMappingLM:
    """Wraps a language model so each call first maps its positions through the WindowCache."""

    def __init__(self, lm):
        self._lm = lm
        self.inner = lm  # the wrapped model (batched decode maps positions per row itself)

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def __call__(self, *args, position_ids=None, cache=None, **kw):
        from omnistream.memory.window_cache import WindowCache

        if isinstance(cache, WindowCache):
            if position_ids is None:
                raise ValueError("a WindowCache needs explicit position_ids")
            position_ids = cache.cache_positions(position_ids)
        return self._lm(*args, position_ids=position_ids, cache=cache, **kw)


def window_thinker(thinker, window=None, rope=None, tokenizer=None, **kw):
    """A ``StreamingThinker`` whose cache is a :class:`WindowCache` (``n_tokens`` counts tokens seen;
    ``truncate`` works within the window, see :meth:`WindowCache.crop`).

    ``window.kernel=None`` turns kernel mode on when the Thinker is on CUDA; in kernel mode the
    Thinker's language model is switched to the ``"omnistream_window"`` attention function
    (:mod:`omnistream.kernels.window_attention`; other caches on the same model still get SDPA).
    The cache's buffers are a row of the model's :class:`~omnistream.memory.pool.RowPool` (one per slot
    count and layout), so :func:`step_tokens` batches these sessions without copying their caches."""
    from omnistream.memory.pool import row_pool
    from omnistream.memory.window_cache import WindowCache, WindowConfig

    window = window if window is not None else WindowConfig()
    if window.kernel is None:
        window = replace(window, kernel=thinker.get_input_embeddings().weight.device.type == "cuda")
    if window.kernel:
        from omnistream.kernels.window_attention import enable_window_attention

        enable_window_attention(thinker)
    st = StreamingThinker(thinker, rope, tokenizer, **kw)
    lm = st.lm
    st.lm = _PositionMappingLM(lm)
    w = window.resolve(getattr(lm.config, "max_position_embeddings", None))  # every session's cache: a pool row
    pool = row_pool(lm, w.sink_tokens + w.window_tokens + w.chunk_tokens, "kernel" if window.kernel else "rotated")
    st._cache_cls = partial(WindowCache, window=window, pool=pool)
    st.reset()
    return st
