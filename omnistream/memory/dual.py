"""JanusVLN's dual implicit memory: fixed-size K/V memories for the spatial and the semantic branch.

JanusVLN (``MIV-XJTU/JanusVLN``) keeps, for every step of a navigation episode, two implicit memories:

* **spatial** - the K/V of the VGGT aggregator's global-attention layers (what a new frame's
  global attention reads instead of re-running the history), and
* **semantic** - the MLLM's K/V of the visual tokens of the frames seen so far,

each holding the *initial* frames (8) and a sliding window of the *recent* frames (48). Its released
code implements the spatial half (``StartRecentKVCache(start_size=8, recent_size=48)`` over VGGT's
frame axis) and re-prefills the LLM with 8 sampled history frames every step; here both halves are
K/V memories of the same frame-granular kind, :class:`FrameKV`, updated once per step.

(Why not :class:`~omnistream.memory.window_cache.WindowCache`: it is token-granular, so the step's
transient tokens - the instruction suffix and the answer - would push visual tokens out of its
window, and it would evict frames piecemeal; here frames enter and leave whole and transient tokens
never displace anything.)

When the trim happens matters: JanusVLN (``src/qwen_vl/model/modeling_qwen2_5_vl.py``,
``Qwen2_5_VLForConditionalGenerationForJanusVLN.forward``) calls the aggregator with the cache, which
appends the new frame's K/V, and only *then* trims it with ``self.kv_cache_vggt(...)``; the cache
holds 5-D K/V ``(B, H, S, P, D)`` (``src/qwen_vl/model/vggt/models/aggregator.py``, ``Aggregator.forward``:
``_, _, S_true, _, _ = past_key_values[0][0].shape``; read in a JanusVLN fork, MuHeDing/ClawNav, as the
stored MIV-XJTU copy has that file as bytecode only), so ``k_seq_dim=2`` trims frames. A new frame
therefore attends to the 8 initial frames, the 48 frames *before* it, and itself: up to 57 frames.
:attr:`MemoryConfig.trim_after_step` (the default) does the same; ``False`` trims before the new frame
is written (at most 56 frames attended, the earlier rule).

:class:`FrameKV` layout, per layer, one buffer allocated once (``(B, H, capacity, D)``)::

    [ prefix | frame slot 0 | ... | frame slot I+R | tail (transient tokens) ]

The held tokens (prefix + held frames) always form the contiguous block ``[0, C)``; a forward's new
tokens are written right after them (and after the step's transient tokens), so attention reads one
contiguous view ``[0, C + n)`` whose last ``n`` rows are the new tokens, and transformers' causal mask
(query offset = tokens before the forward) is exact. Slot order does not matter to attention (keys
carry their positions), so evicting frame ``e`` when the memory is full moves the frame in the last
slot into ``e``'s slot (one frame copy per layer) and the new frame is appended at the end, as in the
not-full case. A step therefore costs O(memory) whatever the episode length; the buffers are sized for
the full window at the first frame (they grow once only if a step's transient tokens outgrow the tail).

Semantic positions: every held token keeps the M-RoPE position it had in the stream (the prompt
``system, user: frame_0 .. frame_t, instruction, assistant``), so with nothing evicted the memory is
exactly the KV cache of that prompt (the tests compare the logits with transformers' forward over it).
After evictions the kept frames keep their stream positions and later frames continue from there;
positions grow by ``2 + max(merged grid)`` per step (20 for 640x480 frames: 10k at step 500, well
inside Qwen2.5-VL's 128k context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["DualMemory", "FrameKV", "MemoryConfig", "SemanticMemory"]


@dataclass(frozen=True)
class MemoryConfig:
    """Frames each memory keeps: the first ``initial_frames`` of the episode and the most recent
    ``recent_frames`` (JanusVLN: 8 + 48)."""

    initial_frames: int = 8
    recent_frames: int = 48
    # True (JanusVLN): the window is trimmed after a step, so a frame attends to the initial frames, the
    # ``recent_frames`` frames before it and itself; False: trimmed before, the frame itself counts as recent
    trim_after_step: bool = True

    def __post_init__(self):
        if self.initial_frames < 0 or self.recent_frames < 1:
            raise ValueError("initial_frames must be >= 0 and recent_frames >= 1")

    @property
    def capacity(self) -> int:
        """Frames kept between steps (after the trim)."""
        return self.initial_frames + self.recent_frames

    @property
    def attended_frames(self) -> int:
        """Most frames one step's new frame attends to, itself included."""
        return self.capacity + int(self.trim_after_step)


