"""Kernel mode of a :class:`~omnistream.memory.window_cache.WindowCache`: pre-RoPE keys + per-slot positions.

Kernel mode (``WindowConfig(kernel=True)``; automatic on CUDA through :func:`window_thinker`)
----------------------------------------------------------------------------------------------
Keys are stored PRE-RoPE and each slot carries its cache position in one ``(1, 3, S + W + T)``
int32 buffer shared by the layers (:class:`KernelSlots`). ``update`` un-rotates the forward's new
keys once (they arrive rotated at the positions ``WindowCache.cache_positions`` returned: the
inverse M-RoPE rotation, O(new tokens)) and writes them with :func:`omnistream.kernels.ring_append`.
Re-positioning is then integer work on that buffer, once per forward for all layers: the sinks at
``s + (delta - B)`` (S slots per step) and the ring ``-= dB`` at a rebase (every ``rebase_every``
tokens); no key is ever rewritten, so nothing rounds and ``rebase_every`` no longer trades accuracy.
A single-token decode step returns a pre-RoPE view of the buffers tagged for the
``"omnistream_window"`` attention function (:mod:`omnistream.kernels.window_attention`), which runs
:func:`omnistream.kernels.window_decode_attention` (RoPE applied in-kernel at the slot positions;
the query, already rotated by the model, is passed at position 0). A prefill chunk gets the held
keys rotated once at their cache positions plus its own (model-rotated) keys, for plain SDPA. Batch
size 1 (one session per cache). Compared with the rotated layout the un-rotation adds one rounding
per key (fp32 logits agree to ~3e-6 on the tiny Thinker).

The positions themselves (``delta``, ``B``, the runs of slots) come from the same host-side
:class:`~omnistream.memory.window_positions.Plan` as in the rotated layout; this module only turns
them into device integers and executes the layer's write.
"""

from __future__ import annotations

import torch

from .window_positions import Plan

__all__ = ["KernelSlots", "update_kernel"]


class KernelSlots:
    """Kernel mode's device buffers, shared by all layers of one cache (positions are per session, not
    per layer): ``pos`` ``(1, 3, cap)`` int32 cache position of each slot, ``valid`` ``(1, cap)`` bool,
    ``sink`` ``(1, 3, max(S, 1))`` the sinks' original positions, ``inv_freq`` ``(D/2,)`` float32 and
    ``q_pos`` ``(B, 3)`` int32 zeros (the query is already rotated). Allocated at the first forward, on
    its device; ``cap = S + W + chunk_tokens``."""

    def __init__(self, sink_tokens: int, capacity: int, inv_freq: torch.Tensor, mrope_section: list[int]):
        self.S, self.cap = sink_tokens, capacity
        self._inv_freq64 = inv_freq  # (D/2,) float64 CPU
        self.mrope_section = mrope_section
        self.pos = self.valid = self.sink = self.inv_freq = self.q_pos = None
        self.reset()

    def reset(self) -> None:
        """Forget the session; keep the buffers."""
        if self.pos is not None:
            self.pos.zero_()
            self.valid.zero_()
            self.sink.zero_()
        self.moves: list = []  # slot-position moves (scratch -> ring) of the last forward
        self.sink_shift = (0, 0, 0)
        self.prepared = 0  # id of the last plan whose positions were prepared

    def nbytes(self) -> int:
        """Bytes of the position buffers (0 before the first forward)."""
        if self.pos is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.pos, self.valid, self.sink, self.q_pos))

    def flush(self) -> None:
        """Move the last forward's scratch slot positions to their ring slots."""
        for src, dst, n in self.moves:
            self.pos[:, :, dst : dst + n] = self.pos[:, :, src : src + n].clone()
        self.moves = []

    def roll_ring(self, S: int, W: int, roll: int) -> None:
        """Rotate the ring's slot positions left by ``roll`` (``WindowCache.crop`` makes it chronological)."""
        if self.pos is not None:
            self.pos[:, :, S : S + W] = self.pos[:, :, S : S + W].roll(-roll, dims=-1)

    def query_positions(self, batch: int, device) -> torch.Tensor:
        """(>= batch, 3) int32 zeros on ``device``: the query positions the kernel rotates at."""
        if self.q_pos is None or self.q_pos.device != device or self.q_pos.shape[0] < batch:
            self.q_pos = torch.zeros(batch, 3, dtype=torch.int32, device=device)
        return self.q_pos

    def prepare(self, plan: Plan, device) -> None:
        """Once per forward (first layer): bring the per-slot cache positions ``(1, 3, S + W + T)`` into
        this forward's frame and make the device tensors the layers share. All integer work: moving the
        last forward's scratch slots, the rebase (``-= dB`` over the ring, every ``rebase_every``
        tokens), the sinks at ``s + (delta - B)`` (S slots). No key is ever re-rotated."""
        if self.prepared == plan.id:
            return
        from omnistream.kernels import mrope_cos_sin

        S, cap, n, C = self.S, self.cap, plan.n, plan.C
        if self.pos is None or self.pos.device != device:
            self.pos = torch.zeros(1, 3, cap, dtype=torch.int32, device=device)
            self.valid = torch.zeros(1, cap, dtype=torch.bool, device=device)
            self.sink = torch.zeros(1, 3, max(S, 1), dtype=torch.int32, device=device)
            self.inv_freq = self._inv_freq64.to(device=device, dtype=torch.float32)
        self.flush()
        host = torch.empty(3, n + 2, dtype=torch.int32)  # one host->device copy per forward
        host[:, :n] = plan.out
        host[:, n] = torch.tensor(plan.dB, dtype=torch.int32)
        host[:, n + 1] = torch.tensor(plan.sink_shift, dtype=torch.int32)
        dev = host.to(device)
        kpos = self.pos
        if plan.ring_valid and any(plan.dB):  # rebase: window positions from p - B_old to p - B_new
            kpos[:, :, S : S + plan.ring_valid] -= dev[None, :, n : n + 1]
        if plan.nsink0 and plan.sink_shift != self.sink_shift:
            kpos[:, :, : plan.nsink0] = self.sink[:, :, : plan.nsink0] + dev[None, :, n + 1 : n + 2]
        self.sink_shift = plan.sink_shift
        if C < S:  # new sinks: their original positions (delta = B = 0 until the sinks are full)
            k = min(S - C, n)
            self.sink[:, :, C : C + k] = dev[None, :, :k]
        plan.k_pos = dev[None, :, :n]  # (1, 3, n) positions the model rotates the new tokens at
        plan.k_slots = torch.arange(C, C + n, device=device)
        plan.k_cs = mrope_cos_sin(plan.k_pos, self.inv_freq, self.mrope_section)  # (1, n, D) each
        if n > 1 or C + n > cap:  # prefill: the held keys are materialized rotated for SDPA
            plan.k_held_cs = mrope_cos_sin(kpos[:, :, :C], self.inv_freq, self.mrope_section)
        self.moves = plan.moves() if C + n <= cap else []
        self.prepared = plan.id


