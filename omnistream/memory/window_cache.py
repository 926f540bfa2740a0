"""Attention sinks + sliding window KV cache (StreamingLLM) for Qwen2.5-Omni's 3-D M-RoPE positions.

:class:`WindowCache` is a transformers :class:`~transformers.cache_utils.Cache`: the Thinker and
Talker layers use it unchanged (``cache.update`` in ``Qwen2_5OmniAttention.forward``). Per layer it
keeps the first ``S`` tokens of the session (the *sinks*) and the ``W`` most recent tokens (the
*window*, a ring buffer) in buffers allocated once; nothing is reallocated per step.

Positions (StreamingLLM: positions inside the cache, not in the original stream)
----------------------------------------------------------------------------------
Sinks keep their original positions ``s``. The window tokens visible to a forward (the ``W``
cached ones plus the new chunk) are all shifted by ONE shift ``delta`` (the same integer for the
t, h and w components; ``WindowConfig.shift="per_axis"`` uses one integer per component, see
below), chosen so that the window follows the sinks::

    delta = max(0, min(window positions over all 3 components) - sink_end),
    sink_end = max(sink positions over all 3 components) + 1,

and ``delta = 0`` until the first eviction (so a cache that never evicts is exactly a
``DynamicCache``). The query is shifted by the same ``delta``. The attention therefore sees the
query-window and window-window relative positions of the original stream (a common shift cancels
in RoPE), and the query-sink relative positions ``(p_q - delta) - s``.

Why re-positioning costs ~nothing: RoPE scores depend only on position differences, and a shift
``c`` of all three components rotates every frequency by ``c * inv_freq`` whatever component the
frequency reads. So we never re-rotate the window per step. Keys are stored *rotated* at
``p - B`` (``B``, the *base*, is a per-session offset); queries are rotated at ``p - B`` too (the
caller passes the positions returned by :meth:`WindowCache.cache_positions`), and only the ``S``
sink keys are re-rotated, at ``s + (delta - B)``, from an unrotated-at-birth copy (so no rounding
accumulates on them). Query-window: ``(p_q - B) - (p_k - B)`` = original; query-sink:
``(p_q - B) - (s + delta - B) = (p_q - delta) - s``: exactly StreamingLLM. To keep the rotated
positions small, ``B`` is moved to ``delta`` (a *rebase*: every window key of every layer is rotated
once by the change, an O(W) elementwise op) whenever ``delta - B`` leaves ``[0, rebase_every)``,
i.e. at most once every ``rebase_every`` tokens for streams advancing at most one position per
token. Amortized per token: ``W / rebase_every`` key rotations (4 at the default
``rebase_every = W // 4``), plus ``S`` sink rotations. Each rebase rounds the stored keys once (in
bf16 ~2^-9 relative), so a key goes through at most ``W / rebase_every + 1`` roundings in its life
(why the default is not 1). With ``rebase_every=1`` the rotated positions are exactly
StreamingLLM's; otherwise they exceed them by less than ``rebase_every``.

Bound on rotated positions: a forward of ``n`` tokens rotates positions ``< sink_end + span +
rebase_every`` where ``span`` is max - min (over the three components) of the visible window
(``W`` cached + ``n`` new tokens). For text and audio (all three components equal, one position
per token) ``span < W + n`` and the rotated positions are ``< S + W + n + rebase_every``
(``S + W + n`` with ``rebase_every=1``). Caveat, inherent to TMRoPE rather than to the shift: inside
ONE long open audio-in-video segment, audio tokens sit at ``(st + k, st + k, st + k)`` while video
tokens keep h, w at ``st + row/col``, so the *relative* h/w positions between the window's audio and
video tokens grow with the segment's length, and no re-positioning that preserves relative
positions inside the window can keep them small (``benchmarks/long_session.py`` measures this).
``OmniChat(segment_s=60)`` closes and reopens the segment every 60 s of media (clips), which bounds
the span by about two clips (max rotated position 2.7k over a simulated hour instead of 90k). ``shift="per_axis"`` (one shift per component; same cost, same exact relative positions)
additionally bounds a long video-only segment, whose h/w stay at ``st + row/col`` while t grows.

Chunks (``n > 1`` tokens per forward, prefill): the ``n`` queries attend to everything the cache
held before the forward (sinks + up to ``W`` window tokens) and causally to the chunk itself;
eviction happens after the forward (the cache then keeps the sinks and the last ``W`` tokens). A
chunk larger than ``W`` is allowed: its own tokens see each other causally at their (shifted)
positions, so the span of a forward is ``S + W + n``. Up to ``chunk_tokens`` new tokens go to a
preallocated scratch tail; a larger chunk makes one transient ``torch.cat`` copy for that forward.

Mask / valid slots: the valid slots are always a contiguous prefix (slot order is irrelevant to
attention, so the ring needs no reordering); ``update`` returns only that prefix plus the new
chunk, so there are no padded slots to mask and transformers' own causal mask (sized by
:meth:`WindowLayer.get_mask_sizes`, query offset = cached tokens) is exact.

``get_seq_length()`` returns the number of tokens *seen* (appended) in the session, like
transformers' sliding-window layers (``cumulative_length``) and like ``DynamicCache`` before any
eviction; ``StreamingThinker.n_tokens`` relies on it. The number of tokens held is
:attr:`WindowCache.n_cached`; the mask offsets use the latter (``get_query_offset``). Because
positions are explicit, nothing derives positions from ``get_seq_length`` (``generate()``'s
default ``cache_position`` path is not supported: pass ``position_ids``).

Kernel mode (``WindowConfig(kernel=True)``; automatic on CUDA through :func:`window_thinker`)
----------------------------------------------------------------------------------------------
Keys are stored PRE-RoPE and each slot carries its cache position in one ``(1, 3, S + W + T)``
int32 buffer shared by the layers. ``update`` un-rotates the forward's new keys once (they arrive
rotated at the positions :meth:`WindowCache.cache_positions` returned: the inverse M-RoPE rotation,
O(new tokens)) and writes them with :func:`omnistream.kernels.ring_append`. Re-positioning is then
integer work on that buffer, once per forward for all layers: the sinks at ``s + (delta - B)``
(S slots per step) and the ring ``-= dB`` at a rebase (every ``rebase_every`` tokens); no key is
ever rewritten, so nothing rounds and ``rebase_every`` no longer trades accuracy. A single-token
decode step returns a pre-RoPE view of the buffers tagged for the ``"omnistream_window"`` attention
function (:mod:`omnistream.kernels.window_attention`), which runs
:func:`omnistream.kernels.window_decode_attention` (RoPE applied in-kernel at the slot positions;
the query, already rotated by the model, is passed at position 0). A prefill chunk gets the held
keys rotated once at their cache positions plus its own (model-rotated) keys, for plain SDPA. Batch
size 1 (one session per cache). Compared with the rotated layout the un-rotation adds one rounding
per key (fp32 logits agree to ~3e-6 on the tiny Thinker).

Usage::

    cache = WindowCache(lm.config, WindowConfig(sink_tokens=4, window_tokens=4096))
    out = lm(inputs_embeds=x, position_ids=cache.cache_positions(pos), cache=cache, use_cache=True)

or :func:`window_thinker` for a ``StreamingThinker`` over a window cache.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["AUDIO_TOKENS_PER_SECOND", "WindowCache", "WindowConfig", "WindowLayer", "window_thinker"]

AUDIO_TOKENS_PER_SECOND = 25  # Qwen2.5-Omni audio tokens per second (also TMRoPE t-positions per second)


@dataclass(frozen=True)
class WindowConfig:
    """Size of a :class:`WindowCache`.

    * ``sink_tokens`` (4): first tokens of the session kept forever at their own positions.
    * ``window_tokens`` (``None``): most recent tokens kept. ``None`` sizes the window to the model's
      context: ``max_position_embeddings - sink_tokens - chunk_tokens - rebase_every`` (with
      ``rebase_every`` a fifth of the remainder, i.e. ``W / 4``), so rotated
      positions stay inside the trained context (for streams advancing <= 1 position per token and
      chunks <= ``chunk_tokens``).
    * ``chunk_tokens`` (256): preallocated scratch for the new tokens of one forward (a decode step
      needs 1; a 2-s audio+video chunk ~ 180). Larger chunks still work (one transient copy).
    * ``rebase_every`` (``None`` = ``W // 4``): how far the base offset may drift before the window
      keys are re-rotated (1 = exact StreamingLLM positions at every step). Each rebase rounds the
      stored keys once (in bf16 ~2^-9 relative), so a key lives through at most ``W / rebase_every
      + 1`` (5 by default) roundings; the price is rotated positions up to ``rebase_every`` above
      StreamingLLM's. Compute per token: ``W / rebase_every`` key rotations (4), amortized.
    * ``shift`` (``"uniform"``): one shift for t, h, w; ``"per_axis"``: one per component (see module doc).
    * ``kernel`` (``None``): store PRE-RoPE keys and decode through the Triton kernel (module doc,
      "Kernel mode"). ``None``: :func:`window_thinker` turns it on when the model is on CUDA; a bare
      :class:`WindowCache` treats ``None`` as off. ``True`` needs the model's attention routed through
      :func:`omnistream.kernels.window_attention.enable_window_attention` (``window_thinker`` does it).
    """

    sink_tokens: int = 4
    window_tokens: int | None = None
    chunk_tokens: int = 256
    rebase_every: int | None = None
    shift: str = "uniform"
    kernel: bool | None = None

    def __post_init__(self):
        if self.sink_tokens < 0 or self.chunk_tokens < 0:
            raise ValueError("sink_tokens and chunk_tokens must be >= 0")
        if self.window_tokens is not None and self.window_tokens < 1:
            raise ValueError("window_tokens must be >= 1")
        if self.rebase_every is not None and self.rebase_every < 1:
            raise ValueError("rebase_every must be >= 1")
        if self.shift not in ("uniform", "per_axis"):
            raise ValueError(f"shift must be 'uniform' or 'per_axis', not {self.shift!r}")

    @classmethod
    def from_seconds(cls, seconds: float, tokens_per_second: float = AUDIO_TOKENS_PER_SECOND, **kw) -> WindowConfig:
        """A window holding ``seconds`` of media. ``tokens_per_second`` defaults to audio alone (25);
        for audio + video pass e.g. ``25 + 64`` (64 merged video tokens per 1-s temporal patch)."""
        if seconds <= 0 or tokens_per_second <= 0:
            raise ValueError("seconds and tokens_per_second must be > 0")
        return cls(window_tokens=max(1, math.ceil(seconds * tokens_per_second)), **kw)

    def resolve(self, max_position_embeddings: int | None = None) -> WindowConfig:
        """Fill in ``window_tokens`` and ``rebase_every``."""
        w, r = self.window_tokens, self.rebase_every
        if w is None:
            if not max_position_embeddings:
                raise ValueError("window_tokens=None needs the model's max_position_embeddings")
            room = max_position_embeddings - self.sink_tokens - self.chunk_tokens
            r = r if r is not None else max(1, room // 5)
            w = room - r
            if w < 1:
                raise ValueError(f"context {max_position_embeddings} too small for this window config")
        if r is None:
            r = max(1, w // 4)
        return replace(self, window_tokens=int(w), rebase_every=int(r))


def _text_config(config):
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_setup(config, inv_freq, mrope_section):
    """(inv_freq (D/2,) float64 CPU, component of each frequency (D/2,) long, mrope_section list)."""
    if inv_freq is None:
        rp = getattr(config, "rope_parameters", None) or {}
        if rp.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rp.get('rope_type')!r}: pass inv_freq explicitly")
        theta = rp.get("rope_theta", getattr(config, "rope_theta", None))
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if mrope_section is None:
            mrope_section = rp.get("mrope_section")
    inv_freq = inv_freq.detach().to("cpu", torch.float64).flatten()
    half = inv_freq.numel()
    if mrope_section is None:
        mrope_section = [half]  # 1-D RoPE: every frequency reads component 0
    comp = torch.tensor([j % 3 for j, c in enumerate(mrope_section) for _ in range(int(c))], dtype=torch.long)
    if comp.numel() != half:
        raise ValueError(f"mrope_section {list(mrope_section)} does not sum to head_dim/2 = {half}")
    return inv_freq, comp, [int(c) for c in mrope_section]


class _Plan:
    """What every layer does in the forward that follows one ``cache_positions`` call."""

    __slots__ = (
        "C",
        "_dev",
        "dB",
        "id",
        "k_cs",
        "k_held_cs",
        "k_pos",
        "k_slots",
        "n",
        "nsink0",
        "out",
        "rebase_cs",
        "ring_valid",
        "runs",
        "sink_cs",
        "sink_shift",
    )

    def __init__(self, **kw):
        self.k_pos = self.k_slots = self.k_cs = self.k_held_cs = None
        for k, v in kw.items():
            setattr(self, k, v)
        self._dev = {}

    def cos_sin(self, which: str, device):
        key = (which, device)
        if key not in self._dev:
            c, s = getattr(self, which)
            self._dev[key] = (c.to(device), s.to(device))
        return self._dev[key]


def _rotate_(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``dst = src * cos + rotate_half(src) * sin`` (float32 math, cast to ``dst.dtype``)."""
    x = src.float()
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    dst.copy_(x * cos + rot * sin)


class WindowLayer(CacheLayerMixin):
    """One layer's buffers: ``keys``/``values`` ``(B, H, S + W + chunk_tokens, D)`` (slots ``[0, S)``
    sinks, ``[S, S + W)`` the ring, the rest scratch for a forward's new tokens) and ``sink_keys``
    ``(B, H, S, D)``, the sinks as rotated at birth (their original positions)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: WindowCache, layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.sink_keys: torch.Tensor | None = None
        self._done = 0  # id of the last plan executed
        self._pending: list = []  # scratch -> ring moves of the last forward, done at the next update
        self._sink_shift = (0, 0, 0)
        self._handle = None  # kernel mode: the last decode step's DecodeHandle

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        b, h, _, d = key_states.shape
        if o.kernel and b != 1:
            raise NotImplementedError("kernel-mode WindowCache holds one session (batch size 1)")
        self.device = key_states.device
        cap = o.S + o.W + o.T
        self.keys = torch.zeros(b, h, cap, d, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(b, h, cap, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
        # kernel mode keeps the sinks pre-RoPE in place: no rotated-at-birth copy
        self.sink_keys = torch.zeros(b, h, 0 if o.kernel else o.S, d, dtype=key_states.dtype, device=self.device)
        self.is_initialized = True

    def _flush(self) -> None:
        """Move the last forward's scratch tokens into their ring slots."""
        for src, dst, n in self._pending:
            self.keys[:, :, dst : dst + n].copy_(self.keys[:, :, src : src + n])
            self.values[:, :, dst : dst + n].copy_(self.values[:, :, src : src + n])
        self._pending = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        plan = o._plan
        if plan is None or self._done == plan.id:
            raise RuntimeError(
                "WindowCache: call cache.cache_positions(position_ids) before each forward and pass the "
                "positions it returns to the model"
            )
        if self.is_initialized and self._done != plan.id - 1:
            raise RuntimeError("WindowCache: a forward was skipped for this layer; reset() the cache")
        self._done = plan.id
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        K, V, S = self.keys, self.values, o.S
        if key_states.shape[-2] != plan.n:
            raise ValueError(f"{key_states.shape[-2]} new tokens but cache_positions was given {plan.n}")
        self._flush()
        if o.kernel:
            return self._update_kernel(plan, key_states, value_states)
        if plan.ring_valid and any(plan.dB):  # rebase: window keys from p - B_old to p - B_new
            cos, sin = plan.cos_sin("rebase_cs", K.device)
            ring = K[:, :, S : S + plan.ring_valid]
            _rotate_(ring, ring, cos, sin)
        if plan.nsink0 and plan.sink_shift != self._sink_shift:  # sinks at s + (delta - B)
            if any(plan.sink_shift):
                cos, sin = plan.cos_sin("sink_cs", K.device)
                _rotate_(K[:, :, : plan.nsink0], self.sink_keys[:, :, : plan.nsink0], cos, sin)
            else:
                K[:, :, : plan.nsink0].copy_(self.sink_keys[:, :, : plan.nsink0])
        self._sink_shift = plan.sink_shift
        C, n = plan.C, plan.n
        if C < S:  # new sinks (delta = B = 0 until the sinks are full): keep them as rotated at birth
            k = min(S - C, n)
            self.sink_keys[:, :, C : C + k].copy_(key_states[:, :, :k])
        if C + n <= K.shape[-2]:
            K[:, :, C : C + n].copy_(key_states)
            V[:, :, C : C + n].copy_(value_states)
            self._pending = [(C + i, dst, ln) for i, dst, ln in plan.runs if dst != C + i]
            return K[:, :, : C + n], V[:, :, : C + n]
        # chunk larger than the scratch: one transient copy, then commit at once (attention reads the copy)
        k_out = torch.cat((K[:, :, :C], key_states), dim=-2)
        v_out = torch.cat((V[:, :, :C], value_states), dim=-2)
        for i, dst, ln in plan.runs:
            K[:, :, dst : dst + ln].copy_(key_states[:, :, i : i + ln])
            V[:, :, dst : dst + ln].copy_(value_states[:, :, i : i + ln])
        return k_out, v_out

    def _update_kernel(self, plan, key_states, value_states):
        """Kernel mode: un-rotate the new keys once (they arrive rotated at ``plan.out``), store them
        pre-RoPE with ``ring_append``; return a tagged pre-RoPE view for a decode step (the window
        attention function runs the kernel on it) or the held keys rotated at their cache positions
        plus the chunk's own keys for a prefill chunk (plain SDPA then)."""
        from omnistream.kernels import apply_rope, ring_append

        o = self.owner
        if self._handle is not None and not self._handle.consumed:
            raise RuntimeError(
                "kernel-mode WindowCache: the last decode step did not go through the window attention "
                "function; call omnistream.kernels.window_attention.enable_window_attention(model) (window_thinker does)"
            )
        self._handle = None
        o._kernel_prepare(plan, key_states.device)
        if o._kq_pos is None or o._kq_pos.device != key_states.device or o._kq_pos.shape[0] < key_states.shape[0]:
            o._kq_pos = torch.zeros(key_states.shape[0], 3, dtype=torch.int32, device=key_states.device)
        K, V, C, n = self.keys, self.values, plan.C, plan.n
        cos, sin = plan.k_cs  # (1, n, D) at the positions the model rotated the new keys at
        k_pre = apply_rope(key_states, cos[:, None], -sin[:, None])  # inverse rotation, (B, H, n, D)
        if C + n <= K.shape[-2]:
            ring_append(K, V, o._kpos, o._kvalid, k_pre, value_states, plan.k_pos, plan.k_slots)
            self._pending = [(C + i, dst, ln) for i, dst, ln in plan.runs if dst != C + i]
            if n == 1:
                from omnistream.kernels.window_attention import HANDLE_ATTR, DecodeHandle

                k_view, v_view = K[:, :, : C + 1], V[:, :, : C + 1]
                self._handle = DecodeHandle(self, o._kpos[:, :, : C + 1], o._kinv, o.mrope_section, o._kq_pos)
                setattr(k_view, HANDLE_ATTR, self._handle)
                return k_view, v_view
            hc, hs = plan.k_held_cs
            k_out = torch.cat((apply_rope(K[:, :, :C], hc[:, None], hs[:, None]), key_states), dim=-2)
            return k_out, V[:, :, : C + n]
        hc, hs = plan.k_held_cs  # chunk larger than the scratch: materialize first, then write the runs
        k_out = torch.cat((apply_rope(K[:, :, :C], hc[:, None], hs[:, None]), key_states), dim=-2)
        v_out = torch.cat((V[:, :, :C], value_states), dim=-2)
        for i, dst, ln in plan.runs:
            slots = torch.arange(dst, dst + ln, device=K.device)
            ring_append(K, V, o._kpos, o._kvalid, k_pre[:, :, i : i + ln], value_states[:, :, i : i + ln],
                        plan.k_pos[:, :, i : i + ln], slots)
        return k_out, v_out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_query_offset() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        return -1  # no limit on how many tokens can be appended

    def crop(self, tokens_to_remove: int) -> None:  # the cache crops all layers at once
        raise RuntimeError("crop a WindowCache through WindowCache.crop")

    def reset(self) -> None:
        self._pending = []
        self._done = 0
        self._sink_shift = (0, 0, 0)
        self._handle = None
        super().reset()
        if self.sink_keys is not None:
            self.sink_keys.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reordering, in place (the buffers keep their addresses)."""
        if self.is_initialized:
            for t in (self.keys, self.values, self.sink_keys):
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("WindowCache buffers are preallocated for one batch size")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("WindowCache buffers are preallocated for one batch size")

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.sink_keys))


class WindowCache(Cache):
    """Sinks + sliding-window KV cache for one session (batch size 1 in position space: every row of
    a batch shares the positions). See the module docstring for the position semantics.

    ``config``: the language model's config (``thinker.model.language_model.config``; a full
    Omni/Thinker config is reduced with ``get_text_config``). ``inv_freq``/``mrope_section`` override
    the RoPE frequencies read from it; ``num_layers`` the layer count.
    """

    def __init__(
        self,
        config=None,
        window: WindowConfig | None = None,
        *,
        num_layers: int | None = None,
        inv_freq: torch.Tensor | None = None,
        mrope_section=None,
        max_position_embeddings: int | None = None,
    ):
        config = _text_config(config)
        window = window if window is not None else WindowConfig()
        mpe = max_position_embeddings or getattr(config, "max_position_embeddings", None)
        self.window = window.resolve(mpe)
        self.S, self.W, self.T = self.window.sink_tokens, self.window.window_tokens, self.window.chunk_tokens
        self.R = self.window.rebase_every
        self.per_axis = self.window.shift == "per_axis"
        if num_layers is None:
            if config is None:
                raise ValueError("pass config or num_layers")
            num_layers = config.num_hidden_layers
        self.inv_freq, self.comp, self.mrope_section = _rope_setup(config, inv_freq, mrope_section)
        self.kernel = bool(self.window.kernel)
        super().__init__(layers=[WindowLayer(self, i) for i in range(num_layers)])
        self._plan_id = 0
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        S, W = self.S, self.W
        self.seen = 0  # tokens appended in the session
        self.nsink = 0  # sinks held
        self.count = 0  # window tokens held
        self.head = 0  # ring slot (relative to S) of the next window token; == count while count < W
        self.m_total = 0  # window tokens ever appended (global index of the next one)
        self.evicted = False
        self.base = (0, 0, 0)  # B, per component (equal components in "uniform" mode)
        self.delta = (0, 0, 0)  # shift of the last forward
        self.sink_end = (0, 0, 0)
        self._cs_memo: dict = {}
        self.last_rotated_range = (0, 0)
        self.slot_pos = [[0] * (S + W) for _ in range(3)]  # original positions of the held tokens, per slot
        self._mins = [deque() for _ in range(3)]  # monotonic (global index, value) per component
        self._plan: _Plan | None = None
        self.max_rotated_position = -(2**62)  # largest position handed to the model (diagnostic)
        self.min_rotated_position = 2**62
        # kernel mode (device buffers shared by all layers: positions are per session, not per layer)
        if not hasattr(self, "_kpos"):
            self._kpos = self._kvalid = self._ksink = self._kinv = self._kq_pos = None
        if self._kpos is not None:
            self._kpos.zero_()
            self._kvalid.zero_()
            self._ksink.zero_()
        self._k_moves: list = []  # slot-position moves (scratch -> ring) of the last forward
        self._k_sink_shift = (0, 0, 0)
        self._k_prepared = 0  # id of the last plan whose positions were prepared

    @torch.inference_mode()  # the buffers are usually inference tensors (StreamingThinker runs under it)
    def reset(self) -> None:
        """Forget the session; keep the buffers."""
        super().reset()
        self._reset_state()
        for layer in self.layers:
            layer._done = self._plan_id  # the next plan id is fresh for every layer

    # ------------------------------------------------------------------ kernel mode positions
    def _kernel_prepare(self, plan: _Plan, device) -> None:
        """Once per forward (first layer): bring the per-slot cache positions ``(1, 3, S + W + T)`` into
        this forward's frame and make the device tensors the layers share. All integer work: moving the
        last forward's scratch slots, the rebase (``-= dB`` over the ring, every ``rebase_every``
        tokens), the sinks at ``s + (delta - B)`` (S slots). No key is ever re-rotated."""
        if self._k_prepared == plan.id:
            return
        from omnistream.kernels import mrope_cos_sin

        S, cap, n, C = self.S, self.S + self.W + self.T, plan.n, plan.C
        if self._kpos is None or self._kpos.device != device:
            self._kpos = torch.zeros(1, 3, cap, dtype=torch.int32, device=device)
            self._kvalid = torch.zeros(1, cap, dtype=torch.bool, device=device)
            self._ksink = torch.zeros(1, 3, max(S, 1), dtype=torch.int32, device=device)
            self._kinv = self.inv_freq.to(device=device, dtype=torch.float32)
        self._kernel_flush_positions()
        host = torch.empty(3, n + 2, dtype=torch.int32)  # one host->device copy per forward
        host[:, :n] = plan.out
        host[:, n] = torch.tensor(plan.dB, dtype=torch.int32)
        host[:, n + 1] = torch.tensor(plan.sink_shift, dtype=torch.int32)
        dev = host.to(device)
        kpos = self._kpos
        if plan.ring_valid and any(plan.dB):  # rebase: window positions from p - B_old to p - B_new
            kpos[:, :, S : S + plan.ring_valid] -= dev[None, :, n : n + 1]
        if plan.nsink0 and plan.sink_shift != self._k_sink_shift:
            kpos[:, :, : plan.nsink0] = self._ksink[:, :, : plan.nsink0] + dev[None, :, n + 1 : n + 2]
        self._k_sink_shift = plan.sink_shift
        if C < S:  # new sinks: their original positions (delta = B = 0 until the sinks are full)
            k = min(S - C, n)
            self._ksink[:, :, C : C + k] = dev[None, :, :k]
        plan.k_pos = dev[None, :, :n]  # (1, 3, n) positions the model rotates the new tokens at
        plan.k_slots = torch.arange(C, C + n, device=device)
        plan.k_cs = mrope_cos_sin(plan.k_pos, self._kinv, self.mrope_section)  # (1, n, D) each
        if n > 1 or C + n > cap:  # prefill: the held keys are materialized rotated for SDPA
            plan.k_held_cs = mrope_cos_sin(kpos[:, :, :C], self._kinv, self.mrope_section)
        self._k_moves = [(C + i, dst, ln) for i, dst, ln in plan.runs if dst != C + i] if C + n <= cap else []
        self._k_prepared = plan.id

    def _kernel_flush_positions(self) -> None:
        for src, dst, n in self._k_moves:
            self._kpos[:, :, dst : dst + n] = self._kpos[:, :, src : src + n].clone()
        self._k_moves = []

    @property
    def n_cached(self) -> int:
        """Tokens held (sinks + window)."""
        return self.nsink + self.count

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Tokens held before the current forward (the mask's query offset)."""
        return self._plan.C if self._plan is not None else self.n_cached

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` restores the exact earlier state (not after an eviction: evicted tokens
        do not come back, though cropping tokens still in the window keeps working)."""
        return not self.evicted

    def memory_bytes(self) -> int:
        """Bytes of the preallocated K/V buffers of all layers (0 before the first forward), plus the
        per-slot position buffers in kernel mode. This is also the bound: the buffers never grow (a
        chunk over ``chunk_tokens`` adds one transient copy)."""
        kv = sum(layer.nbytes() for layer in self.layers)
        if self._kpos is not None and kv:
            kv += sum(t.numel() * t.element_size() for t in (self._kpos, self._kvalid, self._ksink, self._kq_pos))
        return kv

    def bookkeeping_bytes(self) -> int:
        """Host-side position bookkeeping (slot positions + min-deques), also bounded by S + W."""
        return 3 * len(self.slot_pos[0]) * 8 + sum(len(d) for d in self._mins) * 72

    def window_order(self) -> list[int]:
        """Slot indices of the held tokens in stream order (sinks first)."""
        S, W = self.S, self.W
        ring = [S + i for i in range(self.count)] if self.count < W else [S + (self.head + i) % W for i in range(W)]
        return list(range(self.nsink)) + ring

    def kept_positions(self) -> torch.Tensor:
        """(3, n_cached) original positions of the held tokens in stream order."""
        order = self.window_order()
        return torch.tensor([[c[i] for i in order] for c in self.slot_pos], dtype=torch.long).view(3, -1)

    # ------------------------------------------------------------------ positions
    def _axis_min(self):
        """[3] min of each component over the held window tokens (None if empty)."""
        if self.count == 0:
            return None
        return [d[0][1] for d in self._mins]

    def _push(self, cols: list, first_index: int) -> None:
        """Push window tokens (3 lists of k ints) with global indices first_index.. on the min-deques."""
        big = 2**62
        for vals, d in zip(cols, self._mins):
            # only suffix minima can survive (a later token <= them pops them): filter first
            keep, later = [], big
            for i in range(len(vals) - 1, -1, -1):
                if vals[i] < later:
                    keep.append(i)
                    later = vals[i]
            for i in reversed(keep):
                v = vals[i]
                while d and d[-1][1] >= v:
                    d.pop()
                d.append((first_index + i, v))

    def _evict_mins(self) -> None:
        lo = self.m_total - self.count
        for d in self._mins:
            while d and d[0][0] < lo:
                d.popleft()

    def _rebuild_mins(self) -> None:
        self._mins = [deque() for _ in range(3)]
        order = self.window_order()[self.nsink :]
        if order:
            self._push([[c[i] for i in order] for c in self.slot_pos], self.m_total - self.count)

    def _cos_sin(self, shift: tuple, memo: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (D,) cos/sin rotating every frequency by ``shift[component] * inv_freq``. Sink shifts
        repeat (they cycle through ``[0, rebase_every)``) and are memoized, at most 1024 of them."""
        cs = self._cs_memo.get(shift) if memo else None
        if cs is None:
            ang = torch.tensor(shift, dtype=torch.float64)[self.comp] * self.inv_freq
            ang = torch.cat((ang, ang))
            cs = (ang.cos().float(), ang.sin().float())
            if memo:
                if len(self._cs_memo) >= 1024:
                    self._cs_memo.clear()
                self._cs_memo[shift] = cs
        return cs

    def cache_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Register the ORIGINAL positions ``(3, n)`` or ``(3, 1, n)`` of the tokens of the next
        forward and return the positions to pass to the model instead, as ``(3, 1, n)`` (the shape
        the model reads as 3-D positions of a batch of one) on the input's device.
        Call exactly once before each forward that uses this cache. (CPU positions avoid a
        device sync; the bookkeeping is host-side Python, O(1) amortized per token.)"""
        shape, device = position_ids.shape, position_ids.device
        if position_ids.ndim == 3 and position_ids.shape[1] != 1:
            raise ValueError("WindowCache positions are per session: position_ids of shape (3, 1, n)")
        if shape[0] != 3 or position_ids.ndim not in (2, 3):
            raise ValueError(f"expected (3, n) or (3, 1, n) position_ids, got {tuple(shape)}")
        if self._plan is not None and any(
            layer.is_initialized and layer._done != self._plan.id for layer in self.layers
        ):
            raise RuntimeError("cache_positions called twice without a forward in between")
        pos = position_ids.detach().reshape(3, -1).to("cpu", torch.long)
        cols = pos.tolist()
        n = len(cols[0])
        if n == 0:
            raise ValueError("no tokens")
        S, W = self.S, self.W
        nsink0, count0, head0 = self.nsink, self.count, self.head
        k_s = min(S - nsink0, n)  # tokens that become sinks (only before the sinks are full)
        m = n - k_s  # window tokens of this forward

        # the shift of this forward: the visible window is the held window plus the chunk's window tokens
        delta = (0, 0, 0)
        if self.evicted:
            lo = self._axis_min()
            if m:
                lo_c = [min(c[k_s:]) for c in cols]
                lo = lo_c if lo is None else [min(a, b) for a, b in zip(lo, lo_c)]
            if not self.per_axis:
                lo = [min(lo)] * 3
            delta = tuple(max(0, a - e) for a, e in zip(lo, self.sink_end))
        base = self.base
        if self.evicted and any(not 0 <= d - b < self.R for d, b in zip(delta, base)):
            base = delta
        dB = tuple(b - a for a, b in zip(self.base, base))
        sink_shift = tuple(d - b for d, b in zip(delta, base))
        if not any(base):
            out = pos
        elif n <= 64:  # cheaper than a tensor op for decode steps
            out = torch.tensor([[v - b for v in c] for c, b in zip(cols, base)], dtype=torch.long)
        else:
            out = pos - torch.tensor(base, dtype=torch.long)[:, None]

        # bookkeeping after this forward: which chunk rows end where (the ring keeps the last W)
        runs = []
        if k_s:
            runs.append((0, nsink0, k_s))
            for sp, c in zip(self.slot_pos, cols):
                sp[nsink0 : nsink0 + k_s] = c[:k_s]
            self.nsink += k_s
            if self.nsink == S:
                ends = [max(c[:S]) + 1 for c in self.slot_pos]
                self.sink_end = tuple(ends) if self.per_axis else (max(ends),) * 3
        if m:
            keep = min(m, W)
            first = m - keep
            start = (head0 + first) % W
            l1 = min(keep, W - start)
            runs.append((k_s + first, S + start, l1))
            for sp, c in zip(self.slot_pos, cols):
                sp[S + start : S + start + l1] = c[k_s + first : k_s + first + l1]
            if keep > l1:
                runs.append((k_s + first + l1, S, keep - l1))
                for sp, c in zip(self.slot_pos, cols):
                    sp[S : S + keep - l1] = c[k_s + first + l1 :]
            self._push([c[k_s + first :] for c in cols], self.m_total + first)
            self.m_total += m
            self.head = (head0 + m) % W
            self.count = min(count0 + m, W)
            if count0 + m > W:
                self.evicted = True
            self._evict_mins()
        self.seen += n
        self.base, self.delta = base, delta
        self._plan_id += 1
        k = self.kernel  # kernel mode never re-rotates keys: positions only
        self._plan = _Plan(
            id=self._plan_id, C=nsink0 + count0, n=n, nsink0=nsink0, ring_valid=count0, dB=dB,
            sink_shift=sink_shift, runs=runs, out=out,
            rebase_cs=self._cos_sin(tuple(-x for x in dB)) if count0 and any(dB) and not k else None,
            sink_cs=self._cos_sin(sink_shift, memo=True) if nsink0 and any(sink_shift) and not k else None,
        )
        hi = max(max(c) - b for c, b in zip(cols, base))
        lo_r = min(min(c) - b for c, b in zip(cols, base))
        self.last_rotated_range = (lo_r, hi)
        self.max_rotated_position = max(self.max_rotated_position, hi)
        self.min_rotated_position = min(self.min_rotated_position, lo_r)
        return out.reshape(3, 1, n).to(device)

    # ------------------------------------------------------------------ crop
    @torch.inference_mode()  # callable outside inference mode (StreamingThinker.truncate)
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers 5 convention: a negative count).

        Before any eviction this is an exact rollback. After one, only tokens still in the window can
        be dropped, and the evicted tokens do not come back (the window then holds fewer than ``W``
        tokens until refilled)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to drop")
        k = -int(tokens_to_remove)
        if k == 0:
            return
        if self._plan is not None and any(
            layer.is_initialized and layer._done != self._plan.id for layer in self.layers
        ):
            raise RuntimeError("crop between cache_positions and its forward")
        if k > self.n_cached or (self.evicted and k > self.count):
            raise ValueError(
                f"cannot drop {k} tokens: {self.count} window tokens held"
                + (" (earlier ones were evicted)" if self.evicted else f" + {self.nsink} sinks")
            )
        S, W = self.S, self.W
        for layer in self.layers:
            layer._flush()
        if self._kpos is not None:
            self._kernel_flush_positions()
        if self.count == W and self.head:  # make the ring chronological from slot S (rare: one O(W) copy)
            for layer in self.layers:
                if layer.is_initialized:
                    for t in (layer.keys, layer.values):
                        t[:, :, S : S + W] = t[:, :, S : S + W].roll(-self.head, dims=-2)
            if self._kpos is not None:
                self._kpos[:, :, S : S + W] = self._kpos[:, :, S : S + W].roll(-self.head, dims=-1)
            h = self.head
            for sp in self.slot_pos:
                sp[S : S + W] = sp[S + h : S + W] + sp[S : S + h]
        drop_w = min(k, self.count)
        self.count -= drop_w
        self.m_total -= drop_w
        self.head = self.count % W
        drop_s = k - drop_w
        if drop_s:
            self.nsink -= drop_s
            self.sink_end = (0, 0, 0)
        self.seen -= k
        self._plan = None
        self._rebuild_mins()


# ---------------------------------------------------------------------- StreamingThinker glue
class _PositionMappingLM:
    """Wraps a language model so each call first maps its positions through the WindowCache."""

    def __init__(self, lm):
        self._lm = lm

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def __call__(self, *args, position_ids=None, cache=None, **kw):
        if isinstance(cache, WindowCache):
            if position_ids is None:
                raise ValueError("a WindowCache needs explicit position_ids")
            position_ids = cache.cache_positions(position_ids)
        return self._lm(*args, position_ids=position_ids, cache=cache, **kw)


def window_thinker(thinker, window: WindowConfig | None = None, rope=None, tokenizer=None, **kw):
    """A ``StreamingThinker`` whose cache is a :class:`WindowCache` (``n_tokens`` counts tokens seen;
    ``truncate`` works within the window, see :meth:`WindowCache.crop`).

    ``window.kernel=None`` turns kernel mode on when the Thinker is on CUDA; in kernel mode the
    Thinker's language model is switched to the ``"omnistream_window"`` attention function
    (:mod:`omnistream.kernels.window_attention`; other caches on the same model still get SDPA)."""
    from omnistream.talker.thinker import StreamingThinker

    window = window if window is not None else WindowConfig()
    if window.kernel is None:
        window = replace(window, kernel=thinker.get_input_embeddings().weight.device.type == "cuda")
    if window.kernel:
        from omnistream.kernels.window_attention import enable_window_attention

        enable_window_attention(thinker)
    st = StreamingThinker(thinker, rope, tokenizer, **kw)
    st.lm = _PositionMappingLM(st.lm)
    st._cache_cls = partial(WindowCache, window=window)
    st.reset()
    return st
