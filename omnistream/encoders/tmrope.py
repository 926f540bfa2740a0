"""Incremental TMRoPE: Qwen2.5-Omni's 3-D (time, height, width) position ids, computed as a stream arrives.

transformers computes the positions of a whole prompt at once (``get_rope_index``); a streaming
runtime appends a few tokens at a time to a KV cache that already holds earlier chunks and turns.
:class:`TMRoPE` carries the state between calls and reproduces ``get_rope_index`` exactly,
including its quirks:

* the next piece starts at ``max(last piece) + 1`` where a *piece* is what transformers appends to
  its ``llm_pos_ids_list`` (a text run, a bos, an audio run, a whole image/video, one chunk of an
  audio-in-video block, an eos).  Inside an audio-in-video block the eos therefore follows the max
  of the *last chunk*, which can be below the max of the block;
* audio-in-video tokens are grouped by ``get_chunked_index``, whose chunk counter advances by one
  per crossing (a value jump over several chunks yields single-token chunks), and laid out as
  ``V_0 A_0 V_1 A_1 ...``; tokens that arrive before their slot is known are held back and
  released (as :class:`Piece` s) once the chunk before them is closed;
* video temporal positions are ``(k * float32(second_per_grid) * 25).long()``.

Every call returns a list of :class:`Piece` in sequence order; ``Piece.src`` says which rows of
the segment's encoded features (audio / image / video stream) fill its placeholder slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT, BOS, EOS, AUDIO, IMAGE, VIDEO = "text", "bos", "eos", "audio", "image", "video"


def audio_tokens_for_frames(n_frames: int) -> int:
    """LLM tokens of an audio of ``n_frames`` mel frames (conv stride 2, then avg-pool 2)."""
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1


def audio_block_tokens(n_frames: int, block: int = 200) -> list[int]:
    """Token counts of the encoder blocks (``2 * n_window`` frames each) of an ``n_frames`` audio."""
    sizes = [block] * (n_frames // block) + ([n_frames % block] if n_frames % block else [])
    return [audio_tokens_for_frames(s) for s in sizes]


@dataclass
class Piece:
    """Consecutive tokens of one kind: ``ids`` (placeholder ids for feature slots), ``pos`` (3, n)."""

    kind: str
    ids: list
    pos: torch.Tensor
    src: int = 0  # first feature row (within the open segment's stream of this kind)


# Segment descriptions (for :meth:`TMRoPE.build`, prompt builders and tests).
@dataclass
class Text:
    ids: list


@dataclass
class Audio:
    blocks: list  # token count of each encoded block


@dataclass
class Image:
    grid_thw: tuple


@dataclass
class Video:
    grid_thw: tuple
    second_per_grid: float = 1.0


@dataclass
class AudioVideo:
    grid_thw: tuple
    second_per_grid: float
    blocks: list  # audio token count of each encoded block


@dataclass
class _Open:
    kind: str  # AUDIO, IMAGE, VIDEO or "av"
    st: int  # first position after the bos
    spg: float = 1.0
    grid_hw: tuple | None = None
    n: dict = field(default_factory=lambda: {AUDIO: 0, VIDEO: 0, IMAGE: 0})  # tokens seen per stream
    t_patches: int = 0
    # audio-in-video chunking: per stream, current chunk id and get_chunked_index's counter
    chunk: dict = field(default_factory=lambda: {AUDIO: 0, VIDEO: 0})
    counter: dict = field(default_factory=lambda: {AUDIO: 1, VIDEO: 1})
    pending: dict = field(default_factory=lambda: {AUDIO: [], VIDEO: []})  # (chunk, src, pos col)
    ended: dict = field(default_factory=lambda: {AUDIO: False, VIDEO: False})
    j: int = 0
    phase: str = VIDEO
    key: tuple | None = None


class TMRoPE:
    """Position-id state of one conversation (one KV cache). See the module docstring."""

    def __init__(self, *, ids: dict, position_id_per_seconds=25, seconds_per_chunk=2, spatial_merge_size=2):
        self._args = dict(ids=dict(ids), position_id_per_seconds=position_id_per_seconds,
                          seconds_per_chunk=seconds_per_chunk, spatial_merge_size=spatial_merge_size)
        self.ids = ids  # audio, image, video, audio_bos, audio_eos, vision_bos, vision_eos
        self.pps = position_id_per_seconds
        self.tpc = int(position_id_per_seconds * seconds_per_chunk)
        self.merge = spatial_merge_size
        self.reset()

    @classmethod
    def from_config(cls, thinker_config, tokenizer=None) -> TMRoPE:
        c = thinker_config

        def get(attr, tok):
            v = getattr(c, attr, None)
            if v is None and tokenizer is not None:
                v = tokenizer.convert_tokens_to_ids(tok)
            if v is None:
                raise ValueError(f"thinker config has no {attr} (pass the tokenizer)")
            return int(v)

        ids = dict(
            audio=get("audio_token_id", "<|AUDIO|>"),
            image=get("image_token_id", "<|IMAGE|>"),
            video=get("video_token_id", "<|VIDEO|>"),
            audio_bos=get("audio_start_token_id", "<|audio_bos|>"),
            audio_eos=get("audio_end_token_id", "<|audio_eos|>"),
            vision_bos=get("vision_start_token_id", "<|vision_bos|>"),
            vision_eos=get("vision_end_token_id", "<|vision_eos|>"),
        )
        return cls(ids=ids, position_id_per_seconds=c.position_id_per_seconds,
                   seconds_per_chunk=c.seconds_per_chunk, spatial_merge_size=c.vision_config.spatial_merge_size)

    def fresh(self) -> TMRoPE:
        """A new, empty state with the same settings."""
        return TMRoPE(**self._args)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self._pos = torch.empty(3, 0, dtype=torch.long)
        self._chunks: list[torch.Tensor] = []
        self._resume: list = [0]  # per token count: next start if a segment boundary, else None
        self._piece_key = None
        self._piece_max = -1
        self._open: _Open | None = None
        self._keys = 0

    @property
    def n_tokens(self) -> int:
        return len(self._resume) - 1

    @property
    def positions(self) -> torch.Tensor:
        """(3, n_tokens) positions of every token emitted so far."""
        if self._chunks:
            self._pos = torch.cat([self._pos, *self._chunks], dim=1)
            self._chunks = []
        return self._pos

    @property
    def next_position(self) -> int:
        """Where a text token appended now would go (``max(last piece) + 1``)."""
        return self._piece_max + 1

    @property
    def rope_delta(self) -> int:
        """transformers' ``mrope_position_deltas``: global max + 1 - n_tokens (decode offset)."""
        return (int(self.positions.max()) + 1 if self.n_tokens else 0) - self.n_tokens

    @property
    def open_segment(self) -> str | None:
        return None if self._open is None else self._open.kind

    def _emit(self, kind, ids, pos, key, src=0, boundary=False) -> Piece:
        if key != self._piece_key:
            self._piece_key, self._piece_max = key, -1
        self._piece_max = max(self._piece_max, int(pos.max()))
        self._chunks.append(pos)
        if kind == TEXT and key[-1] == TEXT:  # every text token is a cut point (pos is an arange)
            self._resume.extend((pos[0] + 1).tolist())
        else:
            self._resume.extend([None] * (pos.shape[1] - 1) + [self._piece_max + 1 if boundary else None])
        return Piece(kind, list(ids), pos, src)

    def _key(self, *parts):
        self._keys += 1
        return (self._keys, *parts)

    def _arange(self, n, start):
        return (torch.arange(n, dtype=torch.long) + start).view(1, -1).expand(3, -1).clone()

    def truncate(self, n_tokens: int) -> None:
        """Rewind to ``n_tokens`` emitted tokens; the cut must lie outside any multimodal segment."""
        if not 0 <= n_tokens <= self.n_tokens:
            raise ValueError(f"cannot truncate to {n_tokens} tokens (have {self.n_tokens})")
        nxt = self._resume[n_tokens]
        if nxt is None:
            raise ValueError(f"token {n_tokens} lies inside a multimodal segment; cut before or after it")
        self._pos = self.positions[:, :n_tokens].clone()
        del self._resume[n_tokens + 1 :]
        self._open, self._piece_key, self._piece_max = None, None, nxt - 1

    # ------------------------------------------------------------------ text
    def text(self, ids) -> list[Piece]:
        """Text tokens (also decoded tokens); ``ids`` is a list of token ids."""
        self._need_closed("text")
        ids = [int(i) for i in ids]
        if not ids:
            return []
        key = self._piece_key if (self._piece_key and self._piece_key[-1] == TEXT) else self._key(TEXT)
        return [self._emit(TEXT, ids, self._arange(len(ids), self.next_position), key, boundary=True)]

    def external(self, pos: torch.Tensor, ids=None) -> list[Piece]:
        """Record tokens placed by the caller at ``pos`` (3, n); the next piece follows their max."""
        self._need_closed("external tokens")
        pos = pos.reshape(3, -1).long().cpu()
        return [self._emit(TEXT, ids or [-1] * pos.shape[1], pos, self._key("ext"), boundary=True)]

    def _need_closed(self, what):
        if self._open is not None:
            raise RuntimeError(f"{what} while a {self._open.kind} segment is open; call end() first")

    # ------------------------------------------------------------------ segments
    def begin_audio(self) -> list[Piece]:
        self._need_closed("begin_audio")
        p = self._emit(BOS, [self.ids["audio_bos"]], self._arange(1, self.next_position), self._key(BOS))
        self._open = _Open(AUDIO, self.next_position, key=self._key(AUDIO))
        return [p]

    def begin_image(self) -> list[Piece]:
        return self._begin_vision(IMAGE, 1.0)

    def begin_video(self, second_per_grid: float = 1.0) -> list[Piece]:
        return self._begin_vision(VIDEO, second_per_grid)

    def _begin_vision(self, kind, spg):
        self._need_closed(f"begin_{kind}")
        p = self._emit(BOS, [self.ids["vision_bos"]], self._arange(1, self.next_position), self._key(BOS))
        self._open = _Open(kind, self.next_position, spg=float(spg), key=self._key(kind))
        return [p]

    def begin_audio_video(self, second_per_grid: float) -> list[Piece]:
        """``<|vision_bos|><|audio_bos|>`` at one position, then interleaved 2-s chunks."""
        self._need_closed("begin_audio_video")
        pos = self._arange(1, self.next_position).repeat(1, 2)
        p = self._emit(BOS, [self.ids["vision_bos"], self.ids["audio_bos"]], pos, self._key(BOS))
        self._open = _Open("av", self.next_position, spg=float(second_per_grid), key=self._key("av"))
        return [p]

    def _t_value(self, o: _Open, k: int) -> int:
        if o.kind == IMAGE:
            return k * self.pps
        t = torch.tensor([k], dtype=torch.long) * torch.tensor(o.spg, dtype=torch.float32) * self.pps
        return int(t.long()[0])  # float32 product then truncation, as get_rope_index does

    def _patch_pos(self, o: _Open, grid_hw) -> torch.Tensor:
        h, w = int(grid_hw[-2]) // self.merge, int(grid_hw[-1]) // self.merge
        if o.grid_hw is None:
            o.grid_hw = (h, w)
        elif o.grid_hw != (h, w):
            raise ValueError(f"patch grid {(h, w)} differs from this segment's {o.grid_hw}")
        t = self._t_value(o, o.t_patches)
        o.t_patches += 1
        hh = torch.arange(h).view(-1, 1).expand(h, w).flatten()
        ww = torch.arange(w).view(1, -1).expand(h, w).flatten()
        return torch.stack([torch.full((h * w,), t), hh, ww]) + o.st

    def video_patch(self, grid_hw) -> list[Piece]:
        """One temporal patch (``grid_thw[1:]`` in unmerged patches) of an image/video segment."""
        o = self._open
        if o is None or o.kind == AUDIO:
            raise RuntimeError("video_patch outside an image/video segment")
        pos = self._patch_pos(o, grid_hw)
        if o.kind == "av":
            return self._av_push(VIDEO, pos)
        kind = o.kind
        src = o.n[kind]
        o.n[kind] += pos.shape[1]
        return [self._emit(kind, [self.ids[kind]] * pos.shape[1], pos, o.key, src)]

    def image(self, grid_thw) -> list[Piece]:
        """A whole image segment: bos, ``grid_t`` patches, eos."""
        out = self.begin_image()
        for _ in range(int(grid_thw[0])):
            out += self.video_patch(grid_thw[1:])
        return out + self.end()

    def audio_block(self, n: int) -> list[Piece]:
        """``n`` audio tokens (one encoded block) of an audio or audio-in-video segment."""
        o = self._open
        if o is None or o.kind not in (AUDIO, "av"):
            raise RuntimeError("audio_block outside an audio segment")
        pos = self._arange(n, o.st + o.n[AUDIO])
        if o.kind == "av":
            return self._av_push(AUDIO, pos)
        src = o.n[AUDIO]
        o.n[AUDIO] += n
        if n == 0:
            return []
        return [self._emit(AUDIO, [self.ids["audio"]] * n, pos, o.key, src)]

    def end(self) -> list[Piece]:
        """Close the open segment: flush held-back tokens, then its eos (two for audio-in-video)."""
        o = self._open
        if o is None:
            raise RuntimeError("end() without an open segment")
        out = []
        if o.kind == "av":
            o.ended[AUDIO] = o.ended[VIDEO] = True
            out = self._av_release()
            if o.n[AUDIO] == 0 or o.n[VIDEO] == 0:
                raise ValueError("an audio-in-video segment needs both audio and video tokens")
            eos = [self.ids["audio_eos"], self.ids["vision_eos"]]
        else:
            if sum(o.n.values()) == 0:
                raise ValueError(f"empty {o.kind} segment")
            eos = [self.ids["audio_eos" if o.kind == AUDIO else "vision_eos"]]
        pos = self._arange(1, self.next_position).repeat(1, len(eos))
        self._open = None
        return out + [self._emit(EOS, eos, pos, self._key(EOS), boundary=True)]

    # ------------------------------------------------------------------ audio-in-video interleave
    def _av_push(self, kind: str, pos: torch.Tensor) -> list[Piece]:
        o = self._open
        for c in range(pos.shape[1]):
            value = int(pos[0, c]) - o.st  # get_chunked_index(..., remove_index=st_idx)
            if value >= o.counter[kind] * self.tpc:  # quirk: counter advances by one per crossing
                o.counter[kind] += 1
                o.chunk[kind] += 1
            o.pending[kind].append((o.chunk[kind], o.n[kind], pos[:, c]))
            o.n[kind] += 1
        return self._av_release()

    def _av_release(self) -> list[Piece]:
        """Emit V_j, A_j, V_{j+1}, ... as far as the chunks before them are closed."""
        o, out = self._open, []
        while True:
            kind = o.phase
            q = o.pending[kind]
            k = 0
            while k < len(q) and q[k][0] == o.j:
                k += 1
            if k:
                pos = torch.stack([col for _, _, col in q[:k]], dim=1)
                tok = self.ids[kind]
                out.append(self._emit(kind, [tok] * k, pos, (o.key, kind, o.j), q[0][1]))
                del q[:k]
            closed = o.ended[kind] or o.chunk[kind] > o.j
            if not closed:
                return out
            if kind == VIDEO:
                o.phase = AUDIO
            else:
                o.phase, o.j = VIDEO, o.j + 1
            if o.ended[AUDIO] and o.ended[VIDEO] and not o.pending[AUDIO] and not o.pending[VIDEO]:
                return out

    # ------------------------------------------------------------------ whole prompts
    def feed(self, seg) -> list[Piece]:
        """Append one segment description (:class:`Text`, :class:`Audio`, ...) in one go."""
        if isinstance(seg, Text):
            return self.text(seg.ids)
        if isinstance(seg, Audio):
            out = self.begin_audio()
            for n in seg.blocks:
                out += self.audio_block(n)
            return out + self.end()
        if isinstance(seg, Image):
            return self.image(seg.grid_thw)
        if isinstance(seg, Video):
            out = self.begin_video(seg.second_per_grid)
            for _ in range(int(seg.grid_thw[0])):
                out += self.video_patch(seg.grid_thw[1:])
            return out + self.end()
        if isinstance(seg, AudioVideo):
            out = self.begin_audio_video(seg.second_per_grid)
            for n in seg.blocks:
                out += self.audio_block(n)
            for _ in range(int(seg.grid_thw[0])):
                out += self.video_patch(seg.grid_thw[1:])
            return out + self.end()
        raise TypeError(f"unknown segment {seg!r}")

    def build(self, segments) -> tuple[list, torch.Tensor]:
        """Append ``segments``; return their token ids (with special/placeholder ids) and (3, n) positions."""
        pieces = [p for seg in segments for p in self.feed(seg)]
        ids = [i for p in pieces for i in p.ids]
        pos = torch.cat([p.pos for p in pieces], dim=1) if pieces else torch.empty(3, 0, dtype=torch.long)
        return ids, pos


