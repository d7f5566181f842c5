"""Procedural indoor scenes: multi-room floor plans joined by doorways, furnished by room type, deterministic by seed.

World frame per docs/geometry.md: metres, gravity along +y, so the floor is the plane y = 0, the ceiling y = -height.
Rooms are axis-aligned rectangles in (x, z) that tile the footprint; walls are their borders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffpano.data.procedural import furniture
from diffpano.data.procedural.materials import FLOORS, WALL_COLOURS

ROOM_TYPES = ("bedroom", "living room", "kitchen", "bathroom", "office", "hallway")
FLOOR_CHOICES = {
    "bedroom": ("wood", "carpet", "beige carpet", "dark wood"),
    "living room": ("wood", "dark wood", "beige carpet", "stone"),
    "kitchen": ("tile", "gray tile", "stone", "wood"),
    "bathroom": ("tile", "gray tile", "stone"),
    "office": ("wood", "carpet", "dark wood"),
    "hallway": ("wood", "stone", "gray tile", "dark wood"),
}
DOOR_HEIGHT = 2.1
DOOR_WIDTH = (0.9, 1.3)
WINDOW_SILL, WINDOW_TOP = 0.9, 2.1
MIN_ROOM = 2.4
WALL_THICKNESS = 0.1  # walls have two sides: a point seen from one room is never the same point seen from the next
HALL_WIDTH = (1.4, 1.9)


@dataclass
class Opening:
    """A hole or panel in a wall: doorway (passable), window or door (panels), between rooms a and b (-1: outside)."""

    kind: str
    axis: int  # the wall is the plane world[axis] == coord (0: x, 2: z)
    coord: float
    lo: float  # extent along the other horizontal axis
    hi: float
    top: float  # height above the floor, metres
    bottom: float
    rooms: tuple[int, int]


@dataclass
class Room:
    """A rectangular room [x0, x1] x [z0, z1] with its type, materials, furniture and light."""

    index: int
    kind: str
    x0: float
    x1: float
    z0: float
    z1: float
    wall: str = "white"
    floor: str = "wood"
    items: list[furniture.Item] = field(default_factory=list)
    hub: np.ndarray | None = None  # (x, z) where walking paths from the doors meet

    @property
    def centre(self) -> np.ndarray:
        """Centre of the floor rectangle as (x, z)."""
        return np.array([(self.x0 + self.x1) / 2, (self.z0 + self.z1) / 2])

    @property
    def meeting_point(self) -> np.ndarray:
        """Where walking paths meet as (x, z): the hub, or the centre of a room without one."""
        return np.asarray(self.hub if self.hub is not None else self.centre, dtype=np.float64)

    @property
    def size(self) -> tuple[float, float]:
        """(width along x, depth along z)."""
        return self.x1 - self.x0, self.z1 - self.z0

    def wall_coord(self, opening: Opening) -> float:
        """Coordinate of this room's wall face that holds the opening."""
        faces = (self.x0, self.x1) if opening.axis == 0 else (self.z0, self.z1)
        return min(faces, key=lambda f: abs(f - opening.coord))

    def inward(self, opening: Opening) -> float:
        """+1 when the room lies on the positive side of the opening's wall, else -1."""
        low = self.x0 if opening.axis == 0 else self.z0
        return 1.0 if self.wall_coord(opening) == low else -1.0

    def contains(self, x: float, z: float, margin: float = 0.0) -> bool:
        """True when (x, z) lies inside, at least margin from the walls."""
        return self.x0 + margin <= x <= self.x1 - margin and self.z0 + margin <= z <= self.z1 - margin


@dataclass
class Scene:
    """A furnished multi-room floor plan."""

    seed: int
    height: float
    rooms: list[Room]
    openings: list[Opening]
    eye_height: float = 1.55

    def room_at(self, x: float, z: float) -> int:
        """Index of the room containing (x, z), -1 outside."""
        for r in self.rooms:
            if r.contains(x, z):
                return r.index
        return -1

    def doorways(self) -> list[Opening]:
        """Passable openings between two rooms."""
        return [o for o in self.openings if o.kind == "doorway"]

    def doorway_box(self, door: Opening) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of the passage through the wall's thickness at a doorway."""
        half = WALL_THICKNESS / 2
        if door.axis == 0:
            return np.array([door.coord - half, -door.top, door.lo]), np.array([door.coord + half, 0.0, door.hi])
        return np.array([door.lo, -door.top, door.coord - half]), np.array([door.hi, 0.0, door.coord + half])

    def locate(self, x: float, z: float) -> tuple[int, Opening | None]:
        """(room, None) of a floor point; (the doorway's first room, doorway) in a doorway; (-1, None) outside."""
        room = self.room_at(x, z)
        if room >= 0:
            return room, None
        for door in self.doorways():
            lo, hi = self.doorway_box(door)
            if lo[0] <= x <= hi[0] and lo[2] <= z <= hi[2]:
                return door.rooms[0], door
        return -1, None


