"""Tests of diffpano.geometry.projection: perspective crops and cube maps against analytic panoramas."""

from __future__ import annotations

import math

import pytest
import torch

from diffpano.geometry.projection import (
    CUBE_FACES,
    cube_face_rays,
    cubemap_to_equirect,
    equirect_to_cubemap,
    equirect_to_perspective,
    perspective_rays,
)
from diffpano.geometry.spherical import direction_grid


def smooth(d: torch.Tensor) -> torch.Tensor:
    """Colours (..., 3) = (d + 1) / 2 of unit directions (..., 3)."""
    return (d + 1) / 2


def smooth_pano(height: int = 256, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (3, H, 2H) panorama whose colour at each pixel is smooth(direction)."""
    return smooth(direction_grid(height, 2 * height, dtype)).permute(2, 0, 1)


def expected_direction(yaw_deg: float, pitch_deg: float) -> torch.Tensor:
    """docs/geometry.md direction with longitude yaw and latitude pitch."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    return torch.tensor([math.cos(p) * math.sin(y), -math.sin(p), math.cos(p) * math.cos(y)], dtype=torch.float64)


@pytest.mark.parametrize("yaw, pitch", [(0, 0), (90, 0), (-90, 0), (180, 0), (30, 45), (-120, -60), (0, 90)])
def test_centre_ray_points_at_yaw_and_pitch(yaw: float, pitch: float) -> None:
    rays = perspective_rays(5, 7, 60.0, yaw, pitch, torch.float64)
    assert rays.shape == (5, 7, 3)
    torch.testing.assert_close(rays[2, 3], expected_direction(yaw, pitch), atol=1e-12, rtol=0)
    torch.testing.assert_close(rays.norm(dim=-1), torch.ones(5, 7, dtype=torch.float64))


def test_ray_axes_follow_the_camera_convention() -> None:
    rays = perspective_rays(9, 9, 90.0, 0.0, 0.0, torch.float64)
    assert rays[4, -1, 0] > 0.6  # right column looks towards +x
    assert rays[0, 4, 1] < -0.6  # top row looks up, towards -y
    # 90-degree field of view: the outer pixel centres sit half a pixel inside the +-45 degree edges.
    edge = math.atan2(rays[4, -1, 0].item(), rays[4, -1, 2].item())
    assert edge == pytest.approx(math.atan(8 / 9), abs=1e-12)
    # Square pixels: the vertical angle of the top row equals the horizontal angle of the right column.
    assert math.atan2(-rays[0, 4, 1].item(), rays[0, 4, 2].item()) == pytest.approx(edge, abs=1e-12)


def test_tensor_angles_add_leading_dims() -> None:
    yaws = torch.tensor([0.0, 90.0, 200.0])
    rays = perspective_rays(3, 3, 50.0, yaws, torch.tensor([10.0, 0.0, -20.0]), torch.float32)
    assert rays.shape == (3, 3, 3, 3) and rays.dtype == torch.float32
    torch.testing.assert_close(rays[2, 1, 1].double(), expected_direction(200, -20), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-4), (torch.float32, 2e-4)])
@pytest.mark.parametrize("yaw, pitch, fov", [(0, 0, 90), (135, 20, 60), (-60, -50, 120), (20, 85, 90)])
def test_crop_matches_smooth_function_of_ray(dtype, atol, yaw, pitch, fov) -> None:
    pano = smooth_pano(256, dtype)
    crop = equirect_to_perspective(pano, fov, yaw, pitch, 48, 64)
    assert crop.shape == (3, 48, 64) and crop.dtype == dtype
    expected = smooth(perspective_rays(48, 64, fov, yaw, pitch, torch.float64)).permute(2, 0, 1)
    torch.testing.assert_close(crop.double(), expected, atol=atol, rtol=0)


