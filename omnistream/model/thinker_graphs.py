"""CUDA graphs for the Thinker's batched decode step over window-cache sessions (rows of a RowPool).

Why: as for the Talker (:mod:`omnistream.model.graphs`), a batched Thinker decode step at small batch
is bound by the host: transformers' decoder layers launch op by op, and the step builds its per-row
positions, masks and cache writes in Python. Capturing the forward once per batch-size bucket and
replaying it leaves one launch for the model's part of the step.

What is static: the sessions' K/V already are (rows of one :class:`~omnistream.memory.pool.RowPool`,
per layer ``(R, H_kv, S, D)``, attended in place by :class:`~omnistream.memory.batch.PoolBatch`). Per
pool, :class:`ThinkerGraphs` keeps one static input tensor ``inp`` ``(8, R)`` long, written by ONE host
to device copy per step: per pool row its token id, write slot ``C`` (the tokens its cache held before
the step), valid slots ``C + 1``, ``active`` (1 if it steps this tick), its M-RoPE position ids ``(3,)``
(already mapped by its cache's ``cache_positions``) and, in row 7, the pool row of each batch row (to
gather the outputs). The captured function (:meth:`ThinkerGraphs._forward`) embeds the tokens, builds
the padding mask over all ``S`` slots (:func:`~omnistream.model.graphs.padding_mask`) and runs
transformers' own language-model forward over pool rows ``[0, bucket)`` with a
:class:`~omnistream.model.graphs.StaticRows` cache (each row's new K/V scattered to its slot ``C``),
then the LM head. A row of the bucket that does not step (another session waiting, or a free row)
has ``active = 0``: its slot is rewritten with what it held, so no session's state changes.

Window bookkeeping stays outside the graph, exactly as today: each row's ``cache_positions`` plans the
step on the host; a row whose plan needs work on its buffers (the previous step's scratch-to-ring
move after an eviction, a rebase's re-rotation of the ring, the sinks' re-rotation, a new sink)
runs its cache's own ``WindowLayer.update`` per layer before the replay, on its pool row in place,
with a zero key/value that the replay then overwrites at the same slot (a new sink's rotated-at-birth
copy is taken from the replayed slot afterwards). A row needing none of it (a window not yet full)
only marks its layers as run. After an eviction every step re-rotates the sinks (the shift follows
the window), so such rows keep their per-layer host work; the forward itself still replays.

Buckets: the pool keeps its live rows compacted at ``[0, used)``; a step replays the graph of the
smallest power-of-two bucket covering the highest row that steps (capped at the pool's rows). The
graphs are captured over the pool's buffers: when the pool grows or shrinks (new buffers), the
static inputs are re-made and the graphs captured again.

Which steps replay (``step`` returns False and :func:`~omnistream.model.thinker.step_tokens` runs its
eager path otherwise): every row a rotated-layout ``WindowCache`` in a row of the same pool of this
model (``window_thinker`` with ``kernel=False``; on CUDA ``window_thinker`` defaults to kernel mode,
which stays eager), with a scratch slot (``chunk_tokens >= 1``), a group of one included. Growing
caches (BatchCache gathers), kernel-mode caches, private buffers and sliding-window models run eager.

Without CUDA (or ``graphs=False``) the same static step runs eagerly: tests/test_thinker_graphs.py
compares it with the eager ``step_tokens`` on CPU (and ``torch.compile`` of it with the eager static
step), and the replay with the eager static step on CUDA.
"""

from __future__ import annotations

import torch

from .graphs import StaticRows, capture_graph, padding_mask

ATTR = "_omnistream_thinker_graphs"  # on the Thinker's language model; read by step_tokens

TOK, SLOT, NVALID, ACTIVE, POS, ROW = 0, 1, 2, 3, 4, 7  # rows of the static input (POS: 3 rows)


class _PoolInputs:
    """Static inputs of one pool, sized to its rows, and the graphs captured over its buffers."""

    def __init__(self, pool, device):
        self.pool = pool
        self.sig = _signature(pool)
        self.inp = torch.zeros(8, pool.rows, dtype=torch.long, device=device)  # see the module docstring
        self.slots = torch.arange(pool.slots, device=device)
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, (embeds, hidden, logits))


def _signature(pool) -> tuple:
    """What a graph captured over the pool's buffers depends on: their rows and addresses."""
    return pool.rows, pool.K[0].data_ptr(), pool.V[0].data_ptr()


