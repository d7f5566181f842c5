"""Datasets from textured meshes: loading each format, depth and texels against the built scene's analytic truth,
walks that keep clearance and pass the doorway, reprojection between keyframes, and `diffpano dataset render` on
Ray with failing meshes listed per scene and re-runs that add nothing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from mesh_rooms import (
    BOXES,
    COLOURS,
    DOOR,
    HEIGHT,
    floor_texel,
    write_glb,
    write_obj,
    write_ply,
    write_replica,
    write_semantic_sidecar,
)
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.data.manifest import read_dataset
from diffpano.data.meshes.build import MeshSpec, prepare_scene, render_mesh_clips
from diffpano.data.meshes.mesh import load_mesh
from diffpano.data.meshes.raycast import MeshRenderer
from diffpano.data.meshes.walkable import floor_map, walk_poses
from diffpano.data.procedural.render import erp_directions
from diffpano.geometry.reprojection import colour_agreement, warp
from diffpano.io import storage

H, W = 128, 256
EYE, CLEARANCE = 1.5, 0.3


@pytest.fixture(scope="module")
def glb(tmp_path_factory):
    """The two-room scene as GLB."""
    return write_glb(tmp_path_factory.mktemp("mesh") / "rooms.glb")


@pytest.fixture(scope="module")
def renderer(glb) -> MeshRenderer:
    return MeshRenderer(load_mesh(glb, up="y"))


def pose_at(x: float, z: float, yaw: float = 0.3) -> np.ndarray:
    """An upright camera at eye height over (x, z)."""
    c, s = np.cos(yaw), np.sin(yaw)
    pose = np.eye(4)
    pose[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    pose[:3, 3] = [x, -EYE, z]
    return pose


def test_each_format_loads_with_its_colours_labels_and_texture(glb, tmp_path):
    """GLB: semantic labels and the texture; OBJ + MTL: the texture; PLY: vertex colours; all in metres."""
    mesh = load_mesh(glb, up="y")
    assert set(mesh.labels) == {"floor", "wall", "ceiling", "window", "sofa", "bed", "table"}
    assert len(mesh.textures) == 1 and mesh.has_labels
    np.testing.assert_allclose(mesh.bounds[0], [0, -HEIGHT, 0], atol=1e-5)
    np.testing.assert_allclose(mesh.bounds[1], [8.1, 0, 4], atol=1e-5)
    down = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # looks at the floor (camera z = +y)
    obj = MeshRenderer(load_mesh(write_obj(tmp_path / "obj"), up="-y"))
    view = obj.render_directions(np.block([[down, np.array([[0.7], [-EYE], [1.3]])], [np.zeros((1, 3)), 1]]),
                                 np.array([[0.0, 0.0, 1.0]], np.float32))
    np.testing.assert_allclose(view.rgb[0], floor_texel(0.7, 1.3), atol=2)
    assert abs(view.depth[0] - EYE) < 1e-3
    ply = MeshRenderer(load_mesh(write_ply(tmp_path / "rooms.ply"), up="-y"))
    wall = ply.render(pose_at(1.0, 1.0, 0.0), H, W)
    assert not ply.mesh.has_labels
    np.testing.assert_allclose(wall.rgb[H // 2, W // 2], COLOURS["wall"], atol=1)  # looking at the wall z = 4
    with pytest.raises(ValueError, match="unit_scale"):
        load_mesh(glb, up="y", unit_scale=float("nan"))
    with pytest.raises(ValueError, match="horizontal extent"):
        load_mesh(glb, up="y", unit_scale=100.0)  # a 810 m building: centimetres read as metres


def room_a_distance(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Analytic range to room A's six planes (x 0..4, z 0..4, floor y 0, ceiling y -HEIGHT)."""
    lo, hi = np.array([0.0, -HEIGHT, 0.0]), np.array([4.0, 0.0, 4.0])
    with np.errstate(divide="ignore"):
        far = (np.where(dirs > 0, hi, lo) - origin) / dirs
    return np.min(np.where(far > 0, far, np.inf), axis=-1)


