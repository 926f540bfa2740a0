"""Geodesic distances and shortest paths over a scene's navigable floor.

The navigable grid (free floor eroded by the agent radius) becomes an 8-connected graph (diagonal moves
only where both orthogonal neighbours are free, so paths never cut wall corners). Dijkstra from the goal
(scipy, cached per goal cell) gives a grid path from any cell; that path is then string-pulled (each
vertex joined to the farthest later vertex in straight-line sight), which removes the 8-direction
zig-zag, so path lengths approximate the true Euclidean geodesic (the taut string), as habitat's navmesh
`geodesic_distance` does, instead of the up-to-8 % longer octile distance.

Positions are habitat 3-D points (x, y, z), y up; the planner works in the floor plane (x, z).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from omnistream.navigation.scenes import Scene

_NEIGHBOURS = ((-1, 0, 1.0), (1, 0, 1.0), (0, -1, 1.0), (0, 1, 1.0),
               (-1, -1, math.sqrt(2)), (-1, 1, math.sqrt(2)), (1, -1, math.sqrt(2)), (1, 1, math.sqrt(2)))


class Planner:
    """Shortest paths on one scene; geodesic distances in metres.

    `shortest_path(a, b)` is the true shortest path (the geodesic distance, as metrics need it).
    `shortest_path(a, b, comfort=True)` is the path a follower should drive: it keeps `margin` metres
    more than the agent radius from obstacles wherever it can (cells closer than that cost `penalty`
    times more, and string-pulling keeps to comfortable cells), so a 15-degree-turning agent does not
    graze corners or thread slots it only just fits through.
    """

    def __init__(self, scene: Scene, margin: float = 0.1, penalty: float = 10.0) -> None:
        from scipy import ndimage, sparse

        self.scene = scene
        self.nav = scene.navigable()  # (rows, cols) bool
        self.comfort = scene.clearance() > scene.agent_radius + margin  # (rows, cols) bool, subset of nav
        rows, cols = self.nav.shape
        self.shape = (rows, cols)
        idx = np.arange(rows * cols).reshape(rows, cols)
        src, dst, w, wc = [], [], [], []
        flat_comfort = self.comfort.ravel()
        for dr, dc, cost in _NEIGHBOURS:
            a = self.nav[max(0, -dr): rows - max(0, dr), max(0, -dc): cols - max(0, dc)]
            b = self.nav[max(0, dr): rows - max(0, -dr) or None, max(0, dc): cols - max(0, -dc) or None]
            ok = a & b
            if dr and dc:  # no corner cutting: both orthogonal cells must be free too
                o1 = self.nav[max(0, dr): rows - max(0, -dr) or None, max(0, -dc): cols - max(0, dc)]
                o2 = self.nav[max(0, -dr): rows - max(0, dr), max(0, dc): cols - max(0, -dc) or None]
                ok = ok & o1 & o2
            ia = idx[max(0, -dr): rows - max(0, dr), max(0, -dc): cols - max(0, dc)][ok]
            ib = idx[max(0, dr): rows - max(0, -dr) or None, max(0, dc): cols - max(0, -dc) or None][ok]
            src.append(ia)
            dst.append(ib)
            w.append(np.full(ia.shape, cost * scene.resolution))
            tight = ~(flat_comfort[ia] & flat_comfort[ib])
            wc.append(w[-1] * np.where(tight, penalty, 1.0))
        src, dst = np.concatenate(src), np.concatenate(dst)
        n = rows * cols
        self.graph = sparse.csr_matrix((np.concatenate(w), (src, dst)), shape=(n, n))
        self.comfort_graph = sparse.csr_matrix((np.concatenate(wc), (src, dst)), shape=(n, n))
        # nearest navigable cell of every cell (positions a hair outside the free space snap back in)
        _, (self._near_r, self._near_c) = ndimage.distance_transform_edt(~self.nav, return_indices=True)
        self._fields = lru_cache(maxsize=16)(self._field)

    # ---- cells ---------------------------------------------------------------------------------------------
    def snap(self, p) -> tuple[int, int]:
        """(row, col) of the navigable cell nearest to world point p (x, y, z)."""
        r, c = self.scene.to_cell(p[0], p[2])
        r = int(np.clip(r, 0, self.shape[0] - 1))
        c = int(np.clip(c, 0, self.shape[1] - 1))
        return int(self._near_r[r, c]), int(self._near_c[r, c])

    def _field(self, goal_cell: tuple[int, int], comfort: bool) -> tuple[np.ndarray, np.ndarray]:
        from scipy.sparse.csgraph import dijkstra

        node = goal_cell[0] * self.shape[1] + goal_cell[1]
        graph = self.comfort_graph if comfort else self.graph
        dist, pred = dijkstra(graph, directed=False, indices=node, return_predecessors=True)
        return dist, pred  # (rows*cols,) metres along the grid, predecessor toward the goal

    def line_of_sight(self, a, b) -> bool:
        """True if the straight segment a -> b (floor points (x, z)) stays in navigable cells."""
        n = max(2, int(math.hypot(b[0] - a[0], b[1] - a[1]) / (self.scene.resolution * 0.5)) + 2)
        t = np.linspace(0.0, 1.0, n)
        r, c = self.scene.to_cell(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)
        if (r < 0).any() or (c < 0).any() or (r >= self.shape[0]).any() or (c >= self.shape[1]).any():
            return False
        return bool(self.nav[r, c].all())

    def _visible(self, a: np.ndarray, cands: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(m,) bool: line_of_sight(a, c) for each row c of cands (m, 2) through `mask` (default: navigable)."""
        mask = self.nav if mask is None else mask
        length = float(np.max(np.hypot(cands[:, 0] - a[0], cands[:, 1] - a[1])))
        t = np.linspace(0.0, 1.0, max(2, int(length / (self.scene.resolution * 0.5)) + 2))  # (K,)
        samples = a[None, None, :] + (cands - a)[:, None, :] * t[None, :, None]  # (m, K, 2)
        r, c = self.scene.to_cell(samples[..., 0], samples[..., 1])
        inside = (r >= 0) & (c >= 0) & (r < self.shape[0]) & (c < self.shape[1])
        ok = np.zeros(r.shape, bool)
        ok[inside] = mask[r[inside], c[inside]]
        return ok.all(axis=1)

    # ---- paths ---------------------------------------------------------------------------------------------
    def shortest_path(self, start, goal, comfort: bool = False) -> list[np.ndarray] | None:
        """Waypoints (x, y, z) from start to goal (both included, snapped into free space if they are not),
        string-pulled; None if unreachable. comfort=True: the follower's path (see the class docstring)."""
        start = np.asarray(start, float)
        goal = np.asarray(goal, float)
        gcell = self.snap(goal)
        scell = self.snap(start)
        dist, pred = self._fields(gcell, comfort)
        cols = self.shape[1]
        node = scell[0] * cols + scell[1]
        if not np.isfinite(dist[node]):
            return None
        cells = [node]
        while cells[-1] != gcell[0] * cols + gcell[1]:
            cells.append(int(pred[cells[-1]]))
        xs, zs = self.scene.cell_center(np.array(cells) // cols, np.array(cells) % cols)
        pts = list(zip(xs.tolist(), zs.tolist()))
        if len(pts) == 1:  # same cell: a path of one segment inside it
            pts.append(pts[0])
        # endpoints: the points themselves where navigable, else their snapped cells (as habitat's navmesh
        # snaps requested_start/requested_end)
        if self.scene.is_navigable(start[0], start[2]):
            pts[0] = (float(start[0]), float(start[2]))
        if self.scene.is_navigable(goal[0], goal[2]):
            pts[-1] = (float(goal[0]), float(goal[2]))
        pts = np.asarray(pts)  # (n, 2)
        mask = None
        if comfort:  # pull taut only through comfortable cells, plus the tight cells the grid path needs
            mask = self.comfort.copy()
            mask[np.array(cells) // cols, np.array(cells) % cols] = True
        pulled = [pts[0]]
        i = 0
        while i < len(pts) - 1:  # from each anchor, jump to the last of the run of visible later vertices
            vis = self._visible(pts[i], pts[i + 1:], mask)
            k = len(vis) if vis.all() else int(np.argmin(vis))  # first vertex out of sight
            i += max(k, 1)
            pulled.append(pts[i])
        y = float(start[1])
        return [np.array([float(x), y, float(z)]) for x, z in pulled]

    def geodesic_distance(self, a, b) -> float:
        """Length (m) of the shortest path a -> b in the floor plane; inf if unreachable."""
        path = self.shortest_path(a, b)
        if path is None:
            return math.inf
        return path_length(path)

    def follower_path(self, start, goal) -> list[np.ndarray] | None:
        """The path a shortest-path follower should drive (comfortable clearance where possible)."""
        return self.shortest_path(start, goal, comfort=True)

    def next_waypoint(self, pos, goal, min_dist: float = 0.1) -> np.ndarray | None:
        """First waypoint of the follower path farther than `min_dist` from pos (None if unreachable)."""
        path = self.follower_path(pos, goal)
        if path is None:
            return None
        for p in path[1:]:
            if math.hypot(p[0] - pos[0], p[2] - pos[2]) > min_dist:
                return p
        return path[-1]

    def random_navigable_point(self, rng: np.random.Generator, room: str | None = None) -> np.ndarray:
        """A uniformly drawn navigable cell centre (optionally inside one room), at floor height."""
        r, c = np.nonzero(self.nav)
        xs, zs = self.scene.cell_center(r, c)
        if room is not None:
            rm = next(x for x in self.scene.rooms if x.name == room)
            keep = (xs >= rm.x0) & (xs <= rm.x1) & (zs >= rm.z0) & (zs <= rm.z1)
            xs, zs = xs[keep], zs[keep]
        i = int(rng.integers(len(xs)))
        return np.array([float(xs[i]), 0.0, float(zs[i])])


def path_length(points) -> float:
    """Sum of segment lengths of a polyline of 3-D points (metres)."""
    p = np.asarray(points, float).reshape(-1, 3)
    if len(p) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())
