"""Furniture built from boxes, chosen and placed by room type, keeping doorways and walking paths free."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from diffpano.data.procedural.materials import FIXED, FURNITURE_COLOURS, Material

if TYPE_CHECKING:
    from diffpano.data.procedural.scenes import Room, Scene

# A part in the item's local frame: (u0, u1) along the wall, (v0, v1) away from it, (h0, h1) height above the floor.
Part = tuple[float, float, float, float, float, float, Material]
WALK_CLEARANCE = 0.45
DOOR_CLEARANCE = 1.0


@dataclass
class Item:
    """A piece of furniture: its noun and colour word, world boxes (lo, hi, material) and relations."""

    noun: str
    colour: str
    boxes: list[tuple[np.ndarray, np.ndarray, Material]] = field(default_factory=list)
    under_window: bool = False
    mounted: bool = False  # hangs from the ceiling (lights): not on the floor plan

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box around all parts."""
        return np.min([b[0] for b in self.boxes], axis=0), np.max([b[1] for b in self.boxes], axis=0)

    @property
    def phrase(self) -> str:
        """The item in words, e.g. 'a white bed'."""
        words = f"{self.colour} {self.noun}" if self.colour else self.noun
        return ("an " if words[0] in "aeiou" else "a ") + words  # captions.a, kept here to avoid a cycle


def _mat(colour: str, pattern: str = "plain") -> Material:
    """A furniture material of a named colour."""
    rgb = FIXED[colour] if colour in FIXED else FURNITURE_COLOURS[colour]
    return Material(colour, rgb, "grain" if colour == "wooden" else pattern)


def _legs(w: float, d: float, h: float, m: Material, t: float = 0.05) -> list[Part]:
    """Four legs under a rectangle w x d."""
    return [(u, u + t, v, v + t, 0.0, h, m) for u in (0.03, w - 0.03 - t) for v in (0.03, d - 0.03 - t)]


def bed(w: float, d: float, c: str, rng) -> list[Part]:
    """Frame, mattress, pillows and headboard against the wall."""
    frame, sheet = _mat(c), _mat("white" if c != "white" else "beige")
    pillow = _mat("white")
    return [
        (0.0, w, 0.1, d, 0.0, 0.35, frame),
        (0.05, w - 0.05, 0.12, d - 0.05, 0.35, 0.58, sheet),
        (0.15, w / 2 - 0.05, 0.18, 0.55, 0.58, 0.7, pillow),
        (w / 2 + 0.05, w - 0.15, 0.18, 0.55, 0.58, 0.7, pillow),
        (0.0, w, 0.0, 0.1, 0.0, 1.05, frame),
    ]


def cabinet(w: float, d: float, c: str, rng, h: float = 0.6) -> list[Part]:
    """A closed box with a darker top (nightstands, wardrobes, shoe cabinets)."""
    m = _mat(c)
    return [(0.0, w, 0.0, d - 0.02, 0.0, h - 0.03, m), (0.0, w, 0.0, d, h - 0.03, h, _mat("wooden"))]


def sofa(w: float, d: float, c: str, rng) -> list[Part]:
    """Seat, back and two arms."""
    m = _mat(c)
    return [
        (0.0, w, 0.0, d, 0.1, 0.42, m),
        (0.0, w, 0.0, 0.22, 0.42, 0.85, m),
        (0.0, 0.18, 0.0, d, 0.42, 0.62, m),
        (w - 0.18, w, 0.0, d, 0.42, 0.62, m),
        *_legs(w, d, 0.1, _mat("black")),
    ]


def table(w: float, d: float, c: str, rng, h: float = 0.75) -> list[Part]:
    """Top on four legs."""
    m = _mat(c)
    return [(0.0, w, 0.0, d, h - 0.04, h, m), *_legs(w, d, h - 0.04, m)]


def chair(u: float, v: float, m: Material, back_v: float) -> list[Part]:
    """A 0.45 m chair at (u, v) whose back is on the side v + back_v."""
    s = 0.45
    back = (u, u + s, v + s - 0.05, v + s, 0.45, 0.95, m) if back_v > 0 else (u, u + s, v, v + 0.05, 0.45, 0.95, m)
    corners = [(a, b) for a in (u + 0.02, u + s - 0.06) for b in (v + 0.02, v + s - 0.06)]
    legs = [(a, a + 0.04, b, b + 0.04, 0.0, 0.42, m) for a, b in corners]
    return [(u, u + s, v, v + s, 0.42, 0.47, m), back, *legs]


