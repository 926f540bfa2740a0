"""Procedurally generated multi-room indoor scenes for the embedded simulator.

A scene is a grid of rooms (living room, kitchen, bedroom, ...) separated by walls with doorways,
furnished with coloured, named pieces ("red sofa", "blue bookshelf") and small objects on top of them.
Everything is an axis-aligned box, which keeps collision (sliding along walls) exact and lets one
description drive three consumers:

- the occupancy grid of free floor (`Scene.occupancy`) that the planner and the simulator use;
- MuJoCo MJCF (`Scene.to_mjcf`) for rendering in the default simulator;
- a binary glTF (`Scene.export_glb`) so the same episodes run on habitat-sim.

Coordinates follow habitat / VLN-CE: y is up, the floor is the plane y = 0, positions are (x, y, z).
Generation is deterministic in the seed (numpy PCG64), so a scene can be regenerated from its id;
it is also saved as JSON next to its .glb/.xml so a dataset does not depend on the generator version.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WALL_HEIGHT = 2.6
WALL_THICK = 0.12
DOOR_WIDTH = 1.0
DOOR_HEIGHT = 2.1
RESOLUTION = 0.05  # occupancy grid cell (m)
AGENT_RADIUS = 0.18  # VLN-CE agent radius (habitat AgentConfiguration default is 0.1; VLN-CE configs use 0.1-0.18)
SCENE_PREFIX = "omnistream"
MIN_GAP = 0.9  # gaps between furniture, or furniture and walls: none or at least this wide (m)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.12, 0.12), "green": (0.15, 0.60, 0.20), "blue": (0.15, 0.30, 0.80),
    "yellow": (0.92, 0.82, 0.15), "orange": (0.95, 0.50, 0.10), "purple": (0.50, 0.20, 0.65),
    "white": (0.93, 0.93, 0.93), "black": (0.10, 0.10, 0.10), "brown": (0.45, 0.28, 0.12),
    "grey": (0.50, 0.50, 0.50), "pink": (0.95, 0.55, 0.70), "teal": (0.10, 0.55, 0.55),
}

# room type -> furniture (name, width along the wall, depth, height, against_wall)
FURNITURE: dict[str, list[tuple[str, float, float, float, bool]]] = {
    "living room": [("sofa", 2.0, 0.9, 0.8, True), ("armchair", 0.9, 0.9, 0.9, True),
                    ("coffee table", 1.0, 0.6, 0.45, False), ("tv stand", 1.6, 0.45, 0.6, True),
                    ("bookshelf", 1.0, 0.4, 1.8, True), ("plant", 0.5, 0.5, 1.2, True)],
    "kitchen": [("counter", 2.0, 0.6, 0.9, True), ("fridge", 0.8, 0.7, 1.8, True),
                ("dining table", 1.6, 0.9, 0.75, False), ("stove", 0.7, 0.6, 0.9, True)],
    "bedroom": [("bed", 1.6, 2.0, 0.6, True), ("wardrobe", 1.2, 0.6, 2.0, True),
                ("nightstand", 0.5, 0.4, 0.55, True), ("desk", 1.2, 0.6, 0.75, True)],
    "bathroom": [("bathtub", 1.7, 0.8, 0.6, True), ("sink", 0.6, 0.5, 0.9, True), ("toilet", 0.5, 0.7, 0.8, True)],
    "office": [("desk", 1.4, 0.7, 0.75, True), ("office chair", 0.6, 0.6, 1.0, False),
               ("bookshelf", 1.0, 0.4, 1.8, True), ("filing cabinet", 0.5, 0.6, 1.3, True)],
    "dining room": [("dining table", 1.8, 1.0, 0.75, False), ("cabinet", 1.2, 0.5, 1.0, True),
                    ("plant", 0.5, 0.5, 1.2, True)],
}
SMALL_OBJECTS = ["vase", "lamp", "laptop", "bowl", "book", "clock"]
FLOOR_COLOURS = [(0.72, 0.60, 0.45), (0.62, 0.62, 0.58), (0.55, 0.42, 0.30), (0.75, 0.72, 0.66), (0.50, 0.55, 0.60)]


@dataclass
class Box:
    """An axis-aligned box: `center` (x, y, z) and `half` extents in metres, y up."""

    name: str  # "red sofa", "wall", "door to the kitchen"
    kind: str  # wall | furniture | object | door | floor | ceiling
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    rgba: tuple[float, float, float, float]
    room: str = ""
    blocking: bool = True  # an obstacle on the floor (walls, furniture); lintels, floors, objects on top are not


@dataclass
class Room:
    name: str  # unique in the scene: "kitchen", "bedroom 2"
    x0: float
    z0: float
    x1: float
    z1: float

    def contains(self, x: float, z: float) -> bool:
        return self.x0 <= x <= self.x1 and self.z0 <= z <= self.z1

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.z0 + self.z1) / 2


@dataclass
class Door:
    """A doorway in a wall: `x, z` its centre, `axis` the wall direction ("x": wall runs along x)."""

    x: float
    z: float
    axis: str
    rooms: tuple[str, str]
    width: float = DOOR_WIDTH


@dataclass
class Scene:
    scene_id: str
    seed: int
    rooms: list[Room]
    doors: list[Door]
    boxes: list[Box]
    bounds: tuple[float, float, float, float]  # x0, z0, x1, z1 of the outer walls' outer faces
    resolution: float = RESOLUTION
    agent_radius: float = AGENT_RADIUS
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- queries -------------------------------------------------------------------------------------------
    def room_at(self, x: float, z: float) -> str:
        for r in self.rooms:
            if r.contains(x, z):
                return r.name
        return ""

    @property
    def furniture(self) -> list[Box]:
        return [b for b in self.boxes if b.kind == "furniture"]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows along z, columns along x) of the occupancy grid."""
        x0, z0, x1, z1 = self.bounds
        return int(np.ceil((z1 - z0) / self.resolution)), int(np.ceil((x1 - x0) / self.resolution))

    def to_cell(self, x, z) -> tuple[np.ndarray, np.ndarray]:
        """World (x, z) -> grid (row, col), unclipped integer arrays."""
        x0, z0, _, _ = self.bounds
        return (np.floor((np.asarray(z) - z0) / self.resolution).astype(int),
                np.floor((np.asarray(x) - x0) / self.resolution).astype(int))

    def cell_center(self, row, col) -> tuple[np.ndarray, np.ndarray]:
        """Grid (row, col) -> world (x, z) of the cell centre."""
        x0, z0, _, _ = self.bounds
        return x0 + (np.asarray(col) + 0.5) * self.resolution, z0 + (np.asarray(row) + 0.5) * self.resolution

    def occupancy(self) -> np.ndarray:
        """(rows, cols) bool, True where the floor is free of walls and furniture (not inflated)."""
        if "occ" not in self._cache:
            rows, cols = self.grid_shape
            free = np.zeros((rows, cols), bool)
            for r in self.rooms:  # floors inside the rooms are free ...
                self._paint(free, r.x0, r.z0, r.x1, r.z1, True)
            for d in self.doors:  # ... and so are the doorways
                hw, ht = d.width / 2, WALL_THICK
                if d.axis == "x":
                    self._paint(free, d.x - hw, d.z - ht, d.x + hw, d.z + ht, True)
                else:
                    self._paint(free, d.x - ht, d.z - hw, d.x + ht, d.z + hw, True)
            for b in self.boxes:  # ... except under obstacles
                if b.blocking:
                    self._paint(free, b.center[0] - b.half[0], b.center[2] - b.half[2],
                                b.center[0] + b.half[0], b.center[2] + b.half[2], False)
            self._cache["occ"] = free
        return self._cache["occ"]

    def navigable(self) -> np.ndarray:
        """(rows, cols) bool: cells where the agent's centre may be (free space eroded by the agent radius)."""
        if "nav" not in self._cache:
            self._cache["nav"] = self.clearance() > self.agent_radius
        return self._cache["nav"]

    def clearance(self) -> np.ndarray:
        """(rows, cols) metres from each cell's centre to the nearest obstacle (0 on obstacles).

        The distance to the nearest blocked cell's centre less half a cell, i.e. to that cell's edge, so
        the navigable boundary sits at (obstacle face + radius) to within the grid's rounding.
        """
        if "clear" not in self._cache:
            from scipy import ndimage

            edt = ndimage.distance_transform_edt(self.occupancy()) * self.resolution
            self._cache["clear"] = np.maximum(edt - self.resolution / 2, 0.0)
        return self._cache["clear"]

    def is_navigable(self, x: float, z: float) -> bool:
        r, c = self.to_cell(x, z)
        nav = self.navigable()
        return bool(0 <= r < nav.shape[0] and 0 <= c < nav.shape[1] and nav[r, c])

    def _paint(self, grid: np.ndarray, xa: float, za: float, xb: float, zb: float, value: bool) -> None:
        x0, z0, _, _ = self.bounds
        res = self.resolution
        # cells whose centre lies inside the rectangle
        c0, c1 = int(np.ceil((xa - x0) / res - 0.5)), int(np.floor((xb - x0) / res - 0.5))
        r0, r1 = int(np.ceil((za - z0) / res - 0.5)), int(np.floor((zb - z0) / res - 0.5))
        grid[max(r0, 0): max(r1 + 1, 0), max(c0, 0): max(c1 + 1, 0)] = value

    # ---- export --------------------------------------------------------------------------------------------
    def to_mjcf(self, width: int = 640, height: int = 480) -> str:
        """MuJoCo MJCF: every box as a static geom, one camera `agent` posed by the simulator.

        MuJoCo is z-up, so habitat (x, y, z) maps to MuJoCo (x, -z, y) (the glTF y-up <-> z-up convention).
        """
        lines = [f'<mujoco model="{self.scene_id}">',
                 (f'  <visual><global offwidth="{max(width, 640)}" offheight="{max(height, 480)}"/>'
                  '<headlight ambient="0.45 0.45 0.45" diffuse="0.35 0.35 0.35" specular="0 0 0"/>'
                  '<quality shadowsize="0"/></visual>'),
                 "  <worldbody>"]
        for i, r in enumerate(self.rooms):
            cx, cz = r.center
            lines.append(f'    <light name="light{i}" pos="{cx:.3f} {-cz:.3f} {WALL_HEIGHT - 0.1:.3f}" dir="0 0 -1" '
                         'directional="false" castshadow="false" diffuse="0.35 0.35 0.35" attenuation="1 0 0"/>')
        for i, b in enumerate(self.boxes):
            (x, y, z), (hx, hy, hz) = b.center, b.half
            rgba = " ".join(f"{v:.3f}" for v in b.rgba)
            name = re.sub(r"[^A-Za-z0-9_]+", "_", f"{b.kind}{i}_{b.name}")
            lines.append(f'    <geom name="{name}" type="box" pos="{x:.4f} {-z:.4f} {y:.4f}" '
                         f'size="{hx:.4f} {hz:.4f} {hy:.4f}" rgba="{rgba}" contype="0" conaffinity="0"/>')
        lines.append('    <camera name="agent" pos="0 0 1.25" xyaxes="1 0 0 0 0 1" fovy="60"/>')
        lines += ["  </worldbody>", "</mujoco>"]
        return "\n".join(lines) + "\n"

    def export_glb(self, path: str | Path) -> Path:
        """Binary glTF of the scene (y up, metres), loadable by habitat-sim as a stage."""
        import trimesh

        meshes = []
        for b in self.boxes:
            m = trimesh.creation.box(extents=[2 * h for h in b.half])
            m.apply_translation(b.center)
            m.visual.face_colors = np.tile((np.asarray(b.rgba) * 255).astype(np.uint8), (len(m.faces), 1))
            meshes.append(m)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        trimesh.util.concatenate(meshes).export(path, file_type="glb")
        return path

    def to_dict(self) -> dict:
        return {"scene_id": self.scene_id, "seed": self.seed, "bounds": list(self.bounds),
                "resolution": self.resolution, "agent_radius": self.agent_radius,
                "rooms": [asdict(r) for r in self.rooms], "doors": [asdict(d) for d in self.doors],
                "boxes": [asdict(b) for b in self.boxes]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(scene_id=d["scene_id"], seed=int(d["seed"]), bounds=tuple(d["bounds"]),
                   resolution=float(d["resolution"]), agent_radius=float(d["agent_radius"]),
                   rooms=[Room(**r) for r in d["rooms"]],
                   doors=[Door(**{**x, "rooms": tuple(x["rooms"])}) for x in d["doors"]],
                   boxes=[Box(**{**b, "center": tuple(b["center"]), "half": tuple(b["half"]),
                                 "rgba": tuple(b["rgba"])}) for b in d["boxes"]])

    def save(self, scenes_dir: str | Path, glb: bool = True) -> Path:
        """Write <scenes_dir>/<scene_id> (.glb) with .json and .xml siblings; returns the .glb path."""
        glb_path = Path(scenes_dir) / self.scene_id
        glb_path.parent.mkdir(parents=True, exist_ok=True)
        glb_path.with_suffix(".json").write_text(json.dumps(self.to_dict()))
        glb_path.with_suffix(".xml").write_text(self.to_mjcf())
        if glb:
            self.export_glb(glb_path)
        return glb_path


def scene_id_for(seed: int) -> str:
    """VLN-CE style scene id (a path relative to the scenes directory)."""
    return f"{SCENE_PREFIX}/scene_{seed:04d}/scene_{seed:04d}.glb"


def load_scene(scene_id: str, scenes_dir: str | Path | None = None) -> Scene:
    """The scene saved under `scenes_dir`, or regenerated from the seed in its id."""
    if scenes_dir is not None:
        js = (Path(scenes_dir) / scene_id).with_suffix(".json")
        if js.exists():
            try:
                return Scene.from_dict(json.loads(js.read_text()))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"scene file {js} is malformed: {e}") from e
    m = re.search(r"scene_(\d+)", scene_id)
    if not scene_id.startswith(SCENE_PREFIX + "/") or m is None:
        where = f" under {scenes_dir}" if scenes_dir else ""
        raise FileNotFoundError(f"scene {scene_id!r} is not a generated omnistream scene and has no JSON{where}")
    return generate_scene(int(m.group(1)))


