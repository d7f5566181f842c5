"""Vectorised box ray casting of procedural scenes (equirectangular, docs/geometry.md, and cube-face RGB, depth,
labels), kept as the tests' oracle of the mesh path (diffpano.data.procedural.scene_mesh); and the shading both paths
share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from diffpano.data.procedural.furniture import Item
from diffpano.data.procedural.materials import (
    FIXED,
    FLOOR_PATTERN,
    FLOORS,
    PATTERNS,
    WALL_COLOURS,
    Material,
    MaterialTable,
    pattern_factor,
)
from diffpano.data.procedural.scenes import Scene
from diffpano.geometry.projection import cube_face_rays
from diffpano.geometry.spherical import check_panorama_size
from diffpano.io.manifest import to_uint8

WALL, FLOOR, CEILING, WINDOW, DOOR = 0, 1, 2, 3, 4
FIRST_ITEM_LABEL = 5  # labels >= 5 are items: label - 5 indexes SceneRenderer.items
MAX_HOPS = 9  # rooms and doorway passages a ray may cross
OPENING_CODES = {"doorway": 0, "window": 1, "door": 2}
AMBIENT, DIFFUSE, FALLOFF = 0.38, 0.75, 0.04


@dataclass
class View:
    """A rendering: rgb uint8 (..., 3), depth in metres along the ray, surface labels and room per pixel."""

    rgb: np.ndarray
    depth: np.ndarray
    label: np.ndarray
    room: np.ndarray


@lru_cache(maxsize=8)
def erp_directions(height: int, width: int) -> np.ndarray:
    """Camera-frame unit directions (H, W, 3) float32 of docs/geometry.md pixel centres (cached per size)."""
    theta = (2 * np.pi * (np.arange(width) + 0.5) / width - np.pi)[None, :]
    phi = (np.pi / 2 - np.pi * (np.arange(height) + 0.5) / height)[:, None]
    d = np.stack(np.broadcast_arrays(np.cos(phi) * np.sin(theta), -np.sin(phi), np.cos(phi) * np.cos(theta)), -1)
    d = d.astype(np.float32)
    d.setflags(write=False)
    return d


@lru_cache(maxsize=4)
def cube_directions(face_size: int) -> np.ndarray:
    """Camera-frame unit directions (6, s, s, 3) float32 of the cube faces (cached per size)."""
    return cube_face_rays(face_size).numpy()


@dataclass
class _RoomArrays:
    """One room's geometry as arrays: walls, openings, item boxes, light."""

    lo: np.ndarray  # (3,) room box min (x, y, z), y = -ceiling height
    hi: np.ndarray
    openings: np.ndarray  # (O, 6): axis, coord, lo, hi, top, bottom (heights above floor)
    opening_kind: np.ndarray  # (O,) OPENING_CODES
    opening_to: np.ndarray  # (O,) room on the other side
    item_lo: np.ndarray  # (I, 3) item bounds
    item_hi: np.ndarray
    item_ids: np.ndarray  # (I,) global item index
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per item: part lo (P, 3), hi (P, 3), material ids (P,)
    wall_mat: int
    floor_mat: int
    light: np.ndarray


class DirectionRenderer:
    """Equirectangular and cube-face views from a renderer's `render_directions(pose, dirs)`."""

    def render_directions(self, pose: np.ndarray, dirs: np.ndarray) -> View:
        """View along camera-frame unit directions (..., 3) from a pose."""
        raise NotImplementedError

    def render(self, pose: np.ndarray, height: int, width: int) -> View:
        """Equirectangular view (H, W) from a camera-to-world pose (docs/geometry.md)."""
        check_panorama_size(height, width, field="size")
        return self.render_directions(pose, erp_directions(height, width))

    def render_cube(self, pose: np.ndarray, face_size: int) -> View:
        """Six cube faces (6, s, s) in projection.CUBE_FACES order."""
        return self.render_directions(pose, cube_directions(face_size))


