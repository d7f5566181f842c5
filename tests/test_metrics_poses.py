"""Camera-pose recovery as a 3D consistency metric: the similarity alignment on constructed poses, then the rig SfM on
rendered tours (the control, within 1 degree at the bundled model's 128x256), the same views shuffled (clearly
worse) and a featureless tour (nothing registers)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import generate_scene
from diffpano.data.procedural.walks import clip_poses
from diffpano.geometry.trajectories import walk
from diffpano.metrics.poses import align_similarity, path_length, pose_errors, pose_recovery


def moved(poses: np.ndarray, scale: float, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Camera-to-world poses expressed in another world: x' = scale * rotation @ x + shift."""
    out = poses.copy()
    out[:, :3, :3] = rotation @ poses[:, :3, :3]
    out[:, :3, 3] = scale * poses[:, :3, 3] @ rotation.T + shift
    return out


def test_alignment_undoes_a_similarity_even_on_a_straight_walk():
    """A straight walk's centres leave the roll about the line free; the rotations pin it down."""
    requested = walk(6).numpy().astype(np.float64)
    rotation = Rotation.from_euler("xyz", [20, -70, 35], degrees=True).as_matrix()
    estimated = moved(requested, 0.3, rotation, np.array([4.0, -1.0, 2.0]))
    scale, r, t = align_similarity(estimated, requested)
    assert scale == pytest.approx(1 / 0.3) and np.allclose(r, rotation.T, atol=1e-9)
    angles, distances = pose_errors(estimated, requested)
    assert angles.max() < 1e-5 and distances.max() < 1e-9
    assert path_length(requested) == pytest.approx(5.0)


def test_one_view_turned_by_ten_degrees_shows_in_its_error():
    requested = walk(8, turn_deg=15.0).numpy().astype(np.float64)
    estimated = requested.copy()
    estimated[3, :3, :3] = Rotation.from_euler("y", 10, degrees=True).as_matrix() @ estimated[3, :3, :3]
    angles, _ = pose_errors(estimated, requested)
    assert angles[3] == pytest.approx(10 * 7 / 8, abs=0.05)  # the mean rotation follows 1/8 of the turn
    assert np.delete(angles, 3) == pytest.approx(np.full(7, 10 / 8), abs=0.05)


@pytest.fixture(scope="module")
def rendered_tour():
    """Eight renders 128x256 of a walk through procedural scene 3, and their poses."""
    scene = generate_scene(3)
    poses = clip_poses(scene, 8, 0.5, np.random.default_rng(3))
    renderer = SceneMeshRenderer(scene)
    return np.stack([renderer.render(p, 128, 256).rgb for p in poses]), poses


def test_renders_recover_their_poses_and_shuffled_views_do_not(rendered_tour):
    images, poses = rendered_tour
    control = pose_recovery(images, poses, threads=2)
    assert control["pose_registered"] == 1.0
    assert control["pose_rotation_error_deg"] <= 1.0 and control["pose_translation_error"] <= 0.01, control
    shuffled = pose_recovery(images[[2, 4, 3, 6, 5, 0, 1, 7]], poses, threads=2)
    assert shuffled["pose_rotation_error_deg"] > 3 * max(control["pose_rotation_error_deg"], 1.0), shuffled
    assert shuffled["pose_translation_error"] > 0.1, shuffled


def test_a_featureless_tour_registers_nothing(rendered_tour):
    _, poses = rendered_tour
    plain = np.full((8, 128, 256, 3), 128, dtype=np.uint8)
    assert pose_recovery(plain, poses) == {"pose_registered": 0.0, "pose_rotation_error_deg": None,
                                           "pose_translation_error": None}