# ---- generation ------------------------------------------------------------------------------------------------
def generate_scene(seed: int, max_rooms: int = 6) -> Scene:
    """A connected multi-room apartment: a rows x cols grid of rooms, doors on a spanning tree (+ extras)."""
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 3))
    cols = int(rng.integers(2, 4)) if rows == 1 else int(rng.integers(2, max(3, max_rooms // 2 + 1)))
    widths = rng.uniform(3.6, 5.2, cols)
    depths = rng.uniform(3.6, 5.0, rows)
    xs = np.concatenate([[0.0], np.cumsum(widths)])
    zs = np.concatenate([[0.0], np.cumsum(depths)])
    types = list(FURNITURE)
    order = rng.permutation(len(types))
    rooms: list[Room] = []
    seen: dict[str, int] = {}
    for r in range(rows):
        for c in range(cols):
            t = types[order[(r * cols + c) % len(types)]]
            seen[t] = seen.get(t, 0) + 1
            name = t if seen[t] == 1 else f"{t} {seen[t]}"
            rooms.append(Room(name, float(xs[c]), float(zs[r]), float(xs[c + 1]), float(zs[r + 1])))

    # doors: a random spanning tree over the room grid, plus extra doors for loops
    edges = [((r, c), (r, c + 1)) for r in range(rows) for c in range(cols - 1)]
    edges += [((r, c), (r + 1, c)) for r in range(rows - 1) for c in range(cols)]
    edges = [edges[i] for i in rng.permutation(len(edges))]
    parent = {(r, c): (r, c) for r in range(rows) for c in range(cols)}

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    chosen = []
    for a, b in edges:
        if find(a) != find(b):
            parent[find(a)] = find(b)
            chosen.append((a, b))
        elif rng.random() < 0.3:
            chosen.append((a, b))

    def room_of(rc):
        return rooms[rc[0] * cols + rc[1]]

    doors: list[Door] = []
    for a, b in chosen:
        ra, rb = room_of(a), room_of(b)
        if a[0] == b[0]:  # side by side: wall along z at x = ra.x1
            z = float(rng.uniform(ra.z0 + 0.9, ra.z1 - 0.9))
            doors.append(Door(ra.x1, z, "z", (ra.name, rb.name)))
        else:  # stacked: wall along x at z = ra.z1
            x = float(rng.uniform(ra.x0 + 0.9, ra.x1 - 0.9))
            doors.append(Door(x, ra.z1, "x", (ra.name, rb.name)))

    t = WALL_THICK / 2
    bounds = (-t, -t, float(xs[-1]) + t, float(zs[-1]) + t)
    boxes: list[Box] = []
    wall_rgba = (0.86, 0.84, 0.80, 1.0)
    # floors and ceiling (non-blocking, for rendering)
    for i, r in enumerate(rooms):
        fc = FLOOR_COLOURS[(seed + i) % len(FLOOR_COLOURS)]
        boxes.append(Box("floor", "floor", ((r.x0 + r.x1) / 2, -0.025, (r.z0 + r.z1) / 2),
                         ((r.x1 - r.x0) / 2 + t, 0.025, (r.z1 - r.z0) / 2 + t), (*fc, 1.0), r.name, False))
    cx, cz = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
    boxes.append(Box("ceiling", "ceiling", (cx, WALL_HEIGHT + 0.025, cz),
                     ((bounds[2] - bounds[0]) / 2, 0.025, (bounds[3] - bounds[1]) / 2), (0.95, 0.95, 0.95, 1.0), "", False))

    # walls: every grid line, split around the doors on it
    def wall_line(axis: str, fixed: float, lo: float, hi: float) -> None:
        gaps = sorted((d.x if axis == "x" else d.z) for d in doors
                      if d.axis == axis and abs((d.z if axis == "x" else d.x) - fixed) < 1e-6
                      and lo < (d.x if axis == "x" else d.z) < hi)
        cuts = [lo - t]
        for g in gaps:
            cuts += [g - DOOR_WIDTH / 2, g + DOOR_WIDTH / 2]
        cuts.append(hi + t)
        for a, b in zip(cuts[0::2], cuts[1::2]):
            if b - a > 1e-3:
                c = ((a + b) / 2, WALL_HEIGHT / 2, fixed) if axis == "x" else (fixed, WALL_HEIGHT / 2, (a + b) / 2)
                h = ((b - a) / 2, WALL_HEIGHT / 2, t) if axis == "x" else (t, WALL_HEIGHT / 2, (b - a) / 2)
                boxes.append(Box("wall", "wall", c, h, wall_rgba))
        for g in gaps:  # lintel above each doorway, a dark frame that reads as "door" on camera
            c = (g, (DOOR_HEIGHT + WALL_HEIGHT) / 2, fixed) if axis == "x" else (fixed, (DOOR_HEIGHT + WALL_HEIGHT) / 2, g)
            h = ((DOOR_WIDTH / 2, (WALL_HEIGHT - DOOR_HEIGHT) / 2, t + 0.01) if axis == "x"
                 else (t + 0.01, (WALL_HEIGHT - DOOR_HEIGHT) / 2, DOOR_WIDTH / 2))
            boxes.append(Box("door", "door", c, h, (0.35, 0.22, 0.10, 1.0), blocking=False))

    for z in zs:
        wall_line("x", float(z), float(xs[0]), float(xs[-1]))
    for x in xs:
        wall_line("z", float(x), float(zs[0]), float(zs[-1]))

    scene = Scene(scene_id_for(seed), seed, rooms, doors, boxes, bounds)
    _furnish(scene, rng)
    return scene


def _door_clearances(scene: Scene) -> list[tuple[float, float, float, float]]:
    """Rectangles on both sides of each doorway that furniture must leave free."""
    out = []
    for d in scene.doors:
        w, depth = d.width / 2 + 0.25, 1.1
        if d.axis == "x":
            out.append((d.x - w, d.z - depth, d.x + w, d.z + depth))
        else:
            out.append((d.x - depth, d.z - w, d.x + depth, d.z + w))
    return out


def _overlaps(a, b, margin: float = 0.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _connected(scene: Scene) -> bool:
    """All doorways and room centres' free space lie in one navigable component."""
    from scipy import ndimage

    scene._cache.clear()
    labels, n = ndimage.label(scene.navigable())
    if n == 0:
        return False
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    main = int(np.argmax(sizes))
    for d in scene.doors:
        r, c = scene.to_cell(d.x, d.z)
        if labels[r, c] != main:
            return False
    for room in scene.rooms:  # each room keeps most of its floor reachable
        r0, c0 = scene.to_cell(room.x0, room.z0)
        r1, c1 = scene.to_cell(room.x1, room.z1)
        sub = labels[r0:r1, c0:c1]
        nav = scene.navigable()[r0:r1, c0:c1]
        if nav.sum() == 0 or (sub == main).sum() < 0.9 * nav.sum():
            return False
    return True


def _no_narrow_gap(c: float, h: float, lo: float, hi: float) -> float:
    """Centre c of a piece of half-width h between walls lo..hi, pushed into a corner if it would leave a
    gap narrower than MIN_GAP (a slot the agent barely fits through makes a poor, wedge-prone passage)."""
    if c - h - lo < MIN_GAP:
        return lo + h
    if hi - (c + h) < MIN_GAP:
        return hi - h
    return c


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float | None:
    return float(rng.uniform(lo, hi)) if hi >= lo else None


def _furnish(scene: Scene, rng: np.random.Generator) -> None:
    clear = _door_clearances(scene)
    used_names: set[str] = set()
    placed: list[tuple[float, float, float, float]] = []
    for room in scene.rooms:
        kind = re.sub(r" \d+$", "", room.name)
        items = FURNITURE[kind]
        n = int(rng.integers(2, len(items) + 1))
        for idx in rng.permutation(len(items))[:n]:
            fname, w, dp, h, wall = items[idx]
            for _attempt in range(12):
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                name = f"{colour} {fname}"
                if name in used_names:
                    continue
                m = WALL_THICK / 2 + 0.02
                if wall:
                    side = int(rng.integers(4))  # 0: z0 wall, 1: z1 wall, 2: x0 wall, 3: x1 wall
                    along_x = side < 2
                    hx, hz = (w / 2, dp / 2) if along_x else (dp / 2, w / 2)
                    if along_x:
                        x = _uniform(rng, room.x0 + m + hx, room.x1 - m - hx)
                        z = room.z0 + m + hz if side == 0 else room.z1 - m - hz
                    else:
                        z = _uniform(rng, room.z0 + m + hz, room.z1 - m - hz)
                        x = room.x0 + m + hx if side == 2 else room.x1 - m - hx
                else:
                    hx, hz = (w / 2, dp / 2) if rng.random() < 0.5 else (dp / 2, w / 2)
                    x = _uniform(rng, room.x0 + 1.0 + hx, room.x1 - 1.0 - hx)
                    z = _uniform(rng, room.z0 + 1.0 + hz, room.z1 - 1.0 - hz)
                if x is None or z is None:  # does not fit this room this way
                    continue
                if wall:  # a gap to the side wall is either none or wide enough to walk through comfortably
                    if along_x:
                        x = _no_narrow_gap(x, hx, room.x0 + m, room.x1 - m)
                    else:
                        z = _no_narrow_gap(z, hz, room.z0 + m, room.z1 - m)
                rect = (x - hx, z - hz, x + hx, z + hz)
                if any(_overlaps(rect, c) for c in clear) or any(_overlaps(rect, p, MIN_GAP) for p in placed):
                    continue
                box = Box(name, "furniture", (x, h / 2, z), (hx, h / 2, hz), (*COLOURS[colour], 1.0), room.name)
                scene.boxes.append(box)
                if not _connected(scene):
                    scene.boxes.pop()
                    scene._cache.clear()
                    continue
                used_names.add(name)
                placed.append(rect)
                if fname not in ("plant", "armchair", "office chair", "toilet") and rng.random() < 0.5:
                    obj = SMALL_OBJECTS[int(rng.integers(len(SMALL_OBJECTS)))]
                    oc = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                    s = 0.12
                    scene.boxes.append(Box(f"{oc} {obj}", "object", (x, h + s, z), (s, s, s),
                                           (*COLOURS[oc], 1.0), room.name, blocking=False))
                break
    scene._cache.clear()