def _split(rect: tuple[float, float, float, float], rng: np.random.Generator) -> list[tuple] | None:
    """Split a rectangle across its longer side into two rooms no smaller than MIN_ROOM, or None."""
    x0, x1, z0, z1 = rect
    axis = 0 if (x1 - x0) >= (z1 - z0) else 2
    lo, hi = (x0, x1) if axis == 0 else (z0, z1)
    if hi - lo < 2 * MIN_ROOM:
        return None
    cut = float(np.round(rng.uniform(lo + MIN_ROOM, hi - MIN_ROOM), 2))
    return [(x0, cut, z0, z1), (cut, x1, z0, z1)] if axis == 0 else [(x0, x1, z0, cut), (x0, x1, cut, z1)]


def floor_plan(rng: np.random.Generator) -> tuple[list[tuple], int | None]:
    """Room rectangles tiling a random footprint, and the index of the hallway strip if there is one."""
    w, d = float(np.round(rng.uniform(7.0, 12.0), 2)), float(np.round(rng.uniform(5.5, 9.0), 2))
    hall = None
    if rng.random() < 0.4:
        hw = float(np.round(rng.uniform(*HALL_WIDTH), 2))
        z_hall = float(np.round(rng.uniform(MIN_ROOM, d - MIN_ROOM - hw), 2)) if d > 2 * MIN_ROOM + hw else None
        if z_hall is not None:
            parts = [(0.0, w, 0.0, z_hall), (0.0, w, z_hall + hw, d)]
            rects = [(0.0, w, z_hall, z_hall + hw)]
            hall = 0
            for p in parts:
                halves = _split(p, rng) if rng.random() < 0.8 else None
                rects += halves or [p]
            return rects, hall
    rects = [(0.0, w, 0.0, d)]
    target = int(rng.integers(2, 5))
    while len(rects) < target:
        order = np.argsort([-(r[1] - r[0]) * (r[3] - r[2]) for r in rects])
        for i in order:
            halves = _split(rects[i], rng)
            if halves:
                rects = rects[:i] + halves + rects[i + 1 :]
                break
        else:
            break
    return rects, hall


def shared_walls(a: Room, b: Room) -> tuple[int, float, float, float] | None:
    """(axis, coord, lo, hi) of the wall segment two rooms share, or None."""
    for axis, (ca, cb) in ((0, (a.x1, b.x0)), (0, (a.x0, b.x1)), (2, (a.z1, b.z0)), (2, (a.z0, b.z1))):
        if abs(ca - cb) < 1e-6:
            lo, hi = (max(a.z0, b.z0), min(a.z1, b.z1)) if axis == 0 else (max(a.x0, b.x0), min(a.x1, b.x1))
            if hi - lo > 0:
                return axis, ca, lo, hi
    return None


def _assign_types(rooms: list[Room], hall: int | None, rng: np.random.Generator) -> None:
    """Room types by size and shape: the hallway strip, a small room as bathroom, the rest varied."""
    others = [r for r in rooms if r.index != hall]
    if hall is not None:
        rooms[hall].kind = "hallway"
    smallest = min(others, key=lambda r: r.size[0] * r.size[1])
    kinds = list(rng.permutation(["bedroom", "living room", "kitchen", "office"]))
    for r in others:
        if r is smallest and len(others) > 2 and r.size[0] * r.size[1] < 14.0:
            r.kind = "bathroom"
        else:
            r.kind = str(kinds.pop(0)) if kinds else str(rng.choice(["bedroom", "office", "living room"]))