def test_depth_equals_the_analytic_distances_to_the_planes_within_1cm(renderer):
    pose = pose_at(1.2, 1.0)
    view = renderer.render(pose, H, W)
    dirs = erp_directions(H, W).reshape(-1, 3) @ pose[:3, :3].T
    truth = room_a_distance(pose[:3, 3], dirs).reshape(H, W)
    point = pose[:3, 3] + dirs.reshape(H, W, 3) * truth[..., None]
    labels = renderer.mesh.labels
    structure = np.isin(view.label, [labels.index(n) for n in ("wall", "floor", "ceiling")])
    doorway = (np.abs(point[..., 0] - 4.0) < 1e-6) & (point[..., 2] > DOOR[0]) & (point[..., 2] < DOOR[1])
    doorway &= -point[..., 1] < DOOR[2]
    checked = structure & ~doorway
    doorway &= (point[..., 2] > DOOR[0] + 0.15) & (point[..., 2] < DOOR[1] - 0.15)  # clear of the jambs,
    doorway &= (-point[..., 1] > 0.3) & (-point[..., 1] < DOOR[2] - 0.15)  # the floor and the lintel
    assert checked.mean() > 0.8
    error = np.abs(view.depth - truth)[checked]
    assert error.max() < 0.01, error.max()
    assert (view.label[doorway] != -1).all() and (view.depth[doorway] > truth[doorway] + 0.05).all()  # into room B


def test_colours_come_from_the_right_texels(renderer):
    """Floor pixels away from block edges have the texel colour at the hit point's UV; walls their vertex colour."""
    pose = pose_at(1.5, 2.0)
    view = renderer.render(pose, H, W)
    dirs = erp_directions(H, W).reshape(-1, 3) @ pose[:3, :3].T
    hit = pose[:3, 3] + dirs.reshape(H, W, 3) * view.depth[..., None]
    floor = view.label == renderer.mesh.labels.index("floor")
    texel = (hit[..., [0, 2]] * 0.5 % 1.0) * 64  # texture pixels; blocks are 8 wide
    inside = (np.abs(texel % 8 - 4) < 2.5).all(-1) & floor & (view.depth < 3.0)
    assert inside.sum() > 500
    expected = np.array([floor_texel(x, z) for x, z in hit[inside][:, [0, 2]]])
    assert np.abs(view.rgb[inside].astype(int) - expected).max() <= 2
    wall = view.label == renderer.mesh.labels.index("wall")
    np.testing.assert_allclose(view.rgb[wall], np.broadcast_to(COLOURS["wall"], view.rgb[wall].shape), atol=1)
    sofa = view.label == renderer.mesh.labels.index("sofa")
    assert sofa.any() and (view.rgb[sofa] == COLOURS["sofa"]).all()


def test_walks_keep_clearance_stay_on_the_floor_and_pass_the_doorway(renderer):
    fm = floor_map(renderer, EYE, CLEARANCE)
    assert fm.floor_y == 0.0 and fm.regions == 1  # both rooms are one region, through the doorway
    xs = fm.point(np.argwhere(fm.walkable))[:, 0]
    assert xs.min() < 2.0 and xs.max() > 6.0
    crossed = 0
    for seed in range(6):
        poses = walk_poses(fm, 12, 0.5, np.random.default_rng(seed))
        centres = poses[:, :3, 3].astype(np.float32)
        assert (renderer.distance(centres) >= CLEARANCE).all()  # no camera in or near geometry
        drop = renderer.cast(centres, np.tile(np.float32([0, 1, 0]), (len(centres), 1)))
        np.testing.assert_allclose(drop["t_hit"], EYE, atol=1e-4)  # over the floor, not furniture
        for lo, hi in BOXES.values():
            above = (centres[:, [0, 2]] > np.array(lo)[[0, 2]]) & (centres[:, [0, 2]] < np.array(hi)[[0, 2]])
            assert not above.all(1).any()
        step = np.linalg.norm(np.diff(centres[:, [0, 2]], axis=0), axis=1)
        assert (step <= 0.5 + 1e-4).all() and np.median(step) > 0.4  # keyframes `spacing` apart along the path
        crossed += bool((centres[:, 0] < 4.0).any() and (centres[:, 0] > 4.1).any())
    assert crossed >= 1


def test_reprojection_agrees_between_neighbouring_keyframes(glb):
    spec = MeshSpec(clips_per_scene=1, frames=6, height=256, width=512, spacing=0.5, seed=1)
    clip = render_mesh_clips(spec, "rooms", *prepare_scene(spec, str(glb)), [0])[0]
    shares = []
    for i in range(spec.frames - 1):
        moved = warp(clip.depth[i], clip.poses[i], clip.poses[i + 1], clip.depth[i + 1])
        shares.append(colour_agreement(clip.rgb[i], clip.rgb[i + 1], moved))
    assert min(shares) >= 0.95, shares
    assert all(re.search(r"(blue sofa|white bed|brown table)", c) for c in clip.captions), clip.captions