class SceneRenderer(DirectionRenderer):
    """Renders a scene from any pose by casting rays room by room through boxes; geometry is compiled once."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.table = MaterialTable()
        self.items: list[Item] = []
        self.item_room: list[int] = []
        self.ceiling_mat = self.table.add(Material("ceiling", FIXED["ceiling"], "plaster"))
        self.window_mat = self.table.add(Material("window", FIXED["window"], "window"))
        self.door_mat = self.table.add(Material("door", FIXED["door"], "grain"))
        self.frame_mat = self.table.add(Material("frame", FIXED["ceiling"]))
        self.doors = scene.doorways()
        self.rooms = [self._compile_room(r) for r in scene.rooms] + [self._compile_doorway(d) for d in self.doors]
        self.rgb, self.pattern = self.table.arrays()

    def _compile_room(self, room) -> _RoomArrays:
        """Arrays of one room."""
        ops = [o for o in self.scene.openings if room.index in o.rooms]
        rows = [[o.axis, room.wall_coord(o), o.lo, o.hi, o.top, o.bottom] for o in ops]
        openings = np.array(rows, np.float32).reshape(-1, 6)
        kinds = np.array([OPENING_CODES[o.kind] for o in ops], np.int8)
        passage = {id(d): len(self.scene.rooms) + k for k, d in enumerate(self.doors)}
        to = np.array([passage.get(id(o), -1) for o in ops], np.int32)
        parts, ids = [], []
        for item in room.items:
            ids.append(len(self.items))
            self.items.append(item)
            self.item_room.append(room.index)
            parts.append((
                np.array([b[0] for b in item.boxes], np.float32),
                np.array([b[1] for b in item.boxes], np.float32),
                np.array([self.table.add(b[2]) for b in item.boxes], np.int32),
            ))
        bounds = [item.bounds for item in room.items]
        floor_name = room.floor
        return _RoomArrays(
            lo=np.array([room.x0, -self.scene.height, room.z0], np.float32),
            hi=np.array([room.x1, 0.0, room.z1], np.float32),
            openings=openings, opening_kind=kinds, opening_to=to,
            item_lo=np.array([b[0] for b in bounds], np.float32).reshape(-1, 3),
            item_hi=np.array([b[1] for b in bounds], np.float32).reshape(-1, 3),
            item_ids=np.array(ids, np.int32), parts=parts,
            wall_mat=self.table.add(Material(room.wall, WALL_COLOURS[room.wall], "plaster")),
            floor_mat=self.table.add(Material(floor_name, FLOORS[floor_name][1], FLOOR_PATTERN[floor_name])),
            light=self.rooms_light(room),
        )

    def _compile_doorway(self, door) -> _RoomArrays:
        """The passage through a doorway's wall thickness: a small room open at both ends, framed inside."""
        lo, hi = self.scene.doorway_box(door)
        a, b = (self.scene.rooms[r] for r in door.rooms)
        ends = [[door.axis, face, door.lo, door.hi, door.top, 0.0] for face in (lo[door.axis], hi[door.axis])]
        # Each end opens onto the room whose wall face is there.
        to = [min((a, b), key=lambda r, f=f[1]: abs(r.wall_coord(door) - f)).index for f in ends]
        empty = np.zeros((0, 3), np.float32)
        return _RoomArrays(
            lo=lo.astype(np.float32), hi=hi.astype(np.float32), openings=np.array(ends, np.float32),
            opening_kind=np.zeros(2, np.int8), opening_to=np.array(to, np.int32), item_lo=empty, item_hi=empty,
            item_ids=np.zeros(0, np.int32), parts=[], wall_mat=self.frame_mat, floor_mat=self.frame_mat,
            light=self.rooms_light(a),
        )

    def rooms_light(self, room) -> np.ndarray:
        """Position of a room's ceiling light."""
        return np.array([room.centre[0], -self.scene.height + 0.35, room.centre[1]], np.float32)

    def locate(self, x: float, z: float) -> int:
        """Compiled room index (rooms, then doorway passages) of a floor point, -1 outside."""
        room, door = self.scene.locate(x, z)
        return room if door is None else len(self.scene.rooms) + next(k for k, d in enumerate(self.doors) if d is door)

    def render_directions(self, pose: np.ndarray, dirs: np.ndarray) -> View:
        """View along camera-frame unit directions (..., 3) from a pose."""
        pose = np.asarray(pose, dtype=np.float64)
        origin = pose[:3, 3].astype(np.float32)
        start = self.locate(float(origin[0]), float(origin[2]))
        if start < 0 or not -self.scene.height < origin[1] < 0:
            raise ValueError(f"pose: camera centre {origin.tolist()} is outside the scene's rooms")
        world = (dirs.reshape(-1, 3) @ pose[:3, :3].T.astype(np.float32)).astype(np.float32)
        t, axis, mat, label, room = self._cast(origin, world, start)
        rgb = self._shade(origin, world, t, axis, mat, room)
        shape = dirs.shape[:-1]
        return View(rgb.reshape(*shape, 3), t.reshape(shape), label.reshape(shape), room.reshape(shape))

    def _cast(self, o: np.ndarray, d: np.ndarray, start: int):
        """Nearest hit per ray: distance, hit-face axis, material, label and room."""
        n = len(d)
        with np.errstate(divide="ignore"):
            inv = 1.0 / np.where(d == 0, np.float32(1e-12), d)
        t = np.full(n, np.inf, np.float32)
        axis = np.zeros(n, np.int8)
        mat = np.zeros(n, np.int32)
        label = np.zeros(n, np.int32)
        room = np.full(n, start, np.int32)
        active = np.arange(n)
        for _ in range(MAX_HOPS):
            passing = []
            for r in np.unique(room[active]):
                idx = active[room[active] == r]
                passing.append(self._cast_room(o, d, inv, idx, int(r), t, axis, mat, label, room))
            active = np.concatenate(passing) if passing else active[:0]
            if len(active) == 0:
                break
        if len(active):  # rays still crossing doorways after MAX_HOPS see the doorway as wall
            mat[active], label[active] = np.array([self.rooms[r].wall_mat for r in room[active]]), WALL
        return t, axis, mat, label, room

    def _cast_room(self, o, d, inv, idx, r, t, axis, mat, label, room) -> np.ndarray:
        """Hits of rays idx inside room r; returns the rays that pass a doorway into the next room."""
        ra = self.rooms[r]
        di, ii = d[idx], inv[idx]
        far = (np.where(di > 0, ra.hi, ra.lo) - o) * ii
        ax = np.argmin(far, axis=1).astype(np.int8)
        t_exit = far[np.arange(len(idx)), ax]
        best, best_ax = t_exit.copy(), ax
        down = di[:, 1] > 0
        best_mat = np.where(ax == 1, np.where(down, ra.floor_mat, self.ceiling_mat), ra.wall_mat).astype(np.int32)
        best_label = np.where(ax == 1, np.where(di[:, 1] > 0, FLOOR, CEILING), WALL).astype(np.int32)
        passing = np.zeros(len(idx), bool)
        wall = ax != 1
        if len(ra.openings) and wall.any():
            p = o + di * t_exit[:, None]
            openings = zip(ra.openings, ra.opening_kind, ra.opening_to, strict=True)
            for (o_ax, coord, lo, hi, top, bottom), kind, to in openings:
                along = p[:, 2] if o_ax == 0 else p[:, 0]
                h = -p[:, 1]
                inside = (ax == o_ax) & (np.abs(p[:, int(o_ax)] - coord) < 1e-3) & (along > lo) & (along < hi)
                inside &= (h < top) & (h > bottom)
                if kind == 0:
                    passing |= inside
                else:
                    best_mat[inside] = self.window_mat if kind == 1 else self.door_mat
                    best_label[inside] = WINDOW if kind == 1 else DOOR
                if kind == 0 and inside.any():
                    room[idx[inside]] = to
        if len(ra.item_ids):
            self._hit_items(o, di, ii, ra, best, best_ax, best_mat, best_label)
        hit_item = best < t_exit
        passing &= ~hit_item
        done = ~passing
        t[idx[done]], axis[idx[done]] = best[done], best_ax[done]
        mat[idx[done]], label[idx[done]] = best_mat[done], best_label[done]
        room[idx[hit_item]] = r
        return idx[passing]

    def _hit_items(self, o, d, inv, ra: _RoomArrays, best, best_ax, best_mat, best_label) -> None:
        """Update nearest hits in place with the room's furniture (item bounds first, then their parts)."""
        t1 = (ra.item_lo - o)[None] * inv[:, None]
        t2 = (ra.item_hi - o)[None] * inv[:, None]
        tmin = np.minimum(t1, t2).max(-1)
        tmax = np.maximum(t1, t2).min(-1)
        cand = (tmax >= tmin) & (tmax > 0) & (tmin < best[:, None])
        for k in np.flatnonzero(cand.any(0)):
            rays = np.flatnonzero(cand[:, k])
            lo, hi, mats = ra.parts[k]
            p1 = (lo - o)[None] * inv[rays, None]
            p2 = (hi - o)[None] * inv[rays, None]
            near = np.minimum(p1, p2)
            pmin, pmax = near.max(-1), np.maximum(p1, p2).min(-1)
            pmin = np.where((pmax >= pmin) & (pmin > 0), pmin, np.inf)
            j = np.argmin(pmin, axis=1)
            tj = pmin[np.arange(len(rays)), j]
            closer = tj < best[rays]
            rays, j, tj = rays[closer], j[closer], tj[closer]
            best[rays] = tj
            best_ax[rays] = np.argmax(near[closer][np.arange(len(rays)), j], axis=-1)
            best_mat[rays] = mats[j]
            best_label[rays] = FIRST_ITEM_LABEL + ra.item_ids[k]

    def _shade(self, o, d, t, axis, mat, room) -> np.ndarray:
        """Lambertian colour under each room's ceiling light, times the materials' procedural patterns."""
        lights = np.stack([r.light for r in self.rooms])[room]
        return shade(o + d * t[:, None], d, axis, mat, lights, self.rgb, self.pattern)