def _connect(rooms: list[Room], rng: np.random.Generator) -> list[Opening]:
    """Doorways on a random spanning tree of the adjacency graph (every room reachable)."""
    edges = []
    for i, a in enumerate(rooms):
        for b in rooms[i + 1 :]:
            wall = shared_walls(a, b)
            if wall and wall[3] - wall[2] >= DOOR_WIDTH[0] + 0.6:
                edges.append((a.index, b.index, wall))
    order = rng.permutation(len(edges))
    # Prefer hallway edges so a hallway joins the rooms along it.
    order = sorted(order, key=lambda k: "hallway" not in (rooms[edges[k][0]].kind, rooms[edges[k][1]].kind))
    group = list(range(len(rooms)))

    def find(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    doors = []
    for k in order:
        a, b, (axis, coord, lo, hi) = edges[k]
        if find(a) == find(b):
            continue
        group[find(a)] = find(b)
        width = float(rng.uniform(DOOR_WIDTH[0], min(DOOR_WIDTH[1], hi - lo - 0.6)))
        start = float(rng.uniform(lo + 0.3, hi - 0.3 - width))
        doors.append(Opening("doorway", axis, coord, start, start + width, DOOR_HEIGHT, 0.0, (a, b)))
    return doors


def _exterior_walls(room: Room, footprint: tuple[float, float, float, float]) -> list[tuple[int, float, float, float]]:
    """(axis, coord, lo, hi) of the room's walls on the outside of the footprint."""
    fx0, fx1, fz0, fz1 = footprint
    walls = []
    for axis, coord, edge in ((0, room.x0, fx0), (0, room.x1, fx1), (2, room.z0, fz0), (2, room.z1, fz1)):
        if abs(coord - edge) < 1e-6:
            lo, hi = (room.z0, room.z1) if axis == 0 else (room.x0, room.x1)
            walls.append((axis, coord, lo, hi))
    return walls


def _windows_and_door(rooms: list[Room], footprint: tuple, rng: np.random.Generator) -> list[Opening]:
    """Windows on exterior walls of living spaces, and one entrance door."""
    out = []
    entrance = next((r for r in rooms if r.kind == "hallway"), None) or next(
        (r for r in rooms if r.kind == "living room"), rooms[0]
    )
    for room in rooms:
        walls = list(_exterior_walls(room, footprint))
        rng.shuffle(walls)
        if room is entrance and walls:
            axis, coord, lo, hi = walls.pop(0)
            if hi - lo > 1.6:
                start = float(rng.uniform(lo + 0.3, hi - 1.3))
                out.append(Opening("door", axis, coord, start, start + 0.95, DOOR_HEIGHT, 0.0, (room.index, -1)))
        if room.kind == "hallway":
            continue
        for axis, coord, lo, hi in walls[: 1 + int(rng.random() < 0.4)]:
            width = float(rng.uniform(0.9, min(2.0, hi - lo - 0.8))) if hi - lo > 1.8 else 0.0
            if width > 0:
                start = float(rng.uniform(lo + 0.4, hi - 0.4 - width))
                window = Opening("window", axis, coord, start, start + width, WINDOW_TOP, WINDOW_SILL, (room.index, -1))
                out.append(window)
    return out


def generate_scene(seed: int, kind: str | None = None, wall: str | None = None, floor: str | None = None) -> Scene:
    """A furnished multi-room scene, the same for the same seed (and the same overrides): `kind`, `wall` and `floor`
    make every room that room type (furnished as one), wall colour and floor, the rest drawn from the seed."""
    for value, allowed, name in ((kind, ROOM_TYPES, "kind"), (wall, WALL_COLOURS, "wall"), (floor, FLOORS, "floor")):
        if value is not None and value not in allowed:
            raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5CE7E]))
    rects, hall = floor_plan(rng)
    rooms = [Room(i, "room", *r) for i, r in enumerate(rects)]
    _assign_types(rooms, hall, rng)
    for room in rooms:
        room.kind = kind or room.kind
        room.wall = str(rng.choice(list(WALL_COLOURS)))
        room.floor = str(rng.choice(FLOOR_CHOICES[room.kind]))
        room.wall, room.floor = wall or room.wall, floor or room.floor
        assert room.floor in FLOORS
    footprint = (min(r.x0 for r in rooms), max(r.x1 for r in rooms), min(r.z0 for r in rooms), max(r.z1 for r in rooms))
    openings = _connect(rooms, rng) + _windows_and_door(rooms, footprint, rng)
    half = WALL_THICKNESS / 2
    for room in rooms:  # rooms tile the plan up to here; now the walls take their thickness
        room.x0, room.x1, room.z0, room.z1 = room.x0 + half, room.x1 - half, room.z0 + half, room.z1 - half
    scene = Scene(seed=seed, height=float(np.round(rng.uniform(2.5, 3.0), 2)), rooms=rooms, openings=openings)
    for room in rooms:
        room.items, room.hub = furniture.furnish(room, scene, rng)
    return scene


def room_openings(scene: Scene, room: Room) -> list[Opening]:
    """Openings in the walls of a room."""
    return [o for o in scene.openings if room.index in o.rooms]