def test_crop_across_the_seam_is_continuous() -> None:
    pano = smooth_pano(256)
    crop = equirect_to_perspective(pano, 90.0, 180.0, 0.0, 32, 64)
    expected = smooth(perspective_rays(32, 64, 90.0, 180.0, 0.0, torch.float64)).permute(2, 0, 1)
    # A sampler that clamps at the border instead of wrapping is off by ~3e-3 next to the seam.
    torch.testing.assert_close(crop, expected, atol=1e-4, rtol=0)
    steps = (crop[..., 1:] - crop[..., :-1]).abs().amax(dim=(0, 1))  # max jump between neighbouring columns
    assert steps[31] <= 1.2 * max(steps[30], steps[32])


def test_crop_across_the_seam_of_a_striped_panorama() -> None:
    # Left half of the panorama 0, right half 1: a crop centred on the seam (yaw 180) shows 1 on its left, 0 on
    # its right, and the blend of columns W-1 and 0 only in its two centre columns.
    pano = torch.zeros(1, 64, 128, dtype=torch.float64)
    pano[..., 64:] = 1.0
    crop = equirect_to_perspective(pano, 90.0, 180.0, 0.0, 8, 64)[0]
    assert (crop[:, :31] - 1).abs().max() < 1e-12 and crop[:, 33:].abs().max() < 1e-12
    assert 0.1 < crop[0, 31] < 0.9 and 0.1 < crop[0, 32] < 0.9


def test_batched_and_multi_view_crops_match_single_crops() -> None:
    pano = smooth_pano(64, torch.float32)
    batch = torch.stack((pano, pano.flip(-1)))
    yaws, pitches = torch.tensor([10.0, -100.0]), torch.tensor([0.0, 30.0])
    per_batch = equirect_to_perspective(batch, 70.0, yaws, pitches, 12, 16)
    multi = equirect_to_perspective(pano, 70.0, yaws, pitches, 12, 16)
    shared = equirect_to_perspective(batch, 70.0, 45.0, 0.0, 12, 16)
    assert per_batch.shape == multi.shape == shared.shape == (2, 3, 12, 16)
    for i in range(2):
        yaw, pitch = yaws[i].item(), pitches[i].item()
        torch.testing.assert_close(per_batch[i], equirect_to_perspective(batch[i], 70.0, yaw, pitch, 12, 16))
        torch.testing.assert_close(multi[i], equirect_to_perspective(pano, 70.0, yaw, pitch, 12, 16))
        torch.testing.assert_close(shared[i], equirect_to_perspective(batch[i], 70.0, 45.0, 0.0, 12, 16))


def test_face_orientation() -> None:
    rays = cube_face_rays(9, torch.float64)
    axes = [(0, 0, 1), (1, 0, 0), (0, 0, -1), (-1, 0, 0), (0, -1, 0), (0, 1, 0)]
    for name, ray, axis in zip(CUBE_FACES, rays, axes, strict=True):
        torch.testing.assert_close(ray[4, 4], torch.tensor(axis, dtype=torch.float64), msg=name)
    up, down = rays[CUBE_FACES.index("up")], rays[CUBE_FACES.index("down")]
    assert up[0, 4, 2] < -0.6 and up[-1, 4, 2] > 0.6  # up face: top edge towards the back, bottom towards the front
    assert down[0, 4, 2] > 0.6 and down[-1, 4, 2] < -0.6  # down face: top edge towards the front
    assert up[4, -1, 0] > 0.6 and down[4, -1, 0] > 0.6  # image right is +x on both


def test_cubemap_face_centres_match_the_face_axes() -> None:
    pano = smooth_pano(256)
    faces = equirect_to_cubemap(pano, 33)
    assert faces.shape == (6, 3, 33, 33)
    centres = faces[:, :, 16, 16]
    expected = smooth(cube_face_rays(33, torch.float64)[:, 16, 16])
    torch.testing.assert_close(centres[:4], expected[:4], atol=1e-4, rtol=0)
    # The panorama has no sample at the poles: its first/last rows sit pi/(2H) away, an error of sin(pi/512)/2.
    torch.testing.assert_close(centres[4:], expected[4:], atol=4e-3, rtol=0)
    all_rays = smooth(cube_face_rays(33, torch.float64)).permute(0, 3, 1, 2)
    torch.testing.assert_close(faces[:4], all_rays[:4], atol=1e-4, rtol=0)
    torch.testing.assert_close(faces[4:], all_rays[4:], atol=4e-3, rtol=0)


