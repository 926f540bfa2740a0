"""CUDA graphs for the Talker's decode step: static cache rows, one captured forward per batch bucket.

Why: on the 7B shape on an H200 (benchmarks/decode_steps.py), one batched Talker step launched
~1,000 kernels at batch 1 and ~5,800 at batch 32 (transformers' decoder layers op by op, plus the
BatchCache gathering every row's cache into padded buffers) and kept the GPU busy 3-12 ms of a
85-190 ms step: the step is bound by the host, not the GPU. A codec token is 20 ms of speech, so
that host time decides how many sessions one GPU holds. Capturing the step once per batch size and
replaying it (as gpt-fast and vLLM do) leaves one launch per step.

How: a graph needs static shapes and addresses. :class:`TalkerGraphs` holds, per Talker model, R
static rows: per layer K and V buffers (R, H_kv, C, D) and per-row lengths ``lens``. A talker's
reply takes a row at its first decode step: its DynamicCache (the prompt rows and the two
reply-prefill rows) is copied in once; each decode step then writes its key/value at ``lens``
(``scatter_``, inside the graph) and attends over all C slots with an additive mask built from
``lens`` (inside the graph). The decode rows never go back to the DynamicCache: ``end_turn`` crops
them off anyway (between turns the Talker's cache holds prompt rows only), so a row is released
when its talker's codec ends or its turn closes. The captured function is transformers' own
Talker forward (``cache=`` a :class:`StaticRows` view, ``attention_mask=`` the mask), not a
re-implementation of the model.

Buckets: rows are taken lowest-free-first and compacted on release (the highest row moves into the
hole), so B replying talkers hold rows [0, B); a step replays the graph of the smallest power-of-two
bucket covering the rows in use. A row of the bucket that does not step this tick (its talker is
waiting for text) gets ``active = 0``: its scatter writes its next free slot, which its next real
step overwrites, and its length does not move. The rows R and the capacity C double (buffers
re-made, graphs re-captured) when a talker finds no free row or a row would overflow.

Without CUDA (or ``graphs=False``) the same static step runs eagerly: tests/test_talker_graphs.py
compares it with the BatchCache step on CPU, and the replay with the eager static step on CUDA.

The Thinker's batched decode step over window-cache rows is captured the same way, with the pieces
shared from here (:class:`StaticRows`, :func:`padding_mask`, :func:`capture_graph`):
:mod:`omnistream.model.thinker_graphs`.
"""

from __future__ import annotations

import os

import torch
from transformers.cache_utils import Cache

ATTR = "_omnistream_graphs"


class StaticRows(Cache):
    """Rows [0, B) of the static buffers as a transformers Cache for one decode forward (1 token per row).

    ``active`` (B,) 0/1, optional: a row with 0 rewrites the slot ``lens[b]`` with what it held (a
    gather before the scatter), so its buffers do not change; without it every row writes its new
    key/value (the Talker's idle rows write a free slot instead, see the module docstring)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lens: torch.Tensor,
                 active: torch.Tensor | None = None):
        super().__init__(layers=[])
        self.keys, self.values, self.lens = keys, values, lens  # per layer (B, H_kv, C, D); (B,)
        self.active = None if active is None else active.view(-1, 1, 1, 1).bool()  # (B, 1, 1, 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``key_states``/``value_states`` (B, H_kv, 1, D) go to slot ``lens[b]`` of row b; returns all C slots."""
        K, V = self.keys[layer_idx], self.values[layer_idx]
        B, H, _, D = key_states.shape
        at = self.lens.view(B, 1, 1, 1).expand(B, H, 1, D)
        at_v = self.lens.view(B, 1, 1, 1).expand(B, H, 1, V.shape[-1])
        k, v = key_states.to(K.dtype), value_states.to(V.dtype)
        if self.active is not None:
            k = torch.where(self.active, k, K.gather(2, at))  # (B, H_kv, 1, D)
            v = torch.where(self.active, v, V.gather(2, at_v))
        K.scatter_(2, at, k)
        V.scatter_(2, at_v, v)
        return K, V

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("StaticRows has one length per row (its lens tensor)")

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.keys[0].shape[2], 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1