def update_kernel(layer, plan: Plan, key_states: torch.Tensor, value_states: torch.Tensor):
    """``WindowLayer.update`` in kernel mode: un-rotate the new keys once (they arrive rotated at
    ``plan.out``), store them pre-RoPE with ``ring_append``; return a tagged pre-RoPE view for a decode
    step (the window attention function runs the kernel on it) or the held keys rotated at their cache
    positions plus the chunk's own keys for a prefill chunk (plain SDPA then)."""
    from omnistream.kernels import apply_rope, ring_append

    slots: KernelSlots = layer.owner._kslots
    if layer._handle is not None and not layer._handle.consumed:
        raise RuntimeError(
            "kernel-mode WindowCache: the last decode step did not go through the window attention "
            "function; call omnistream.kernels.window_attention.enable_window_attention(model) (window_thinker does)"
        )
    layer._handle = None
    slots.prepare(plan, key_states.device)
    q_pos = slots.query_positions(key_states.shape[0], key_states.device)
    K, V, C, n = layer.keys, layer.values, plan.C, plan.n
    cos, sin = plan.k_cs  # (1, n, D) at the positions the model rotated the new keys at
    k_pre = apply_rope(key_states, cos[:, None], -sin[:, None])  # inverse rotation, (B, H, n, D)
    fits = C + n <= K.shape[-2]
    if fits:
        ring_append(K, V, slots.pos, slots.valid, k_pre, value_states, plan.k_pos, plan.k_slots)
        layer._pending = plan.moves()
        if n == 1:
            from omnistream.kernels.window_attention import HANDLE_ATTR, DecodeHandle

            k_view, v_view = K[:, :, : C + 1], V[:, :, : C + 1]
            layer._handle = DecodeHandle(layer, slots.pos[:, :, : C + 1], slots.inv_freq, slots.mrope_section, q_pos)
            setattr(k_view, HANDLE_ATTR, layer._handle)
            return k_view, v_view
    hc, hs = plan.k_held_cs  # prefill: the held keys rotated at their cache positions + the chunk's own
    k_out = torch.cat((apply_rope(K[:, :, :C], hc[:, None], hs[:, None]), key_states), dim=-2)
    if fits:
        return k_out, V[:, :, : C + n]
    # chunk larger than the scratch: materialized above, before the runs overwrite ring slots
    v_out = torch.cat((V[:, :, :C], value_states), dim=-2)
    for i, dst, ln in plan.runs:
        ring_append(K, V, slots.pos, slots.valid, k_pre[:, :, i : i + ln], value_states[:, :, i : i + ln],
                    plan.k_pos[:, :, i : i + ln], torch.arange(dst, dst + ln, device=K.device))
    return k_out, v_out