class ThinkerGraphs:
    """Static decode step of one Thinker's window-cache sessions, per pool (see the module docstring)."""

    def __init__(self, thinker, graphs: bool | None = None):
        self.thinker = thinker  # Qwen2_5OmniThinkerForConditionalGeneration
        self.lm = thinker.model.language_model
        self.embed = thinker.get_input_embeddings()
        p = self.embed.weight
        self.device, self.dtype = p.device, p.dtype
        self.graphs_on = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs_on and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the Thinker on a CUDA device")
        self.layer_types = set(getattr(self.lm.config, "layer_types", None) or ["full_attention"])
        self.mempool = torch.cuda.graph_pool_handle() if self.graphs_on else None
        self._inputs: dict[int, _PoolInputs] = {}  # id(pool) -> its static inputs
        self.forward = self._forward  # the static step (a test swaps in a torch.compile of it)
        self.steps = 0  # batched steps this object ran (diagnostic; tests check the path was taken)

    # ------------------------------------------------------------------ which steps
    def usable(self, thinkers) -> object | None:
        """The pool all ``thinkers``' caches live in when this step can run static, else None."""
        from omnistream.memory.window_cache import WindowCache

        if getattr(self.lm, "has_sliding_layers", False):
            return None
        pool = None
        for th in thinkers:
            c = th.cache
            if (not isinstance(c, WindowCache) or c.kernel or c.T < 1 or c.pool_row is None
                    or getattr(th.lm, "inner", th.lm) is not self.lm or c._forward_pending()):
                return None
            if pool is None:
                pool = c.pool
            elif c.pool is not pool:
                return None
        return pool if pool is not None and pool.spec[-1] == self.device else None

    def _state(self, pool) -> _PoolInputs:
        st = self._inputs.get(id(pool))
        if st is None or st.pool is not pool or st.sig != _signature(pool):
            st = self._inputs[id(pool)] = _PoolInputs(pool, self.device)
        return st

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, thinkers, tokens: list[int]) -> bool:
        """Append ``tokens[b]`` to ``thinkers[b]`` as :func:`~omnistream.model.thinker.step_tokens`
        does, through the static step; False (nothing touched) when the step cannot run static."""
        pool = self.usable(thinkers)
        if pool is None:
            return False
        pool.compact()  # a finalizer may have freed rows: nothing moves after this
        st = self._state(pool)
        rows = [th.cache.pool_row for th in thinkers]
        bucket = min(pool.rows, 1 << max(rows).bit_length())  # covers rows [0, max + 1)
        starts = [th.n_tokens for th in thinkers]
        inp = [[0] * bucket for _ in range(8)]  # host side; idle rows: token 0, slot 0, 1 valid slot, inactive
        inp[NVALID] = [1] * bucket
        new_sinks = []
        for b, (th, tok, r) in enumerate(zip(thinkers, tokens, rows)):
            c = th.cache
            c.cache_positions(th.rope.text([int(tok)])[0].pos)  # plans the step in the cache's frame
            plan = c._plan
            inp[TOK][r], inp[SLOT][r], inp[NVALID][r], inp[ACTIVE][r] = int(tok), plan.C, plan.C + 1, 1
            for a, p in enumerate(plan.out.reshape(3).tolist()):  # its positions as the model sees them
                inp[POS + a][r] = p
            inp[ROW][b] = r
            if plan.C < c.S:
                new_sinks.append(c)
            _before_replay(c, plan)
        st.inp[:, :bucket].copy_(torch.tensor(inp))  # (8, bucket): one host-to-device copy
        embeds, hidden, logits = self._run(st, bucket)  # (bucket, D), (bucket, D), (bucket, V)
        idx = st.inp[ROW, : len(thinkers)]
        embeds, hidden, logits = (t.index_select(0, idx) for t in (embeds, hidden, logits))  # (B, ...)
        for c in new_sinks:  # the sink as rotated at birth: what the replay wrote at its slot
            C = c._plan.C
            for layer in c.layers:
                layer.sink_keys[:, :, C].copy_(layer.keys[:, :, C])
        for b, th in enumerate(thinkers):
            th._commit(embeds[b : b + 1], hidden[b : b + 1], starts[b], logits=logits[b])
        self.steps += 1
        return True

    def _forward(self, st: _PoolInputs, B: int):
        """The static step over pool rows [0, B): what the graph of bucket B captures."""
        inp = st.inp[:, :B]
        x = self.embed(inp[TOK])  # (B, D)
        pool = st.pool
        out = self.lm(
            inputs_embeds=x[:, None],  # (B, 1, D)
            position_ids=inp[POS : POS + 3, :, None],  # (3, B, 1)
            attention_mask=dict.fromkeys(self.layer_types, padding_mask(st.slots, inp[NVALID], self.dtype)),
            cache=StaticRows([k[:B] for k in pool.K], [v[:B] for v in pool.V], inp[SLOT], active=inp[ACTIVE]),
            use_cache=True,
        )
        hidden = out.last_hidden_state[:, -1]  # (B, D)
        return x, hidden, self.thinker.lm_head(hidden)

    def _run(self, st: _PoolInputs, B: int):
        if not self.graphs_on:
            return self.forward(st, B)
        if B not in st.graphs:
            st.graphs[B] = capture_graph(lambda: self.forward(st, B), self.device, self.mempool, st.inp[ACTIVE])
        graph, out = st.graphs[B]
        graph.replay()
        return out


def _before_replay(cache, plan) -> None:
    """The window bookkeeping of one row before the replay (see the module docstring): the cache's own
    per-layer update (with a zero key/value the replay overwrites) when its plan needs buffer work,
    else only what that update records (the layer ran this plan; its moves for the next step)."""
    l0 = cache.layers[0]
    needs = (l0._pending or plan.C < cache.S or (plan.ring_valid and any(plan.dB))
             or (plan.nsink0 and plan.sink_shift != l0._sink_shift))
    if needs:
        K = l0.keys
        zk = K.new_zeros(1, K.shape[1], 1, K.shape[-1])
        zv = zk if l0.values.shape[-1] == K.shape[-1] else K.new_zeros(1, K.shape[1], 1, l0.values.shape[-1])
        for i, layer in enumerate(cache.layers):
            layer.update(zk, zv, i)
        return
    moves = plan.moves()
    for layer in cache.layers:
        if layer._done != plan.id - 1:
            raise RuntimeError("WindowCache: a forward was skipped for this layer; reset() the cache")
        layer._done, layer._pending, layer._sink_shift = plan.id, list(moves), plan.sink_shift


def enable_thinker_graphs(thinker, **kw) -> ThinkerGraphs:
    """Route this Thinker's batched decode steps over window-cache rows through the static step
    (CUDA: graphs); other steps keep their eager path."""
    g = ThinkerGraphs(thinker, **kw)
    setattr(thinker.model.language_model, ATTR, g)
    return g


def disable_thinker_graphs(thinker) -> None:
    lm = thinker.model.language_model
    if hasattr(lm, ATTR):
        delattr(lm, ATTR)