def shade(p: np.ndarray, d: np.ndarray, axis: np.ndarray, mat: np.ndarray, light: np.ndarray, rgb: np.ndarray,
          pattern: np.ndarray) -> np.ndarray:
    """uint8 colours (N, 3) of surface points p hit along d on faces normal to `axis`: Lambertian under the
    point's room light (N, 3), times material colour and procedural pattern (MaterialTable.arrays)."""
    n = len(d)
    sign = -np.sign(d[np.arange(n), axis])  # the face normal points back towards the camera
    to_light = light - p
    dist = np.linalg.norm(to_light, axis=1) + 1e-6
    lambert = np.clip(sign * to_light[np.arange(n), axis] / dist, 0, None)
    up_facing = (axis == 1) & (sign < 0)
    brightness = AMBIENT + 0.08 * up_facing + DIFFUSE * lambert / (1 + FALLOFF * dist**2)
    codes = pattern[mat]
    factor = np.ones(n, np.float32)
    for code in np.unique(codes):
        sel = codes == code
        factor[sel] = pattern_factor(int(code), p[sel], axis[sel])
    emissive = np.isin(codes, [PATTERNS.index("emissive"), PATTERNS.index("window")])
    brightness = np.where(emissive, 1.0, brightness)
    colour = rgb[mat] * (factor * brightness)[:, None]
    return to_uint8(colour)


def camera_pose(x: float, z: float, yaw: float, eye_height: float) -> np.ndarray:
    """Upright camera-to-world pose at (x, z) and eye height, looking along yaw (radians, +z towards +x)."""
    c, s = math.cos(yaw), math.sin(yaw)
    pose = np.eye(4)
    pose[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    pose[:3, 3] = [x, -eye_height, z]
    return pose
