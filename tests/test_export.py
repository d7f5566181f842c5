"""`diffpano export`: a tour for nerfstudio (equirectangular cameras) and for COLMAP (cube faces), checked against
each tool's own camera model rather than against the exporter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import plain
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.geometry.spherical import make_pose, pixel_to_direction, yaw_matrix
from diffpano.io.manifest import Tour, commit_tours, decode_rgb, to_uint8

app = build_app()
H, W = 32, 64


def direction_coded_panorama(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 whose colour is each pixel's camera-frame direction, (d + 1) / 2: smooth, and unique per
    direction, so any image resampled from it says where each of its pixels looks."""
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    return to_uint8(((pixel_to_direction(u, v, height, width) + 1) / 2).numpy())


def poses() -> np.ndarray:
    """Three views along a path, each turned (yaw) and one tilted, so that no axis convention passes by luck."""
    tilt = torch.tensor([[1, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]],
                        dtype=torch.float64)
    rotations = [yaw_matrix(0.4), yaw_matrix(-1.1) @ tilt, yaw_matrix(2.5)]
    centres = [[0.0, 0.0, 0.0], [1.0, -0.2, 0.5], [2.0, 0.1, -0.7]]
    return np.stack([make_pose(r, torch.tensor(c, dtype=torch.float64)).numpy() for r, c in zip(rotations, centres,
                                                                                                   strict=True)])


@pytest.fixture
def output(tmp_path) -> str:
    """An output holding one three-view tour 'room' of direction-coded panoramas."""
    images = np.stack([direction_coded_panorama(H, W)] * 3)
    commit_tours(str(tmp_path / "out"), [Tour("room", images, ["a room"] * 3, poses(), 0, "m", 2, 5.0)])
    return str(tmp_path / "out")


def export(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["export", *args])
    return result.exit_code, plain(result.output)


def nerfstudio_direction(u: float, v: float, frame: dict, meta: dict) -> np.ndarray:
    """World direction of pixel (u, v) by nerfstudio's EQUIRECTANGULAR camera: pixel centres at +0.5, coordinates
    ((x - cx) / fx, -(y - cy) / fy), theta = -pi x, phi = pi (1/2 - y), camera direction
    (-sin theta sin phi, cos phi, -cos theta sin phi), turned by the frame's camera-to-world."""
    x = (u + 0.5 - meta["cx"]) / meta["fl_x"]
    y = -(v + 0.5 - meta["cy"]) / meta["fl_y"]
    theta, phi = -math.pi * x, math.pi * (0.5 - y)
    camera = np.array([-math.sin(theta) * math.sin(phi), math.cos(phi), -math.cos(theta) * math.sin(phi)])
    return np.asarray(frame["transform_matrix"])[:3, :3] @ camera


def test_a_nerfstudio_export_round_trips_and_its_rays_are_the_tours(output, tmp_path):
    out = tmp_path / "ns"
    code, text = export(output, "--tour", "room", "--format", "nerfstudio", "--out", str(out))
    assert code == 0 and "exported tour room (3 views) for nerfstudio: 4 files" in text, text
    meta = json.loads((out / "transforms.json").read_text())
    assert (meta["camera_model"], meta["w"], meta["h"]) == ("EQUIRECTANGULAR", W, H)
    expected = poses()
    rng = np.random.default_rng(0)
    for i, frame in enumerate(meta["frames"]):
        assert frame["file_path"] == f"images/{i:03d}.png"
        np.testing.assert_array_equal(decode_rgb((out / frame["file_path"]).read_bytes()),
                                      direction_coded_panorama(H, W))
        matrix = np.asarray(frame["transform_matrix"])
        np.testing.assert_allclose(matrix @ np.diag([1, -1, -1, 1]), expected[i], atol=1e-6)  # back to OpenCV
        for u, v in zip(rng.uniform(0, W - 1, 20), rng.uniform(0, H - 1, 20), strict=True):
            ours = expected[i][:3, :3] @ pixel_to_direction(torch.tensor(u), torch.tensor(v), H, W).numpy()
            np.testing.assert_allclose(nerfstudio_direction(u, v, frame, meta), ours, atol=1e-6)  # float32 poses


def test_a_colmap_export_reads_back_in_pycolmap_and_each_face_looks_where_its_pose_says(output, tmp_path):
    import pycolmap

    out = tmp_path / "colmap"
    code, text = export(output, "--tour", "room", "--format", "colmap", "--out", str(out), "--face-size", "12")
    assert code == 0 and "for colmap: 21 files" in text, text  # 18 faces and 3 model files
    model = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert model.num_images() == 18 and model.num_points3D() == 0
    [camera] = model.cameras.values()
    assert camera.model.name == "PINHOLE" and (camera.width, camera.height) == (12, 12)
    np.testing.assert_allclose(camera.params, [6, 6, 6, 6])  # 90 degrees: focal = half the side
    intrinsics_inv = np.linalg.inv(camera.calibration_matrix())
    expected = poses()
    centres = set()
    for image in model.images.values():
        view = int(image.name[:3])
        face = decode_rgb((out / "images" / image.name).read_bytes()).astype(np.float64) / 255  # COLMAP's layout
        assert face.shape == (12, 12, 3)
        world_from_cam = np.linalg.inv(np.vstack([image.cam_from_world().matrix(), [0, 0, 0, 1]]))
        np.testing.assert_allclose(world_from_cam[:3, 3], expected[view][:3, 3], atol=1e-6)  # the view's centre
        centres.add(tuple(np.round(world_from_cam[:3, 3], 6)))
        for a, b in [(0, 0), (11, 0), (5, 6), (3, 10), (11, 11)]:
            ray = world_from_cam[:3, :3] @ intrinsics_inv @ np.array([a + 0.5, b + 0.5, 1.0])
            in_pano = expected[view][:3, :3].T @ (ray / np.linalg.norm(ray))  # the panorama's camera frame
            np.testing.assert_allclose(face[b, a], (in_pano + 1) / 2, atol=0.06)  # the colour says where it looks
    assert len(centres) == 3


def test_an_export_from_s3_reads_the_tour_there(s3_endpoint, tmp_path):
    root = "s3://diffpano-test/export-src"
    commit_tours(root, [Tour("room", np.stack([direction_coded_panorama(H, W)] * 2), ["a room"] * 2, poses()[:2], 0,
                             "m", 2, 5.0)])
    code, text = export(root, "--tour", "room", "--out", str(tmp_path / "ns"))
    assert code == 0 and "(2 views) for nerfstudio" in text, text
    assert len(json.loads((tmp_path / "ns" / "transforms.json").read_text())["frames"]) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--tour", "room", "--format", "ply"], "--format: expected one of nerfstudio, colmap, got 'ply'"),
    (["--tour", "nowhere"], "--tour: tour_id: no tour 'nowhere'"),
    (["--tour", "room", "--format", "colmap", "--face-size", "0"], "--face-size"),
])
def test_bad_export_arguments_are_refused_naming_the_option(output, tmp_path, args, message):
    code, text = export(output, *args, "--out", str(tmp_path / "x"))
    assert code == 2 and message in text, text
    assert not (tmp_path / "x").exists()  # nothing written


def test_an_export_never_writes_over_files(output, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, text = export(output, "--tour", "room", "--out", str(out))
    assert code == 2 and "--out:" in text and "already holds files" in text, text
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert Path(out / "notes.txt").read_text() == "mine"