def segment_token_ids(tmrope_or_config, segments) -> list:
    """Token ids of ``segments`` laid out as the processor does (a fresh state; no side effects)."""
    t = tmrope_or_config
    fresh = t.fresh() if isinstance(t, TMRoPE) else TMRoPE.from_config(t)
    return fresh.build(segments)[0]


def get_rope_index_whole(thinker, ids, segments, mel_lengths, use_audio_in_video: bool):
    """transformers' ``get_rope_index`` on a whole token sequence: the oracle :class:`TMRoPE` equals.

    ``segments`` are the :class:`Image` / :class:`Video` / :class:`AudioVideo` descriptions in order
    (others are ignored) and ``mel_lengths`` the mel-frame counts of the audio segments in order.
    Returns ``(positions (3, n), rope_delta)``.
    """
    images = [s.grid_thw for s in segments if isinstance(s, Image)]
    videos = [s for s in segments if isinstance(s, (Video, AudioVideo))]
    input_ids = torch.tensor([list(ids)])
    pos, delta = thinker.model.get_rope_index(
        input_ids,
        torch.tensor(images) if images else None,
        torch.tensor([v.grid_thw for v in videos]) if videos else None,
        torch.ones_like(input_ids),
        use_audio_in_video,
        torch.tensor(list(mel_lengths)) if mel_lengths else None,
        torch.tensor([v.second_per_grid for v in videos]) if videos else None,
    )
    return pos[:, 0], int(delta)
