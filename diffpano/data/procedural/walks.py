"""Camera trajectories through procedural scenes: eye-height walks from room to room through doorways, and orbits
in a room."""

from __future__ import annotations

import math

import numpy as np

from diffpano.data.procedural.render import camera_pose
from diffpano.data.procedural.scenes import Opening, Room, Scene

APPROACH = 0.5  # metres from a doorway where the walk lines up to pass through it
ORBIT_RADII = (1.0, 0.8, 0.6, 0.4, 0.25)  # metres, tried largest first


def _door_points(door: Opening, room: Room) -> tuple[np.ndarray, np.ndarray]:
    """(approach point inside room, doorway centre) as (x, z)."""
    mid, inward = (door.lo + door.hi) / 2, room.inward(door)
    if door.axis == 0:
        return np.array([door.coord + inward * APPROACH, mid]), np.array([door.coord, mid])
    return np.array([mid, door.coord + inward * APPROACH]), np.array([mid, door.coord])


def room_route(scene: Scene, length: float, rng: np.random.Generator) -> np.ndarray:
    """Waypoints (M, 2) of a random walk at least `length` metres long, passing through doorways."""
    doors = scene.doorways()
    room = scene.rooms[int(rng.integers(len(scene.rooms)))]
    points = [room.meeting_point]
    travelled, previous = 0.0, None
    for _ in range(200):
        if travelled >= length:
            break
        options = [d for d in doors if room.index in d.rooms]
        if not options:  # an isolated room: pace between two points around the hub
            step = np.array([0.4, 0.0]) * (1 if len(points) % 2 else -1)
            nxt = [points[0] + step]
        else:
            forward = [d for d in options if d is not previous] or options
            door = forward[int(rng.integers(len(forward)))]
            other = scene.rooms[door.rooms[1] if door.rooms[0] == room.index else door.rooms[0]]
            a_in, centre = _door_points(door, room)
            a_out, _ = _door_points(door, other)
            nxt = [a_in, centre, a_out, other.meeting_point]
            room, previous = other, door
        for p in nxt:
            travelled += float(np.linalg.norm(p - points[-1]))
            points.append(p)
    return np.stack(points)


def resample(points: np.ndarray, spacing: float, count: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`count` points at equal arc length `spacing` along a polyline, and the travel direction at each."""
    seg = np.diff(points, axis=0)
    seg_len = np.linalg.norm(seg, axis=1)
    keep = seg_len > 1e-9
    seg, seg_len, starts = seg[keep], seg_len[keep], points[:-1][keep]
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    s = np.clip(offset + spacing * np.arange(count), 0, cum[-1])
    k = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1)
    frac = ((s - cum[k]) / seg_len[k])[:, None]
    return starts[k] + frac * seg[k], seg[k] / seg_len[k][:, None]


def clip_poses(scene: Scene, frames: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Camera-to-world poses (F, 4, 4) of keyframes `spacing` metres apart along a walk through the scene."""
    if frames < 1:
        raise ValueError(f"frames: need at least 1 keyframe, got {frames}")
    if not 0 < spacing <= 5:
        raise ValueError(f"spacing: keyframe spacing must be in (0, 5] metres, got {spacing}")
    route = room_route(scene, spacing * (frames - 1) + 1.0, rng)
    if len(route) < 2:
        route = np.stack([route[0], route[0] + [0.01, 0.0]])
    offset = float(rng.uniform(0, min(1.0, spacing)))
    xz, heading = resample(route, spacing, frames, offset)
    look = float(rng.normal(0, 0.3))  # the camera does not always face exactly along the walk
    yaws = np.arctan2(heading[:, 0], heading[:, 1]) + look + rng.normal(0, 0.05, frames)
    eye = scene.eye_height + float(rng.uniform(-0.05, 0.05))
    yaws = np.remainder(yaws + math.pi, 2 * math.pi) - math.pi
    return np.stack([camera_pose(x, z, float(y), eye) for (x, z), y in zip(xz, yaws, strict=True)])


def free_spot(scene: Scene, room: Room, x: float, z: float, clearance: float) -> bool:
    """True when a camera at (x, z) stands in the room, `clearance` metres clear of its walls and furniture."""
    if not room.contains(x, z, clearance) or scene.locate(x, z)[0] != room.index:
        return False
    for item in room.items:
        if item.mounted:
            continue
        lo, hi = item.bounds[0] - clearance, item.bounds[1] + clearance
        if lo[0] < x < hi[0] and lo[2] < z < hi[2]:
            return False
    return True


def room_orbit(scene: Scene, frames: int, clearance: float = 0.3) -> np.ndarray:
    """Poses (F, 4, 4) of a closed orbit at eye height in a room, each camera facing along the circle: the largest
    radius in ORBIT_RADII at which every camera stands `clearance` metres clear, around the hub or the centre of the
    largest room with space for it; ValueError if no room has."""
    if frames < 2:
        raise ValueError(f"frames: an orbit needs at least 2 keyframes, got {frames}")
    angles = np.arange(frames) * (2 * math.pi / frames)
    rooms = sorted(scene.rooms, key=lambda r: -float(np.prod(r.size)))
    for radius in ORBIT_RADII:
        for room in rooms:
            for cx, cz in dict.fromkeys([tuple(room.meeting_point), tuple(room.centre)]):
                xs, zs = cx + radius * np.sin(angles), cz - radius * np.cos(angles)
                if all(free_spot(scene, room, float(x), float(z), clearance) for x, z in zip(xs, zs, strict=True)):
                    return np.stack([camera_pose(float(x), float(z), float(math.pi / 2 - a), scene.eye_height)
                                     for x, z, a in zip(xs, zs, angles, strict=True)])
    raise ValueError(f"scene {scene.seed}: no room has space for an orbit of radius {ORBIT_RADII[-1]} m "
                     f"{clearance} m clear of walls and furniture")
