"""VLN metrics with their published definitions, as VLN-CE / habitat-lab compute them.

- NE (navigation error): shortest-path (geodesic) distance from the final position to the goal
  (Anderson et al. 2018, "On Evaluation of Embodied Navigation Agents").
- SR (success): STOP was called and NE < the success distance (3 m in R2R / VLN-CE; habitat-lab's
  `Success` uses a strict `<`).
- OS (oracle success): some position on the trajectory was within the success distance of the goal.
- SPL: S * l / max(p, l), l = geodesic start-goal distance (`info.geodesic_distance`), p = the length of
  the path the agent actually travelled (Anderson et al. 2018).
- nDTW: exp(-DTW(R, Q) / (|R| * d_th)), R the reference path, Q the agent's positions (consecutive
  duplicates dropped, as VLN-CE records them), DTW with point distance d (VLN-CE: Euclidean), d_th = 3 m
  (Ilharco et al. 2019, "General Evaluation for Instruction Conditioned Navigation using Dynamic Time
  Warping").
- SDTW: S * nDTW (same paper).
- PL: trajectory length in metres.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

SUCCESS_DISTANCE = 3.0
METRIC_KEYS = ("NE", "OS", "SR", "SPL", "nDTW", "SDTW", "PL")

Distance = Callable[[np.ndarray, np.ndarray], float]


def euclidean(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def path_length(points: Sequence) -> float:
    """Sum of segment lengths (m) of a polyline of points."""
    p = np.asarray(points, float)
    if len(p) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())


def dedup(points: Sequence) -> list[np.ndarray]:
    """Drop consecutive repeated positions (turns and blocked moves do not add DTW points)."""
    out: list[np.ndarray] = []
    for p in points:
        p = np.asarray(p, float)
        if not out or not np.allclose(out[-1], p, atol=1e-6):
            out.append(p)
    return out


def dtw(reference: Sequence, query: Sequence, distance: Distance = euclidean) -> float:
    """Dynamic time warping cost between two point sequences (Ilharco et al. 2019, eq. 1)."""
    r, q = len(reference), len(query)
    if r == 0 or q == 0:
        raise ValueError("dtw needs two non-empty paths")
    if distance is euclidean:
        ra, qa = np.asarray(reference, float), np.asarray(query, float)
        cost = np.linalg.norm(ra[:, None, :] - qa[None, :, :], axis=-1)  # (|R|, |Q|)
    else:
        cost = np.array([[distance(a, b) for b in query] for a in reference])  # (|R|, |Q|)
    d = np.full((r + 1, q + 1), math.inf)
    d[0, 0] = 0.0
    for i in range(1, r + 1):
        row_prev, row = d[i - 1], d[i]
        for j in range(1, q + 1):
            row[j] = cost[i - 1, j - 1] + min(row_prev[j - 1], row_prev[j], row[j - 1])
    return float(d[r, q])


def ndtw(reference: Sequence, query: Sequence, d_th: float = SUCCESS_DISTANCE, distance: Distance = euclidean) -> float:
    """Normalised DTW in (0, 1]: exp(-DTW(R, Q) / (|R| * d_th))."""
    return math.exp(-dtw(reference, query, distance) / (len(reference) * d_th))


def spl(success: bool, shortest: float, travelled: float) -> float:
    """Success weighted by path length: S * l / max(p, l)."""
    if not success:
        return 0.0
    denom = max(travelled, shortest)
    return 1.0 if denom <= 0 else shortest / denom


def episode_metrics(
    positions: Sequence,
    goal,
    shortest: float,
    reference: Sequence,
    called_stop: bool,
    distance_to_goal: Callable[[np.ndarray], float] | None = None,
    success_distance: float = SUCCESS_DISTANCE,
    dtw_distance: Distance = euclidean,
) -> dict[str, float]:
    """All metrics of one episode.

    positions: every position the agent occupied, starting with the start position.
    goal: the goal position; shortest: geodesic start-goal distance l.
    reference: the reference path R for nDTW (VLN-CE: the `_gt` file's `locations`).
    distance_to_goal: geodesic distance from a point to the goal (default Euclidean, a lower bound).
    """
    pos = [np.asarray(p, float) for p in positions]
    if not pos:
        raise ValueError("episode_metrics needs at least the start position")
    goal = np.asarray(goal, float)
    dist = distance_to_goal or (lambda p: euclidean(p, goal))
    ne = float(dist(pos[-1]))
    success = bool(called_stop and ne < success_distance)
    # geodesic >= Euclidean, so only points within success_distance in a straight line can qualify
    oracle = ne < success_distance or any(
        euclidean(p, goal) < success_distance and dist(p) < success_distance for p in pos)
    travelled = path_length(pos)
    query = dedup(pos)
    ref = [np.asarray(p, float) for p in reference] or [goal]
    nd = ndtw(ref, query, success_distance, dtw_distance)
    return {"NE": ne, "OS": float(oracle), "SR": float(success), "SPL": spl(success, shortest, travelled),
            "nDTW": nd, "SDTW": nd if success else 0.0, "PL": travelled}


def summarize(results: Sequence[dict]) -> dict[str, float]:
    """Mean of each metric over episodes (the numbers VLN papers report), plus counts."""
    out: dict[str, float] = {"episodes": len(results)}
    for k in METRIC_KEYS:
        vals = [float(r[k]) for r in results if k in r]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    out["steps"] = float(np.mean([r.get("steps", 0) for r in results])) if results else float("nan")
    out["unparseable"] = int(sum(int(r.get("unparseable", 0)) for r in results))
    return out