app = build_app()


def render(*args: str):
    """`diffpano dataset render` through the CLI."""
    result = CliRunner().invoke(app, ["dataset", "render", *args, "--quiet"])
    return result.exit_code, re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)


@pytest.fixture(scope="module")
def meshes(glb, tmp_path_factory):
    """One good scene and five bad ones: missing texture, empty, absurd scale, no floor, unreadable; and a PLY
    without labels (so without captions unless a captioner is given)."""
    import trimesh

    root = tmp_path_factory.mktemp("meshes")
    (root / "good").mkdir()
    (root / "good" / "rooms.glb").write_bytes(glb.read_bytes())
    obj = write_obj(root / "notexture")
    (obj.parent / "material_0.png").unlink(missing_ok=True)
    for png in obj.parent.glob("*.png"):
        png.unlink()
    (root / "empty.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nelement face 0\nend_header\n")
    big = trimesh.creation.box(extents=(900, 3, 900))
    (root / "huge.glb").write_bytes(trimesh.Scene({"wall": big}).export(file_type="glb"))
    (root / "nofloor.glb").write_bytes(trimesh.Scene({"wall": trimesh.creation.box(extents=(4, 0.1, 0.1))
                                                      .subdivide()}).export(file_type="glb"))
    (root / "broken.glb").write_bytes(b"glTF not really")
    write_ply(root / "unlabelled.ply")
    return root


def test_dataset_render_lists_failing_scenes_completes_the_rest_and_reruns_add_nothing(ray_local, meshes, tmp_path):
    out = tmp_path / "ds"
    args = [str(meshes / "**" / "*.*"), "--out", str(out), "--clips-per-scene", "2", "--frames", "3", "--size",
            "32x64", "--up", "y"]
    code, text = render(*args)
    assert code == 0, text
    assert "2 clips / 6 keyframes written" in text and "6 scene(s) failed" in text, text
    df = read_dataset(str(out)).to_pandas()
    assert len(df) == 6 and set(df.scene_id) == {"good-rooms"} and not df.duplicated(["clip_id", "frame_index"]).any()
    assert set(df.source_uri) == {str((meshes / "good" / "rooms.glb").resolve())}
    assert all(isinstance(c, str) and len(c) > 20 for c in df.caption)
    failures = [json.loads(line) for uri in storage.list_files(storage.join(str(out), "failures"), ".jsonl")
                for line in storage.read_bytes(uri).decode().splitlines()]
    errors = {f["scene"]: f["error"] for f in failures}
    assert set(errors) == {"notexture-floor", "empty", "huge", "nofloor", "broken", "unlabelled"}, errors
    assert "is missing" in errors["notexture-floor"] and "no triangles" in errors["empty"]
    assert "--unit-scale" in errors["huge"] and "floor" in errors["nofloor"] and "unreadable" in errors["broken"]
    assert "--captioner" in errors["unlabelled"]
    parts = sorted(p.name for p in (out / "manifest").iterdir())
    code, text = render(*args)
    assert code == 0 and "0 clips / 0 keyframes written (2 clips already there)" in text, text
    assert sorted(p.name for p in (out / "manifest").iterdir()) == parts


def test_a_scene_whose_worker_dies_is_a_failure_entry_and_the_others_complete(ray_local):
    """A task that kills its worker process on every retry becomes that scene's failure record."""
    from batch.dataset import _scene_failed
    from diffpano.data.sources import SceneJob, SceneResult
    from fanout.tasks import map_tasks

    def scene_task(spec, job, out):
        import os

        if job.scene == "crashes":
            os._exit(1)
        return SceneResult(job.scene, job.source, clips=len(job.clips), frames=3 * len(job.clips))

    items = [(None, SceneJob(name, f"/meshes/{name}.glb", (0, 1)), "out") for name in ("crashes", "fine")]
    results = {r.scene: r for r in map_tasks(scene_task, items, on_error=_scene_failed)}
    assert results["fine"].frames == 6 and results["fine"].error is None
    assert results["crashes"].clips == 0 and "Worker" in results["crashes"].error, results["crashes"]


@pytest.mark.parametrize(("extra", "field"), [
    (["--up", "x"], "up"), (["--unit-scale", "nan"], "unit_scale"), (["--camera-height", "9"], "camera_height"),
    (["--clearance", "0"], "clearance"), (["--size", "33x65"], "size"), (["--spacing", "-1"], "spacing"),
])
def test_bad_render_options_are_refused_naming_the_field(glb, tmp_path, extra, field):
    code, text = render(str(glb), "--out", str(tmp_path / "ds"), *extra)
    assert code == 2 and field in text, text
    assert not (tmp_path / "ds").exists()


