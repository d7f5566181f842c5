"""docs/geometry.md geometry: pixels and directions, poses, spherical epipolar sampling."""

from __future__ import annotations

import math

import pytest
import torch

from diffpano.geometry import spherical as g


def random_pose(gen: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    """A random rotation and centre as a pose."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))
    return g.make_pose(q, torch.randn(3, generator=gen, dtype=torch.float64) * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("height", [4, 16, 33])
def test_pixel_direction_round_trip(dtype, height):
    width = 2 * height
    d = g.direction_grid(height, width, dtype)
    assert d.dtype == dtype and d.shape == (height, width, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones((), dtype=dtype), atol=1e-6)
    u, v = g.direction_to_pixel(d, height, width)
    vv, uu = torch.meshgrid(torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij")
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert (u - uu).abs().max() < tol and (v - vv).abs().max() < tol


def test_direction_conventions():
    h, w = 8, 16
    centre = g.pixel_to_direction(torch.tensor(w / 2 - 0.5), torch.tensor(h / 2 - 0.5), h, w)
    assert torch.allclose(centre, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # image centre looks along +z
    right = g.pixel_to_direction(torch.tensor(3 * w / 4 - 0.5), torch.tensor(h / 2 - 0.5), h, w)
    assert torch.allclose(right, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # columns to the right turn to +x
    top = g.pixel_to_direction(torch.tensor(0.0), torch.tensor(0.0), h, w)
    assert top[1] < -0.9  # the top row looks up (-y)


def test_sample_grid_matches_pixel_coordinates():
    d = torch.nn.functional.normalize(torch.randn(100, 3, dtype=torch.float64), dim=-1)
    h, w = 16, 32
    u, v = g.direction_to_pixel(d, h, w)
    grid = g.direction_to_sample_grid(d)
    assert torch.allclose((grid[:, 0] + 1) * w / 2 - 0.5, u, atol=1e-9)
    assert torch.allclose((grid[:, 1] + 1) * h / 2 - 0.5, v, atol=1e-9)


def epipolar_setup(n_views=3, k=2, h=8, w=16, s=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    poses = torch.stack([random_pose(gen) for _ in range(n_views)]).unsqueeze(0)
    idx, valid = g.nearest_views(poses, k)
    samples = g.epipolar_samples(poses, idx, valid, h, w, s, near=0.5, far=10.0)
    return poses, idx, valid, samples


def test_epipolar_samples_lie_on_the_positive_depth_arc():
    h, w = 8, 16
    poses, idx, _, s = epipolar_setup(h=h, w=w)
    r_st, c_st = g.relative_pose(poses.unsqueeze(-3).expand(1, 3, 2, 4, 4), poses[0][idx[0]].unsqueeze(0))
    ray = torch.einsum("...ij,pj->...pi", r_st.double(), g.direction_grid(h, w, torch.float64).reshape(-1, 3))
    c = c_st.double()[..., None, :].expand_as(ray)
    n = torch.nn.functional.normalize(torch.cross(c, ray, dim=-1), dim=-1)  # normal of the epipolar great circle
    d_s = s.source_dirs.double()
    assert (d_s * n.unsqueeze(-2)).sum(-1).abs().max() < 1e-5  # on the great circle
    # between the epipole (direction of c) and the point at infinity (direction of ray): positive depth only
    assert ((torch.cross(c.unsqueeze(-2).expand_as(d_s), d_s, dim=-1) * n.unsqueeze(-2)).sum(-1) > -1e-6).all()
    assert ((torch.cross(d_s, ray.unsqueeze(-2).expand_as(d_s), dim=-1) * n.unsqueeze(-2)).sum(-1) > -1e-6).all()


def test_sample_at_known_depth_lands_on_corresponding_pixel():
    h, w = 16, 32
    poses, idx, _, s = epipolar_setup(h=h, w=w, s=5)
    d = g.direction_grid(h, w, torch.float64).reshape(-1, 3)
    for t in range(3):
        for j in range(2):
            src = idx[0, t, j].item()
            for k in range(5):
                world = poses[0, t, :3, 3] + s.depth[k].double() * d @ poses[0, t, :3, :3].T
                d_s = (world - poses[0, src, :3, 3]) @ poses[0, src, :3, :3]
                u, v = g.direction_to_pixel(d_s, h, w)
                grid = s.grid[0, t, j, :, k].double()
                gu, gv = (grid[:, 0] + 1) * w / 2 - 0.5, (grid[:, 1] + 1) * h / 2 - 0.5
                du = torch.remainder(gu - u + w / 2, w) - w / 2  # compare longitudes modulo the seam
                assert du.abs().max() < 1e-2 and (gv - v).abs().max() < 1e-2


def test_sampling_crosses_the_longitude_seam():
    h, w = 16, 32
    theta = g.direction_to_angles(g.direction_grid(h, w))[0]
    features = torch.stack((theta.cos(), theta.sin())).unsqueeze(0)  # smooth, periodic in longitude
    ang = torch.linspace(math.pi - 0.3, math.pi + 0.3, 25)  # straddles theta = +-pi
    d = torch.stack((ang.sin(), torch.zeros_like(ang), ang.cos()), -1)
    grid = g.direction_to_sample_grid(d).view(1, 1, -1, 2)
    out = g.circular_grid_sample(features, grid)[0, :, 0]
    expected = torch.stack((ang.cos(), ang.sin()))
    assert (out - expected).abs().max() < 0.05  # bilinear error of a 32-column map; no jump at the seam
    plain = torch.nn.functional.grid_sample(features, grid, align_corners=False)[0, :, 0]
    assert (plain - expected).abs().max() > 0.3  # without the circular wrap the seam shows


def test_epipolar_grid_crosses_seam_for_cameras_side_by_side():
    # the reference camera stands 1 m in front of the target: samples of rays looking back cross theta = +-pi
    poses = torch.stack([g.make_pose(torch.eye(3, dtype=torch.float64), torch.tensor(c, dtype=torch.float64))
                         for c in ([0.0, 0, 0], [0.0, 0, 1.0])]).unsqueeze(0)
    idx, valid = g.nearest_views(poses, 1)
    s = g.epipolar_samples(poses, idx, valid, 8, 16, 8)
    back = s.grid[0, 0, 0, :, :, 0]
    assert (back.abs() > 0.9).any() and s.mask.all()


@pytest.mark.parametrize(
    "pose, message",
    [
        ([float("nan")] + [0.0] * 15, "finite"),
        ([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, float("inf"), 0, 0, 0, 1], "finite"),
        ([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1], "last row"),
        ([2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1], "orthonormal"),
        ([-1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1], "determinant"),
        ([1, 0, 0], "16 numbers"),
    ],
)
def test_invalid_poses_are_rejected(pose, message):
    with pytest.raises(ValueError, match=f"poses.*{message}"):
        g.validate_poses(pose, field="poses")


def test_invalid_pose_in_a_list_is_named():
    good = torch.eye(4).reshape(16).tolist()
    bad = list(good)
    bad[0] = 0.5
    with pytest.raises(ValueError, match=r"poses\[1\].*orthonormal"):
        g.validate_poses([good, bad])


def test_nearest_views_and_padding():
    centres = torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 0, 3], [0, 0, 6]], dtype=torch.float64)
    poses = g.make_pose(torch.eye(3, dtype=torch.float64).expand(4, 3, 3), centres).unsqueeze(0)
    idx, valid = g.nearest_views(poses, 2)
    assert idx[0].tolist() == [[1, 2], [0, 2], [1, 3], [2, 1]] and valid.all()
    idx, valid = g.nearest_views(poses[:, :2], 3)
    assert valid[0].tolist() == [[True, False, False], [True, False, False]]
    assert idx[0, 0, 0] == 1 and idx[0, 1, 0] == 0


def test_size_checks():
    with pytest.raises(ValueError, match="width = 2"):
        g.check_panorama_size(16, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        g.check_panorama_size(12, 24, multiple=8)
    with pytest.raises(ValueError, match="num_samples"):
        g.inverse_depth_samples(0, 0.3, 10)
    with pytest.raises(ValueError, match="near"):
        g.inverse_depth_samples(4, 5.0, 1.0)


def test_inverse_depth_samples_are_uniform_in_inverse_depth():
    d = g.inverse_depth_samples(8, 0.5, 20.0, torch.float64)
    steps = (1 / d).diff()
    assert (d.diff() > 0).all() and torch.allclose(steps, steps[0].expand_as(steps))
    assert 0.5 < d[0] and d[-1] < 20.0
