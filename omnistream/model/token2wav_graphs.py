"""CUDA graphs for Token2Wav's DiT: a whole window's ODE -- 36 evaluations and the RK4 steps -- per replay.

Why: on an H200 the 7B shape's first Token2Wav chunk took 0.99 s (fp32), while the GPU did a small
part of it: one DiT evaluation of its 22 layers is a few hundred kernel launches, a window is 36
evaluations (RK4, 10 steps), and every 0.72 s of speech needs a window. Captured once per window
length and batch bucket, a window is one launch; the Thinker's and Talker's decode steps are
captured the same way (:mod:`omnistream.model.graphs`).

How: :class:`DiTGraphs` holds, per (window frames, batch bucket, ODE settings, block-sparse), static
inputs -- codes (R, W / 2), initial noise (R, W, 80), speaker vectors (R, enc_emb_dim) and speaker
features (2R, enc_dim: R guided rows, then R null rows) -- and the output mel (R, W, 80). The
captured function is the eager path's own code (:class:`~omnistream.model.token2wav_jobs._DiTWindow`
built from the static inputs, then :func:`~omnistream.model.token2wav_jobs.integrate`, which has no
host syncs), so the per-window constants (codec embeddings, rotary tables, block masks) are built
inside the graph too. A batch of B windows fills rows [0, B) of the smallest power-of-two bucket
R >= B; the rows beyond repeat row 0 (rows are independent: they only cost work) and are dropped.
A shape is captured at its first use (that window costs a warm-up run and the capture); all graphs
share one memory pool, since one window runs at a time (a lock; ``run_jobs`` may use threads).

Without CUDA (or ``graphs=False``) the same static function runs eagerly: tests/test_token2wav_graphs.py
compares it with the eager batched path on CPU (bit for bit: the DiT's rows are batch-invariant there),
and the replay with the static function on CUDA. Opt-in with the decode steps' graphs
(``OMNISTREAM_CUDA_GRAPHS=1``, :func:`~omnistream.model.graphs.graphs_wanted`): the replay has not
yet run on a GPU here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from omnistream.model.graphs import capture_graph
from omnistream.model.token2wav_jobs import GRAPHS_ATTR, _DiTWindow, increasing, integrate, ode_times


@dataclass
class _Entry:
    """One captured window shape: its static inputs, its output and (CUDA) its graph."""

    code: torch.Tensor  # (R, W / repeats) long
    x0: torch.Tensor  # (R, W, 80)
    cond: torch.Tensor  # (R, enc_emb_dim)
    spk: torch.Tensor  # (2R, enc_dim): guided rows [0, R), null rows [R, 2R)
    t: torch.Tensor  # (num_steps,)
    run: object  # () -> (R, W, 80): the static function
    out: torch.Tensor | None = None  # (R, W, 80), written by each replay
    graph: torch.cuda.CUDAGraph | None = None


def _bucket(b: int) -> int:
    return 1 << max(0, b - 1).bit_length()


class DiTGraphs:
    """A DiT model's captured windows (see the module docstring); ``max_rows``: the largest bucket."""

    def __init__(self, dit, *, graphs: bool | None = None, max_rows: int = 32, max_windows: int = 64):
        self.dit, self.max_rows, self.max_windows = dit, max_rows, max_windows
        self.device = next(dit.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the DiT on a CUDA device")
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None  # one memory pool for all windows
        self.entries: dict[tuple, _Entry | None] = {}
        self.captures = self.replays = 0
        self._lock = threading.Lock()  # one window at a time through the static buffers (run_jobs may use threads)

    @torch.no_grad()
    def run(self, code: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor, spk: torch.Tensor, *, num_steps: int,
            sway: float | None, guidance: float, block_sparse: bool) -> torch.Tensor | None:
        """B windows of one length: code (B, W / r), x0 (B, W, 80), cond (B, enc_emb_dim), spk (2B, enc_dim)
        (guided rows, then null rows) -> mel (B, 80, W). None -- the caller's eager path runs it -- where
        the ODE's time points are not strictly increasing (an unusual ``sway``: transformers' ``integrate``
        interpolates there) or ``max_windows`` shapes are captured already (a reply's last window can
        have any length: the rare ones are not worth a graph each)."""
        b, m = x0.shape[0], self.max_rows
        if b > m:  # beyond the largest bucket: one replay per max_rows windows
            parts = [self.run(code[i : i + m], x0[i : i + m], cond[i : i + m],
                              torch.cat([spk[i : i + m], spk[b + i : b + i + m]]), num_steps=num_steps, sway=sway,
                              guidance=guidance, block_sparse=block_sparse) for i in range(0, b, m)]
            return None if any(p is None for p in parts) else torch.cat(parts)
        rows = _bucket(b)
        key = (x0.shape[1], rows, num_steps, sway, float(guidance), bool(block_sparse), x0.dtype)
        with self._lock:
            if key not in self.entries and len(self.entries) < self.max_windows:
                self.entries[key] = self._make(key, code, x0, cond, spk)
            e = self.entries.get(key)
            return None if e is None else self._run(e, code, x0, cond, spk)

    def _run(self, e: _Entry, code, x0, cond, spk) -> torch.Tensor:
        b, rows = x0.shape[0], e.x0.shape[0]
        pick = torch.zeros(rows, dtype=torch.long, device=x0.device)  # static row r <- input row r, or row 0
        pick[:b] = torch.arange(b, device=x0.device)
        e.code.copy_(code[pick])
        e.x0.copy_(x0[pick])
        e.cond.copy_(cond[pick])
        e.spk.copy_(torch.cat([spk[:b][pick], spk[b:][pick]]))
        if e.graph is not None:
            e.graph.replay()
            self.replays += 1
            out = e.out
        else:
            out = e.run()
        return out[:b].permute(0, 2, 1).clone()  # (B, 80, W)

    def _make(self, key, code, x0, cond, spk) -> _Entry | None:
        n_frames, rows, num_steps, sway, guidance, block_sparse, _ = key
        t = ode_times(num_steps, sway, cond.dtype, cond.device)
        if not increasing(t):  # (integrate would sync: not capturable)
            return None
        like = lambda x, n: x[:1].expand(n, *x.shape[1:]).clone()  # noqa: E731 (static buffers: row 0 repeated)
        e = _Entry(like(code, rows), like(x0, rows), like(cond, rows),
                   torch.cat([like(spk[:1], rows), like(spk[-1:], rows)]), t, None)

        def static():  # the eager path's code over the static inputs
            window = _DiTWindow(self.dit, e.code, e.cond, e.spk, n_frames, block_sparse=block_sparse)
            return integrate(window, e.x0, e.t, guidance, rising=True)  # (checked above: no sync in a capture)

        e.run = static
        if self.graphs:
            e.graph, e.out = capture_graph(static, self.device, self.pool)
            self.captures += 1
        return e


def enable_dit_graphs(token2wav, **kw) -> DiTGraphs:
    """Route this Token2Wav model's DiT windows (solo and batched) through :class:`DiTGraphs`."""
    g = DiTGraphs(token2wav.code2wav_dit_model, **kw)
    setattr(token2wav.code2wav_dit_model, GRAPHS_ATTR, g)
    return g


def disable_dit_graphs(token2wav) -> None:
    if hasattr(token2wav.code2wav_dit_model, GRAPHS_ATTR):
        delattr(token2wav.code2wav_dit_model, GRAPHS_ATTR)