def dining(w: float, d: float, c: str, rng) -> list[Part]:
    """A dining table with a chair on each long side."""
    m = _mat(c)
    top = table(w, d - 1.0, c, rng)
    top = [(a, b, v0 + 0.5, v1 + 0.5, h0, h1, mm) for a, b, v0, v1, h0, h1, mm in top]
    seats = []
    for u in np.linspace(0.15, w - 0.6, max(1, int(w // 0.7))):
        seats += chair(float(u), 0.02, m, back_v=-1) + chair(float(u), d - 0.47, m, back_v=1)
    return top + seats


def desk(w: float, d: float, c: str, rng) -> list[Part]:
    """Desk with a monitor and an office chair."""
    return [
        *table(w, 0.7, c, rng),
        (w / 2 - 0.3, w / 2 + 0.3, 0.1, 0.14, 0.8, 1.15, _mat("screen")),
        (w / 2 - 0.05, w / 2 + 0.05, 0.14, 0.2, 0.75, 0.8, _mat("black")),
        *chair(w / 2 - 0.22, 0.9, _mat("black"), back_v=1),
    ]


def tv_stand(w: float, d: float, c: str, rng) -> list[Part]:
    """Low cabinet with a television."""
    return [*cabinet(w, d, c, rng, h=0.5), (w / 2 - 0.6, w / 2 + 0.6, 0.12, 0.18, 0.55, 1.25, _mat("screen"))]


def bookshelf(w: float, d: float, c: str, rng) -> list[Part]:
    """Tall frame with shelves and rows of books."""
    m = _mat(c)
    parts: list[Part] = [(0, w, 0, 0.03, 0, 1.9, m), (0, 0.03, 0, d, 0, 1.9, m), (w - 0.03, w, 0, d, 0, 1.9, m)]
    books = [_mat(k) for k in ("red", "blue", "green", "beige")]
    for k, h in enumerate(np.linspace(0.02, 1.88, 5)):
        parts.append((0, w, 0, d, float(h), float(h) + 0.03, m))
        if k < 4:
            book = books[(k + int(w * 10)) % 4]
            parts.append((0.05, w - 0.05, 0.05, d - 0.05, float(h) + 0.03, float(h) + 0.3, book))
    return parts


def counter(w: float, d: float, c: str, rng) -> list[Part]:
    """Kitchen counter with a stone worktop, a sink, a hob and wall cabinets above."""
    m, top = _mat(c), _mat("gray", "stone")
    return [
        (0.0, w, 0.0, d, 0.1, 0.88, m),
        (0.0, w, 0.0, d + 0.02, 0.88, 0.92, top),
        (0.2, 0.8, 0.1, d - 0.1, 0.92, 0.93, _mat("ceramic")),
        (w - 0.8, w - 0.2, 0.1, d - 0.1, 0.92, 0.93, _mat("black")),
        (0.0, w, 0.0, 0.35, 1.45, 2.15, m),
    ]


def fridge(w: float, d: float, c: str, rng) -> list[Part]:
    """A tall fridge."""
    return [(0.0, w, 0.0, d, 0.0, 1.85, _mat(c)), (w - 0.1, w - 0.06, d, d + 0.04, 0.9, 1.5, _mat("gray"))]


def bathtub(w: float, d: float, c: str, rng) -> list[Part]:
    """A tub: floor, four rims (hollow inside)."""
    m, t = _mat("ceramic"), 0.1
    return [
        (0, w, 0, d, 0, 0.15, m), (0, w, 0, t, 0, 0.58, m), (0, w, d - t, d, 0, 0.58, m),
        (0, t, 0, d, 0, 0.58, m), (w - t, w, 0, d, 0, 0.58, m),
    ]


def toilet(w: float, d: float, c: str, rng) -> list[Part]:
    """Tank against the wall, bowl in front."""
    m = _mat("ceramic")
    return [(0.0, w, 0.0, 0.2, 0.0, 0.8, m), (0.05, w - 0.05, 0.2, d, 0.0, 0.42, m)]


def vanity(w: float, d: float, c: str, rng) -> list[Part]:
    """Sink cabinet with a basin and a mirror."""
    return [
        *cabinet(w, d, c, rng, h=0.85),
        (0.15, w - 0.15, 0.1, d - 0.1, 0.85, 0.88, _mat("ceramic")),
        (0.1, w - 0.1, 0.0, 0.02, 1.2, 1.8, _mat("window")),
    ]


def plant(w: float, d: float, c: str, rng) -> list[Part]:
    """A pot with leaves."""
    return [(0.1, w - 0.1, 0.1, d - 0.1, 0.0, 0.35, _mat(c)), (0.0, w, 0.0, d, 0.35, 1.1, _mat("plant"))]


def floor_lamp(w: float, d: float, c: str, rng) -> list[Part]:
    """Base, pole and shade."""
    m = _mat(c)
    pole = (w / 2 - 0.02, w / 2 + 0.02, d / 2 - 0.02, d / 2 + 0.02, 0, 1.4, m)
    return [(0.05, w - 0.05, 0.05, d - 0.05, 0, 0.04, m), pole, (0.0, w, 0.0, d, 1.4, 1.7, _mat("beige"))]


def bench(w: float, d: float, c: str, rng) -> list[Part]:
    """A low bench."""
    return table(w, d, c, rng, h=0.45)


def coat_rack(w: float, d: float, c: str, rng) -> list[Part]:
    """A wall board with coats."""
    return [(0.0, w, 0.0, 0.04, 1.5, 1.7, _mat(c)), (0.1, w - 0.1, 0.04, d, 0.9, 1.65, _mat("blue"))]


@dataclass(frozen=True)
class Spec:
    """How to make one kind of item: noun, size ranges, colours, builder, where it goes."""

    noun: str
    width: tuple[float, float]
    depth: tuple[float, float]
    colours: tuple[str, ...]
    build: Callable
    wall: bool = True


SPECS = {
    "bed": Spec("bed", (1.4, 1.8), (2.0, 2.2), ("white", "gray", "beige", "blue", "brown"), bed),
    "nightstand": Spec("nightstand", (0.4, 0.5), (0.4, 0.45), ("wooden", "white"), cabinet),
    "wardrobe": Spec("wardrobe", (1.0, 1.6), (0.55, 0.65), ("white", "wooden", "brown"),
                     lambda w, d, c, r: cabinet(w, d, c, r, h=2.0)),
    "sofa": Spec("sofa", (1.8, 2.4), (0.85, 0.95), ("gray", "blue", "green", "beige", "brown", "red"), sofa),
    "armchair": Spec("armchair", (0.8, 0.95), (0.8, 0.9), ("gray", "blue", "green", "beige", "red"), sofa),
    "coffee table": Spec("coffee table", (0.9, 1.2), (0.5, 0.7), ("wooden", "white", "black"),
                         lambda w, d, c, r: table(w, d, c, r, h=0.42), wall=False),
    "tv": Spec("TV stand", (1.4, 1.8), (0.4, 0.45), ("wooden", "black", "white"), tv_stand),
    "bookshelf": Spec("bookshelf", (0.8, 1.2), (0.3, 0.35), ("wooden", "white", "black"), bookshelf),
    "counter": Spec("kitchen counter", (2.0, 3.2), (0.6, 0.65), ("white", "gray", "wooden", "blue", "green"), counter),
    "fridge": Spec("fridge", (0.65, 0.75), (0.65, 0.7), ("white", "gray"), fridge),
    "dining table": Spec("dining table", (1.2, 1.6), (1.8, 1.9), ("wooden", "white", "black"), dining, wall=False),
    "bathtub": Spec("bathtub", (1.5, 1.7), (0.7, 0.8), ("white",), bathtub),
    "toilet": Spec("toilet", (0.4, 0.45), (0.65, 0.7), ("white",), toilet),
    "sink": Spec("sink", (0.6, 1.0), (0.45, 0.5), ("white", "wooden", "gray"), vanity),
    "desk": Spec("desk", (1.2, 1.6), (1.4, 1.45), ("wooden", "white", "black"), desk),
    "filing cabinet": Spec("filing cabinet", (0.45, 0.5), (0.55, 0.6), ("gray", "black"),
                           lambda w, d, c, r: cabinet(w, d, c, r, h=1.1)),
    "plant": Spec("plant", (0.4, 0.5), (0.4, 0.5), ("brown", "white", "gray"), plant),
    "lamp": Spec("floor lamp", (0.35, 0.4), (0.35, 0.4), ("black", "white"), floor_lamp),
    "console": Spec("console table", (0.9, 1.3), (0.35, 0.4), ("wooden", "black", "white"),
                    lambda w, d, c, r: table(w, d, c, r, h=0.8)),
    "bench": Spec("bench", (1.0, 1.4), (0.4, 0.45), ("wooden", "black"), bench),
    "coat rack": Spec("coat rack", (0.8, 1.2), (0.3, 0.35), ("wooden", "black"), coat_rack),
}

# Per room type: (spec key, probability); the first is the room's main item, always attempted.
PLANS = {
    "bedroom": (("bed", 1.0), ("nightstand", 0.8), ("wardrobe", 0.8), ("nightstand", 0.4), ("lamp", 0.3),
                ("plant", 0.3)),
    "living room": (("sofa", 1.0), ("coffee table", 0.9), ("tv", 0.8), ("armchair", 0.6), ("bookshelf", 0.5),
                    ("plant", 0.5), ("lamp", 0.4)),
    "kitchen": (("counter", 1.0), ("fridge", 0.9), ("dining table", 0.7), ("plant", 0.3)),
    "bathroom": (("bathtub", 1.0), ("toilet", 0.9), ("sink", 0.9)),
    "office": (("desk", 1.0), ("bookshelf", 0.8), ("filing cabinet", 0.6), ("plant", 0.5), ("armchair", 0.3)),
    "hallway": (("console", 0.8), ("bench", 0.5), ("coat rack", 0.6), ("plant", 0.5)),
}
ATTEMPTS = 40


def _to_world(part: Part, room: Room, side: str, start: float, depth_origin: float) -> tuple:
    """World box (lo, hi, material) of a local part placed against a wall side (or free, side 'free')."""
    u0, u1, v0, v1, h0, h1, m = part
    ys = (-h1, -h0)
    if side in ("x0", "x1"):
        xs = (room.x0 + v0, room.x0 + v1) if side == "x0" else (room.x1 - v1, room.x1 - v0)
        zs = (start + u0, start + u1)
    else:
        zs = {"z0": (room.z0 + v0, room.z0 + v1), "z1": (room.z1 - v1, room.z1 - v0)}.get(
            side, (depth_origin + v0, depth_origin + v1))
        xs = (start + u0, start + u1)
    return np.array([xs[0], ys[0], zs[0]]), np.array([xs[1], ys[1], zs[1]]), m


def door_zones(room: Room, scene: Scene) -> tuple[list[tuple], list[np.ndarray]]:
    """Rectangles in front of the room's doors that furniture leaves free, and the approach point of each door."""
    from diffpano.data.procedural.scenes import room_openings

    rects, approaches = [], []
    for o in room_openings(scene, room):
        if o.kind == "window":
            continue
        mid, wall, inward = (o.lo + o.hi) / 2, room.wall_coord(o), room.inward(o)
        a, b = sorted((wall, wall + inward * DOOR_CLEARANCE))
        depth_point = wall + inward * 0.5
        if o.axis == 0:
            rects.append((a, b, o.lo - 0.2, o.hi + 0.2))
            approaches.append(np.array([depth_point, mid]))
        else:
            rects.append((o.lo - 0.2, o.hi + 0.2, a, b))
            approaches.append(np.array([mid, depth_point]))
    return rects, approaches


def _rect_overlaps(a: tuple, b: tuple, gap: float = 0.0) -> bool:
    """True when rectangles (x0, x1, z0, z1) overlap, with a gap."""
    return a[0] < b[1] + gap and b[0] < a[1] + gap and a[2] < b[3] + gap and b[2] < a[3] + gap


def _segment_hits_rect(p: np.ndarray, q: np.ndarray, rect: tuple, radius: float) -> bool:
    """True when a segment p-q passes within radius of a rectangle (checked at 5 cm steps)."""
    n = max(2, int(np.linalg.norm(q - p) / 0.05) + 1)
    pts = p[None] + np.linspace(0, 1, n)[:, None] * (q - p)[None]
    dx = np.maximum(np.maximum(rect[0] - pts[:, 0], pts[:, 0] - rect[1]), 0)
    dz = np.maximum(np.maximum(rect[2] - pts[:, 1], pts[:, 1] - rect[3]), 0)
    return bool(np.any(np.hypot(dx, dz) < radius))


def _against(o, side: str, room: Room) -> bool:
    """True when opening o is in the wall on the given side of the room."""
    coord = {"x0": room.x0, "x1": room.x1, "z0": room.z0, "z1": room.z1}.get(side)
    return coord is not None and o.axis == (0 if side[0] == "x" else 2) and room.wall_coord(o) == coord


def _propose(spec: Spec, room: Room, scene: Scene, placed: list[tuple], door_rects: list[tuple], rng):
    """One random placement (item, footprint) clear of walls, doors, windows and other items, or None."""
    from diffpano.data.procedural.scenes import WINDOW_SILL, room_openings

    w, d = float(rng.uniform(*spec.width)), float(rng.uniform(*spec.depth))
    colour = str(rng.choice(spec.colours))
    side = str(rng.choice(["x0", "x1", "z0", "z1"])) if spec.wall else "free"
    along = (room.z0, room.z1) if side in ("x0", "x1") else (room.x0, room.x1)
    if along[1] - along[0] < w + 0.1 or (side == "free" and room.z1 - room.z0 < d + 0.6):
        return None
    start = float(rng.uniform(along[0] + 0.05, along[1] - 0.05 - w))
    depth_origin = float(rng.uniform(room.z0 + 0.3, room.z1 - 0.3 - d)) if side == "free" else 0.0
    boxes = [_to_world(p, room, side, start, depth_origin) for p in spec.build(w, d, colour, rng)]
    lo, hi = np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)
    rect = (lo[0], hi[0], lo[2], hi[2])
    if not (room.x0 <= rect[0] and rect[1] <= room.x1 and room.z0 <= rect[2] and rect[3] <= room.z1):
        return None
    if any(_rect_overlaps(rect, r, 0.1) for r in placed) or any(_rect_overlaps(rect, r) for r in door_rects):
        return None
    windows = [o for o in room_openings(scene, room) if o.kind == "window" and _against(o, side, room)]
    on_window = [o for o in windows if o.lo < start + w and start < o.hi]
    if on_window and -lo[1] > WINDOW_SILL:
        return None
    return Item(spec.noun, colour, boxes, under_window=bool(on_window)), rect


def choose_hub(room: Room, rects: list[tuple]) -> np.ndarray | None:
    """The free floor point nearest the room centre, at least WALK_CLEARANCE + 0.1 m from walls and furniture."""
    clear = WALK_CLEARANCE + 0.1
    xs = np.arange(room.x0 + clear, room.x1 - clear + 1e-9, 0.1)
    zs = np.arange(room.z0 + clear, room.z1 - clear + 1e-9, 0.1)
    if not len(xs) or not len(zs):
        return None
    pts = np.stack(np.meshgrid(xs, zs, indexing="ij"), -1).reshape(-1, 2)
    ok = np.ones(len(pts), bool)
    for r in rects:
        dx = np.maximum(np.maximum(r[0] - pts[:, 0], pts[:, 0] - r[1]), 0)
        dz = np.maximum(np.maximum(r[2] - pts[:, 1], pts[:, 1] - r[3]), 0)
        ok &= np.hypot(dx, dz) >= clear
    if not ok.any():
        return None
    pts = pts[ok]
    return pts[np.argmin(np.linalg.norm(pts - room.centre, axis=1))]


def _paths_clear(hub: np.ndarray, approaches: list[np.ndarray], rect: tuple) -> bool:
    """True when the walk from every door approach to the hub keeps clear of a footprint."""
    return not any(_segment_hits_rect(a, hub, rect, WALK_CLEARANCE) for a in [*approaches, hub])


def ceiling_light(room: Room, scene: Scene) -> Item:
    """A glowing panel at the centre of the ceiling."""
    cx, cz = room.centre
    m = Material("light", FIXED["light"], "emissive")
    lo = np.array([cx - 0.3, -scene.height, cz - 0.3])
    return Item("ceiling light", "", [(lo, lo + np.array([0.6, 0.05, 0.6]), m)], mounted=True)


def furnish(room: Room, scene: Scene, rng) -> tuple[list[Item], np.ndarray]:
    """Items for a room of its type and the hub of its walking paths (door approaches -> hub stay free).

    The main item is placed first and the hub chosen around it, so small rooms still get their bed or bathtub.
    """
    door_rects, approaches = door_zones(room, scene)
    placed: list[tuple] = []
    items: list[Item] = []
    hub = None
    (main, prob), *extras = PLANS[room.kind]
    for _ in range(ATTEMPTS if rng.random() < prob else 0):
        got = _propose(SPECS[main], room, scene, placed, door_rects, rng)
        cand = None if got is None else choose_hub(room, [got[1]])
        if cand is not None and _paths_clear(cand, approaches, got[1]):
            items.append(got[0])
            placed.append(got[1])
            hub = cand
            break
    if hub is None:
        hub = choose_hub(room, []) if choose_hub(room, []) is not None else room.centre
    for key, prob in extras:
        if rng.random() >= prob:
            continue
        for _ in range(ATTEMPTS):
            got = _propose(SPECS[key], room, scene, placed, door_rects, rng)
            if got is not None and _paths_clear(hub, approaches, got[1]):
                items.append(got[0])
                placed.append(got[1])
                break
    return [*items, ceiling_light(room, scene)], hub