def test_cubemap_to_equirect_of_analytic_faces() -> None:
    faces = smooth(cube_face_rays(64, torch.float64)).permute(0, 3, 1, 2)  # exact faces, independent of the pano
    pano = cubemap_to_equirect(faces, 128, 256)
    expected = smooth_pano(128)
    # Bilinear error inside faces is ~1e-5; clamping the outer half pixel of each face costs up to ~4e-3.
    err = (pano - expected).abs()
    assert err.max() < 6e-3 and err.mean() < 2e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cubemap_round_trip(dtype: torch.dtype) -> None:
    pano = smooth_pano(256, dtype)
    back = cubemap_to_equirect(equirect_to_cubemap(pano, 128), 256, 512)
    assert back.shape == pano.shape and back.dtype == dtype
    err = (back - pano).abs().amax(dim=(0, 2))  # worst error per row
    rows = torch.arange(256)
    latitude = 90 - 180 * (rows + 0.5) / 256
    assert err[latitude.abs() < 60].max() < 3e-3
    assert err.max() < 6e-3  # at the poles too
    assert (back - pano).abs().mean() < 1e-4


def test_batched_cubemap_round_trip() -> None:
    panos = torch.stack((smooth_pano(64, torch.float32), 1 - smooth_pano(64, torch.float32)))
    faces = equirect_to_cubemap(panos, 32)
    assert faces.shape == (2, 6, 3, 32, 32)
    torch.testing.assert_close(faces[1], equirect_to_cubemap(panos[1], 32))
    back = cubemap_to_equirect(faces, 64, 128)
    assert back.shape == (2, 3, 64, 128)
    torch.testing.assert_close(back[1], cubemap_to_equirect(faces[1], 64, 128))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda p: equirect_to_perspective(p[0, 0], 90, 0, 0, 8, 8), "pano"),  # 2-D
        (lambda p: equirect_to_perspective(p[..., :50], 90, 0, 0, 8, 8), "pano"),  # W != 2H
        (lambda p: equirect_to_perspective((p * 255).to(torch.uint8), 90, 0, 0, 8, 8), "pano"),
        (lambda p: equirect_to_perspective(p, 0, 0, 0, 8, 8), "fov_deg"),
        (lambda p: equirect_to_perspective(p, 180, 0, 0, 8, 8), "fov_deg"),
        (lambda p: equirect_to_perspective(p, -10, 0, 0, 8, 8), "fov_deg"),
        (lambda p: equirect_to_perspective(p, 90, 0, 0, 0, 8), "out_height"),
        (lambda p: equirect_to_perspective(p, 90, 0, 0, 8, -1), "out_width"),
        (lambda p: equirect_to_perspective(p, 90, float("nan"), 0, 8, 8), "yaw_deg"),
        (lambda p: equirect_to_perspective(p.expand(3, -1, -1, -1), 90, torch.zeros(2), 0, 8, 8), "yaw_deg"),
        (lambda p: perspective_rays(0, 8, 90), "height"),
        (lambda p: perspective_rays(8, 8, 200), "fov_deg"),
        (lambda p: equirect_to_cubemap(p, 0), "face_size"),
        (lambda p: equirect_to_cubemap(p[..., :50], 8), "pano"),
        (lambda p: cubemap_to_equirect(torch.zeros(5, 3, 8, 8), 16, 32), "faces"),
        (lambda p: cubemap_to_equirect(torch.zeros(6, 3, 8, 9), 16, 32), "faces"),
        (lambda p: cubemap_to_equirect(torch.zeros(6, 3, 8, 8), 0, 32), "height"),
        (lambda p: cubemap_to_equirect(torch.zeros(6, 3, 8, 8), 16, 30), "width"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name: str) -> None:
    pano = smooth_pano(32, torch.float32).unsqueeze(0)
    with pytest.raises(ValueError, match=name):
        call(pano)
