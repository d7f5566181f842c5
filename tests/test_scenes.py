"""Procedural scenes: determinism, the vocabulary the issue asks for, and furniture that leaves walks free."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from diffpano.data.procedural.materials import WALL_COLOURS
from diffpano.data.procedural.scenes import ROOM_TYPES, WALL_THICKNESS, generate_scene
from diffpano.data.procedural.walks import clip_poses, room_orbit, room_route

SEEDS = range(60)


@pytest.fixture(scope="module")
def scenes():
    """Sixty scenes, enough to see every type, colour and floor."""
    return [generate_scene(s) for s in SEEDS]


def _summary(scene):
    return [(r.kind, r.wall, r.floor, r.x0, r.x1, r.z0, r.z1, [(i.noun, i.colour, len(i.boxes)) for i in r.items])
            for r in scene.rooms]


def test_same_seed_same_scene_and_different_seeds_differ():
    assert _summary(generate_scene(7)) == _summary(generate_scene(7))
    assert _summary(generate_scene(7)) != _summary(generate_scene(8))


def test_vocabulary_covers_room_types_palette_floors_and_furniture(scenes):
    kinds = Counter(r.kind for s in scenes for r in s.rooms)
    walls = {r.wall for s in scenes for r in s.rooms}
    floors = {r.floor.split()[-1] for s in scenes for r in s.rooms}
    nouns = {i.noun for s in scenes for r in s.rooms for i in r.items}
    assert set(ROOM_TYPES) <= set(kinds)
    assert walls == set(WALL_COLOURS) and len(walls) >= 12
    assert {"wood", "carpet", "tile", "stone"} <= floors
    assert {"bed", "sofa", "dining table", "desk", "wardrobe", "bathtub", "toilet", "kitchen counter"} <= nouns
    assert all(any(o.kind == "window" for o in s.openings) for s in scenes[:20])
    assert sum(any(o.kind == "door" for o in s.openings) for s in scenes) > len(scenes) // 2


def test_main_item_of_each_room_type_is_usually_there(scenes):
    main = {"bedroom": "bed", "living room": "sofa", "kitchen": "kitchen counter", "bathroom": "bathtub",
            "office": "desk"}
    for kind, noun in main.items():
        rooms = [r for s in scenes for r in s.rooms if r.kind == kind]
        share = np.mean([any(i.noun == noun for i in r.items) for r in rooms])
        assert share >= 0.8, (kind, share)


def test_doorways_connect_rooms_and_walls_have_thickness(scenes):
    for scene in scenes:
        groups = {r.index: {r.index} for r in scene.rooms}
        for d in scene.doorways():
            merged = groups[d.rooms[0]] | groups[d.rooms[1]]
            for i in merged:
                groups[i] = merged
        assert len(groups[0]) >= 2
        for d in scene.doorways():
            a, b = (scene.rooms[i] for i in d.rooms)
            assert abs(abs(a.wall_coord(d) - b.wall_coord(d)) - WALL_THICKNESS) < 1e-9


def test_furniture_stays_inside_its_room_without_overlaps(scenes):
    for scene in scenes:
        for room in scene.rooms:
            rects = []
            for item in room.items:
                lo, hi = item.bounds
                assert room.x0 - 1e-9 <= lo[0] and hi[0] <= room.x1 + 1e-9
                assert room.z0 - 1e-9 <= lo[2] and hi[2] <= room.z1 + 1e-9
                assert -scene.height - 1e-9 <= lo[1] and hi[1] <= 1e-9
                if not item.mounted:
                    rects.append((lo[0], hi[0], lo[2], hi[2]))
            for i, a in enumerate(rects):
                for b in rects[i + 1 :]:
                    assert not (a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3])


def _spaced_along(route: np.ndarray, points: np.ndarray, spacing: float) -> bool:
    """True when points[i] is the point of the polyline `route` at arc length s0 + i * spacing for some s0 where
    points[0] lies on it (every such s0 is tried: a route may pass the same place twice)."""
    seg = np.diff(route, axis=0)
    length = np.linalg.norm(seg, axis=1)
    keep = length > 1e-9
    starts, seg, length = route[:-1][keep], seg[keep], length[keep]
    cum = np.concatenate([[0.0], np.cumsum(length)])

    def at(s: float) -> np.ndarray:
        j = min(int(np.searchsorted(cum, s, side="right")) - 1, len(seg) - 1)
        return starts[j] + (s - cum[j]) / length[j] * seg[j]

    firsts = []
    for j in range(len(seg)):
        t = float(np.clip(np.dot(points[0] - starts[j], seg[j]) / length[j] ** 2, 0, 1))
        if np.linalg.norm(starts[j] + t * seg[j] - points[0]) < 1e-6:
            firsts.append(cum[j] + t * length[j])
    return any(
        s0 + spacing * (len(points) - 1) <= cum[-1] + 1e-9
        and all(np.linalg.norm(at(s0 + spacing * i) - p) < 1e-6 for i, p in enumerate(points))
        for s0 in firsts
    )


def test_walks_stay_at_eye_height_inside_rooms_and_pass_from_room_to_room(scenes):
    rooms_visited = []
    for k, scene in enumerate(scenes[:20]):
        poses = clip_poses(scene, 16, 0.5, np.random.default_rng(k))
        centres = poses[:, :3, 3]
        # Keyframes are 0.5 m apart along the walk's route: the straight line between two of them is never longer
        # (shorter where the route turns a corner), and keyframe i is the route's point at arc length s0 + 0.5 i.
        steps = np.linalg.norm(np.diff(centres[:, [0, 2]], axis=0), axis=1)
        assert steps.max() <= 0.5 + 1e-6, steps
        route = room_route(scene, 0.5 * 15 + 1.0, np.random.default_rng(k))  # clip_poses draws its route first
        assert _spaced_along(route, centres[:, [0, 2]], 0.5), (k, steps)
        assert np.allclose(centres[:, 1], centres[0, 1]) and 1.4 < -centres[0, 1] < 1.7
        located = [scene.locate(x, z) for x, z in centres[:, [0, 2]]]
        assert all(room >= 0 for room, _ in located)
        rooms_visited.append(len({room for room, door in located if door is None}))
        # No keyframe inside furniture: every camera is at least 0.3 m from every item footprint.
        for x, z in centres[:, [0, 2]]:
            for item in scene.rooms[scene.locate(x, z)[0]].items:
                lo, hi = item.bounds
                gap = np.hypot(max(lo[0] - x, 0, x - hi[0]), max(lo[2] - z, 0, z - hi[2]))
                assert item.mounted or gap > 0.3
    assert np.mean(np.array(rooms_visited) >= 2) >= 0.7


def test_room_orbits_close_at_eye_height_clear_of_furniture_facing_along_the_circle(scenes):
    for scene in scenes[:20]:
        poses = room_orbit(scene, 16)
        centres = poses[:, :3, 3][:, [0, 2]]
        middle = centres.mean(0)
        radius = np.linalg.norm(centres - middle, axis=1)
        assert np.allclose(radius, radius[0]) and 0.25 - 1e-9 <= radius[0] <= 1.0 + 1e-9
        assert np.allclose(poses[:, 1, 3], -scene.eye_height)
        assert len({scene.locate(x, z)[0] for x, z in centres}) == 1
        # The forward axis (+z of the camera) is the circle's tangent, the same way round at every camera.
        forward = poses[:, :3, 2][:, [0, 2]]
        tangent = np.roll(centres, -1, axis=0) - np.roll(centres, 1, axis=0)
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        assert np.allclose(forward, tangent, atol=1e-6)
        for x, z in centres:
            for item in scene.rooms[scene.locate(x, z)[0]].items:
                lo, hi = item.bounds
                assert item.mounted or not (lo[0] - 0.3 < x < hi[0] + 0.3 and lo[2] - 0.3 < z < hi[2] + 0.3)


def test_room_orbit_refuses_too_few_views_and_a_clearance_no_room_has():
    with pytest.raises(ValueError, match="frames"):
        room_orbit(generate_scene(0), 1)
    with pytest.raises(ValueError, match="no room has space"):
        room_orbit(generate_scene(0), 8, clearance=10.0)


def test_walk_rejects_bad_settings():
    scene = generate_scene(0)
    with pytest.raises(ValueError, match="frames"):
        clip_poses(scene, 0, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="spacing"):
        clip_poses(scene, 4, -1.0, np.random.default_rng(0))