class TalkerGraphs:
    """Static decode rows of one Talker model, and its captured steps (see the module docstring)."""

    def __init__(self, talker, rows: int = 8, capacity: int = 1024, graphs: bool | None = None):
        self.talker, self.model = talker, talker.model
        p = next(talker.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.graphs_on = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs_on and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the Talker on a CUDA device")
        cfg = self.model.config
        self.h_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        self.owner: list = []  # the StreamingTalker holding each row
        self.n: list[int] = []  # host copy of lens (read without a device sync)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs_on else None
        self.rows = self.capacity = 0
        self._alloc(rows, capacity)

    # ------------------------------------------------------------------ buffers
    def _alloc(self, rows: int, capacity: int) -> None:
        """(Re)make the static buffers with ``rows`` rows of ``capacity`` slots, keeping what they
        hold; the graphs are captured again (their addresses changed)."""
        def grown(old: torch.Tensor | None, shape, dtype) -> torch.Tensor:
            new = torch.zeros(shape, device=self.device, dtype=dtype)
            if old is not None:
                new[tuple(slice(0, n) for n in old.shape)].copy_(old)
            return new

        first = self.rows == 0
        d_in = self.talker.thinker_to_talker_proj.in_features
        kv = (rows, self.h_kv, capacity, self.head_dim)
        layers = self.model.config.num_hidden_layers
        self.K = [grown(None if first else self.K[i], kv, self.dtype) for i in range(layers)]
        self.V = [grown(None if first else self.V[i], kv, self.dtype) for i in range(layers)]
        self.x = grown(None if first else self.x, (rows, 1, d_in), self.dtype)  # step inputs, pre-projection
        self.pos = grown(None if first else self.pos, (3, rows, 1), torch.long)
        self.lens = grown(None if first else self.lens, (rows,), torch.long)
        self.active = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.owner += [None] * (rows - self.rows)
        self.n += [0] * (rows - self.rows)
        self.rows, self.capacity = rows, capacity
        self.slots = torch.arange(capacity, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, logits)

    def _row_of(self, t) -> int:
        """The talker's row; at its first step, a free row filled from its DynamicCache."""
        r = getattr(t, "_graph_row", None)
        if r is not None:
            return r
        if None not in self.owner:
            self._alloc(2 * self.rows, self.capacity)
        r = self.owner.index(None)
        n = t.cache.get_seq_length()
        while n + 1 > self.capacity:
            self._alloc(self.rows, 2 * self.capacity)
        for k, v, layer in zip(self.K, self.V, t.cache.layers):
            k[r, :, :n].copy_(layer.keys[0])  # (H_kv, n, D)
            v[r, :, :n].copy_(layer.values[0])
        self.lens[r], self.n[r] = n, n
        self.owner[r], t._graph_row = t, r
        return r

    @torch.inference_mode()
    def release(self, t) -> None:
        """Free the talker's row (its codec ended or its turn closed); the highest row fills the hole."""
        r = getattr(t, "_graph_row", None)
        if r is None or self.owner[r] is not t:
            return
        t._graph_row, self.owner[r] = None, None
        last = max((i for i, o in enumerate(self.owner) if o is not None), default=-1)
        if last > r:
            for k, v in zip(self.K, self.V):
                k[r].copy_(k[last])
                v[r].copy_(v[last])
            self.lens[r], self.n[r] = self.n[last], self.n[last]
            self.owner[r], self.owner[last] = self.owner[last], None
            self.owner[r]._graph_row = r

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, talkers, inputs: list[torch.Tensor] | None = None) -> list[int | None]:
        """One decode step of every given talker (each ``ready()``): the batched ``_decode_step``.
        ``inputs``: the talkers' reply rows (D_thinker,) when already taken (default: take them)."""
        rows = [self._row_of(t) for t in talkers]
        if inputs is None:
            inputs = [t._take_row() for t in talkers]
        while max(self.n[r] for r in rows) + 1 > self.capacity:
            self._alloc(self.rows, 2 * self.capacity)
        t0 = talkers[0]
        idx = torch.tensor(rows, device=self.device)
        last = torch.tensor([t._last for t in talkers], device=self.device)
        x = t0._codec_embed(last) + torch.stack([r.to(self.device, self.dtype) for r in inputs])
        self.x[idx, 0] = x  # (B, D_thinker) into the static rows
        self.pos[:, idx, 0] = torch.tensor([t._pos for t in talkers], device=self.device)  # same t/h/w position
        self.active.zero_()
        self.active[idx] = 1
        used = max(i for i, o in enumerate(self.owner) if o is not None) + 1
        bucket = min(self.rows, 1 << (used - 1).bit_length())
        logits = self._run(bucket)  # (bucket, V) float32
        toks = []
        for t, r in zip(talkers, rows):
            self.n[r] += 1
            toks.append(t._emit(logits[r]))
            t._pos += 1
        for t in talkers:
            if t.done:
                self.release(t)
        return toks

    def _forward(self, B: int) -> torch.Tensor:
        """The static step over rows [0, B): what the graph of bucket B captures."""
        x = self.talker.thinker_to_talker_proj(self.x[:B])  # (B, 1, D_talker)
        lens = self.lens[:B]
        mask = padding_mask(self.slots, lens + 1, self.dtype)  # (B, 1, 1, C): the held slots and the new one
        out = self.model(
            inputs_embeds=x,
            position_ids=self.pos[:, :B],  # (3, B, 1)
            attention_mask=dict.fromkeys(self.layer_types, mask),
            cache=StaticRows([k[:B] for k in self.K], [v[:B] for v in self.V], lens),
            use_cache=True,
        )
        logits = self.talker.codec_head(out.last_hidden_state[:, -1]).float()  # (B, V)
        self.lens[:B] += self.active[:B]
        return logits

    def _run(self, B: int) -> torch.Tensor:
        if not self.graphs_on:
            return self._forward(B)
        if B not in self.graphs:
            self.graphs[B] = capture_graph(lambda: self._forward(B), self.device, self.pool, self.active)
        graph, out = self.graphs[B]
        graph.replay()
        return out