class FrameKV:
    """Frame-granular K/V memory for ``num_layers`` attention layers (see the module docstring).

    Protocol for one forward of ``n`` new tokens: ``begin(n, prefix=a, frame=f)`` (the first ``a``
    tokens extend the prefix, the next ``f`` form one new frame, the rest are transient), then every
    layer calls ``write(layer, k, v)`` and attends over what it returns, then ``end()``. Transient
    tokens (a prompt suffix, generated tokens) stay visible to later forwards until
    ``drop_transient()`` (or the next frame) discards them.
    """

    def __init__(self, num_layers: int, config: MemoryConfig | None = None, tail_tokens: int = 0):
        self.num_layers = num_layers
        self.config = config or MemoryConfig()
        self.tail_tokens = tail_tokens  # transient room reserved beyond one frame
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.reset()

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the episode (buffers are kept and reused)."""
        self.prefix = 0  # prefix tokens held
        self.frame_tokens = 0  # tokens per frame (fixed by the first frame)
        self.slot_frame: list[int] = []  # frame id in each filled slot (slots fill in order)
        self.frames_seen = 0
        self.transient = 0
        self._open: tuple | None = None  # (offset, n, prefix, frame) of the forward in progress
        self._written: set[int] = set()

    @property
    def held_frames(self) -> int:
        return len(self.slot_frame)

    @property
    def held_tokens(self) -> int:
        return self.prefix + self.held_frames * self.frame_tokens

    @property
    def seq_length(self) -> int:
        """Tokens visible before the next forward (held + transient)."""
        return self.held_tokens + self.transient

    def kept_frames(self) -> list[int]:
        """Ids (0-based, in stream order) of the frames held."""
        return sorted(self.slot_frame)

    def capacity_tokens(self) -> int:
        """Buffer rows: prefix + all frame slots + the step's new frame + the transient tail."""
        prefix = self.prefix + (self._open[2] if self._open is not None else 0)
        return prefix + (self.config.capacity + 1) * self.frame_tokens + self.tail_tokens

    def memory_bytes(self) -> int:
        """Bytes of the K/V buffers of all layers: fixed once allocated (the bound)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    # ---------------------------------------------------------------- a forward
    def begin(self, n: int, prefix: int = 0, frame: int = 0) -> None:
        if self._open is not None:
            raise RuntimeError("FrameKV.begin: the previous forward was not ended")
        if n < prefix + frame or min(n, prefix, frame) < 0:
            raise ValueError(f"bad split: {n} tokens, prefix {prefix}, frame {frame}")
        if prefix and (self.held_frames or self.transient):
            raise ValueError("prefix tokens can only be added before the first frame")
        if frame:
            self.drop_transient()
            if self.frame_tokens == 0:
                self.frame_tokens = frame
            elif frame != self.frame_tokens:
                raise ValueError(
                    f"every frame must have the same token count: got {frame}, the episode uses {self.frame_tokens}"
                )
            # trim-after (JanusVLN) keeps the last step's frame until now: the trim is done lazily here, at
            # the next frame, because the last step's transient tokens sit right after that frame
            # (evicting at end() would move held rows under them); what a frame attends to is the same
            keep = self.config.capacity - (0 if self.config.trim_after_step else 1)  # held frames before the new one
            if self.held_frames > keep:
                self._evict()
        self._open = (self.seq_length, n, prefix, frame)
        self._written = set()

    def _evict(self) -> None:
        """Drop the oldest non-initial frame: the last slot's frame moves into its slot."""
        I = self.config.initial_frames
        victim = min(range(I, len(self.slot_frame)), key=self.slot_frame.__getitem__)
        last = len(self.slot_frame) - 1
        if victim != last:
            F_, a = self.frame_tokens, self.prefix
            dst, src = a + victim * F_, a + last * F_
            for buf in self.k + self.v:
                if buf is not None:
                    buf[:, :, dst : dst + F_].copy_(buf[:, :, src : src + F_])
            self.slot_frame[victim] = self.slot_frame[last]
        self.slot_frame.pop()

    def _alloc(self, layer: int, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        cap = max(need, self.capacity_tokens())
        old_k, old_v = self.k[layer], self.v[layer]
        if old_k is not None and old_k.shape[-2] >= need and old_k.shape[:2] == k.shape[:2]:
            return
        b, h = k.shape[:2]
        nk = torch.zeros(b, h, cap, k.shape[-1], dtype=k.dtype, device=k.device)
        nv = torch.zeros(b, h, cap, v.shape[-1], dtype=v.dtype, device=v.device)
        if old_k is not None and old_k.shape[:2] == k.shape[:2]:
            keep = min(old_k.shape[-2], cap)
            nk[:, :, :keep] = old_k[:, :, :keep]
            nv[:, :, :keep] = old_v[:, :, :keep]
        self.k[layer], self.v[layer] = nk, nv

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's ``k``/``v`` (B, H, n, D) for ``layer``; return the K/V to attend over:
        (B, H, offset + n, D), held + transient + new, the new rows last."""
        if self._open is None:
            raise RuntimeError("FrameKV.write outside begin()/end()")
        off, n, _, _ = self._open
        if k.shape[-2] != n:
            raise ValueError(f"{k.shape[-2]} new tokens but begin() announced {n}")
        if layer in self._written:
            raise RuntimeError(f"layer {layer} written twice in one forward")
        self._written.add(layer)
        self._alloc(layer, k, v, off + n)
        K, V = self.k[layer], self.v[layer]
        K[:, :, off : off + n].copy_(k)
        V[:, :, off : off + n].copy_(v)
        return K[:, :, : off + n], V[:, :, : off + n]

    def end(self) -> None:
        if self._open is None:
            raise RuntimeError("FrameKV.end without begin()")
        _, n, prefix, frame = self._open
        self._open = None
        self.prefix += prefix
        if frame:
            self.slot_frame.append(self.frames_seen)
            self.frames_seen += 1
        self.transient += n - prefix - frame

    def abort(self) -> None:
        """A forward failed: forget its tokens (buffers may hold garbage beyond the held region).
        A frame that triggered an eviction leaves the memory one frame short (the victim is gone)."""
        self._open = None

    def drop_transient(self) -> None:
        self.transient = 0


# ---------------------------------------------------------------------------- semantic (LLM) memory


class _SemanticLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, owner: SemanticMemory, idx: int):
        super().__init__()
        self.owner, self.idx = owner, idx

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.is_initialized = True
        return self.owner.kv.write(self.idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv.seq_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.kv.seq_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class SemanticMemory(Cache):
    """The LLM's K/V memory as a transformers ``Cache``: prefix (system prompt) + frames (visual
    tokens with their vision-start/end markers) + transient tokens (the step's instruction suffix and
    generated answer). Use :meth:`forward` so that every model call is bracketed by begin/end."""

    def __init__(self, num_layers: int, config: MemoryConfig | None = None, tail_tokens: int = 256):
        self.kv = FrameKV(num_layers, config, tail_tokens=tail_tokens)
        super().__init__(layers=[_SemanticLayer(self, i) for i in range(num_layers)])

    def reset(self) -> None:
        self.kv.reset()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.seq_length

    def memory_bytes(self) -> int:
        return self.kv.memory_bytes()

    def forward(self, lm, inputs_embeds, position_ids, prefix: int = 0, frame: int = 0):
        """Run ``lm`` (a Qwen2.5-VL text model) on ``inputs_embeds`` (1, n, D) at ``position_ids``
        (3, 1, n) against the memory; the first ``prefix`` tokens join the prefix, the next ``frame``
        tokens become one frame, the rest are transient. Returns the model output."""
        n = inputs_embeds.shape[1]
        self.kv.begin(n, prefix=prefix, frame=frame)
        try:
            out = lm(inputs_embeds=inputs_embeds, position_ids=position_ids, cache=self, use_cache=True)
        except BaseException:
            self.kv.abort()
            raise
        self.kv.end()
        return out


class DualMemory:
    """Spatial (VGGT global-attention K/V) + semantic (LLM K/V) memories of one agent."""

    def __init__(self, vggt_layers: int, llm_layers: int, config: MemoryConfig | None = None, tail_tokens: int = 256):
        self.config = config or MemoryConfig()
        self.spatial = FrameKV(vggt_layers, self.config)
        self.semantic = SemanticMemory(llm_layers, self.config, tail_tokens=tail_tokens)

    def reset(self) -> None:
        self.spatial.reset()
        self.semantic.reset()

    def memory_bytes(self) -> int:
        return self.spatial.memory_bytes() + self.semantic.memory_bytes()