def test_a_window_and_a_doorway_are_seen_from_room_a(renderer):
    """The window pane (1 cm in front of its wall) and room B's bed through the doorway both show in room A."""
    view = renderer.render(pose_at(2.0, 1.8, -np.pi / 2), H, W)
    labels = renderer.mesh.labels
    assert (view.label == labels.index("window")).sum() > 20 and (view.label == labels.index("bed")).any()


def test_textures_that_cannot_be_decoded_are_refused_not_rendered_white(glb, tmp_path):
    """A GLB using KHR_texture_basisu (HM3D's .basis.glb) names the extension instead of losing its textures."""
    import struct

    data = glb.read_bytes()
    (length,) = struct.unpack_from("<I", data, 12)
    doc = json.loads(data[20 : 20 + length])
    doc["extensionsUsed"] = [*doc.get("extensionsUsed", []), "KHR_texture_basisu"]
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    rest = data[20 + length :]
    body = struct.pack("<II", len(text), 0x4E4F534A) + text + rest
    path = tmp_path / "rooms.basis.glb"
    path.write_bytes(b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body)
    with pytest.raises(ValueError, match="KHR_texture_basisu"):
        load_mesh(path, up="y")


def test_hm3d_style_semantic_sidecars_label_the_textured_mesh(tmp_path):
    """X.glb with no category names + X.semantic.glb / X.semantic.txt: triangles take the sidecar's categories,
    and captions name the furniture."""
    from diffpano.data.meshes.labels import attach_labels

    path = write_glb(tmp_path / "TEEsavR23oF.basis.glb", named=False)
    assert not load_mesh(path, up="y").has_labels
    write_semantic_sidecar(tmp_path, "TEEsavR23oF")
    mesh = attach_labels(load_mesh(path, up="y"), path, "y", 1.0)
    assert {"wall", "floor", "sofa", "bed", "table", "window"} <= set(mesh.labels)
    assert (mesh.label_index >= 0).all()
    view = MeshRenderer(mesh).render(pose_at(1.2, 1.5, np.pi), H, W)  # facing the sofa
    assert (np.array(mesh.labels)[view.label[view.label >= 0]] == "sofa").sum() > 100
    spec = MeshSpec(clips_per_scene=1, frames=2, height=32, width=64, seed=0)
    clip = render_mesh_clips(spec, "TEEsavR23oF", *prepare_scene(spec, str(path)), [0])[0]
    assert any(re.search(r"(sofa|bed|table)", c) for c in clip.captions), clip.captions


def test_dataset_render_to_s3_writes_once(ray_local, s3_endpoint, glb):
    """Output to s3:// (the local endpoint): keyframes, depth and manifest, and a re-run adds nothing."""
    from batch.dataset import build_dataset
    from diffpano.io.depth import decode_depth

    spec = MeshSpec(clips_per_scene=1, frames=2, height=32, width=64, seed=2)
    out = "s3://diffpano-test/datasets/meshes"
    assert build_dataset(spec, out, [str(glb)], progress=False).frames_written == 2
    table = read_dataset(out).to_pandas()
    assert len(table) == 2 and set(table.scene_id) == {"rooms"}
    depth = decode_depth(storage.read_bytes(storage.join(out, table.depth_uri[0])))
    assert depth.shape == (32, 64) and 0.3 < depth[depth > 0].min() and depth.max() < 9.0
    summary = build_dataset(spec, out, [str(glb)], progress=False)
    assert summary.frames_written == 0 and summary.clips_present == 1 and not summary.failures


def test_replica_style_semantic_plys_label_the_mesh(tmp_path):
    """mesh.ply + habitat/mesh_semantic.ply (quads with object_id) + habitat/info_semantic.json: labels transfer."""
    from diffpano.data.meshes.labels import attach_labels

    path = write_replica(tmp_path / "room_0")
    mesh = attach_labels(load_mesh(path, up="-y"), path, "-y", 1.0)
    assert {"wall", "ceiling", "sofa", "bed", "table", "window"} <= set(mesh.labels)
    assert (mesh.label_index >= 0).all()
    view = MeshRenderer(mesh).render(pose_at(1.2, 1.5, np.pi), H, W)
    assert (np.array(mesh.labels)[view.label[view.label >= 0]] == "sofa").sum() > 100