def padding_mask(slots: torch.Tensor, n_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (B, 1, 1, C) of a one-token decode over C static slots: 0 on the slots
    ``< n_valid[b]`` of row b, the dtype's minimum elsewhere (an exact zero weight after the softmax).
    ``slots``: ``arange(C)``; ``n_valid`` (B,)."""
    held = slots[None, :] < n_valid[:, None]  # (B, C)
    mask = torch.zeros(held.shape, dtype=dtype, device=slots.device)
    return mask.masked_fill(~held, torch.finfo(dtype).min)[:, None, None, :]


def capture_graph(fn, device, pool, active: torch.Tensor | None = None):
    """Capture ``fn()`` (a static step over fixed buffers) as a CUDA graph: returns (graph, fn's output).

    The warm-up (cuBLAS handles, SDPA's kernel choice: outside the capture) runs for real on a side
    stream with ``active`` zeroed, so it moves no row's state (None: ``fn`` has no state to move);
    the capture itself runs nothing."""
    saved = None if active is None else active.clone()
    if active is not None:
        active.zero_()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if active is not None:
        active.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def enable_talker_graphs(talker, **kw) -> TalkerGraphs:
    """Route this Talker model's decode steps (solo and batched) through static rows (CUDA: graphs)."""
    g = TalkerGraphs(talker, **kw)
    setattr(talker, ATTR, g)
    return g


def disable_talker_graphs(talker) -> None:
    if hasattr(talker, ATTR):
        delattr(talker, ATTR)


GRAPHS_ENV = "OMNISTREAM_CUDA_GRAPHS"  # "1": the opt-in below (read by every load_omni, stage processes too)


def graphs_wanted(device) -> bool:
    """Opt-in for now (``OMNISTREAM_CUDA_GRAPHS=1``, CUDA devices only), for the Talker's and the
    Thinker's static steps and Token2Wav's DiT windows: they equal the eager ones on CPU (tests), but
    the captured replay has not yet run on a GPU here (the GPU check's tests/test_*_graphs.py,
    benchmarks/decode_steps.py and benchmarks/token2wav_batch.py do that); make it the default once
    they pass."""
    return torch.device(device).type == "cuda" and os.environ.get(GRAPHS_ENV, "0") == "1"
