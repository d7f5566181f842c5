"""Consistency and seam metrics on cases with known answers: procedural renders, shuffled views, blank images."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffpano.data.procedural.build import ProceduralSpec, render_clips
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import generate_scene
from diffpano.data.procedural.walks import room_orbit
from diffpano.data.proxy import rendered
from diffpano.metrics.consistency import (
    epipolar_consistency,
    loop_closure,
    normalised_reprojection,
    reprojection_scores,
)
from diffpano.metrics.seam import seam_scores


@pytest.fixture(scope="module")
def clips():
    """Two procedural clips of four keyframes 0.5 m apart, 64x128, with depth."""
    spec = ProceduralSpec(scenes=2, clips_per_scene=1, frames=4, height=64, width=128, seed=11)
    return render_clips(spec, 0, [0]) + render_clips(spec, 1, [0])


def test_epipolar_consistency_separates_true_tours_from_shuffled_and_unrelated(clips):
    a, b = clips
    true = epipolar_consistency(a.rgb, a.poses, unrelated=b.rgb)
    shuffled = epipolar_consistency(a.rgb[[2, 0, 3, 1]], a.poses)
    assert true["epipolar_error"] < 0.6 * true["epipolar_error_unrelated"]
    assert true["epipolar_score"] > 0.4
    assert true["epipolar_score"] > shuffled["epipolar_score"] + 0.2


def test_loop_closure_of_a_rendered_orbit_is_near_one_and_rises_when_its_last_view_shows_another_scene():
    orbits = [rendered(SceneMeshRenderer(scene), room_orbit(scene, 8), 64, 128)
              for scene in (generate_scene(5), generate_scene(6))]
    closed = loop_closure(orbits[0].rgb, orbits[0].poses)
    broken = loop_closure(np.concatenate([orbits[0].rgb[:7], orbits[1].rgb[7:]]), orbits[0].poses)
    assert 0.8 < closed["ratio"] < 1.25 and 0.9 < closed["control"] < 1.2
    assert broken["closing"] > 1.5 * closed["closing"]
    assert broken["ratio"] > closed["ratio"] + 0.3


def test_blank_or_constant_views_are_not_perfectly_consistent(clips):
    a, _ = clips
    for value in (0, 128):
        blank = np.full_like(a.rgb, value)
        scores = epipolar_consistency(blank, a.poses)
        assert scores["epipolar_error"] == 0.0 and scores["epipolar_score"] == 0.0


def test_reprojection_of_ground_truth_is_high_and_normalises_to_one(clips):
    a, _ = clips
    gt = reprojection_scores(a.rgb, a.depth, a.poses)
    assert gt["reprojection_pairs"] == 6 and gt["reprojection_psnr"] > 20 and gt["reprojection_ssim"] > 0.6
    shuffled = normalised_reprojection(a.rgb[[2, 0, 3, 1]], a.rgb, a.depth, a.poses)
    assert shuffled["reprojection_psnr_ratio"] < 0.7 and shuffled["reprojection_ssim_ratio"] < 0.5
    noise = np.random.default_rng(0).integers(0, 256, a.rgb.shape).astype(np.uint8)
    assert normalised_reprojection(noise, a.rgb, a.depth, a.poses)["reprojection_ssim_ratio"] < 0.1
    same = normalised_reprojection(a.rgb, a.rgb, a.depth, a.poses)
    assert same["reprojection_psnr_ratio"] == pytest.approx(1.0)
    assert same["reprojection_ssim_ratio"] == pytest.approx(1.0)


def test_identical_views_give_capped_infinite_psnr(clips):
    a, _ = clips
    still = np.repeat(a.rgb[:1], 2, axis=0)
    poses = np.repeat(a.poses[:1], 2, axis=0)
    depth = np.repeat(a.depth[:1], 2, axis=0)
    scores = reprojection_scores(still, depth, poses)
    assert scores["reprojection_psnr"] == 100.0 and scores["reprojection_ssim"] == pytest.approx(1.0, abs=1e-3)
    assert math.isfinite(scores["reprojection_psnr"])


def test_seam_metric_is_unchanged_by_rolling_a_seamless_panorama_and_catches_a_cut(clips):
    a, _ = clips
    pano = a.rgb
    seamless = seam_scores(pano)["seam_colour_ratio"]
    rolled = seam_scores(np.roll(pano, pano.shape[2] // 3, axis=2))["seam_colour_ratio"]
    assert seamless < 2.5 and rolled < 2.5
    # A cut: the right half mirrored, so the image no longer wraps around at the seam.
    w = pano.shape[2]
    cut = np.concatenate([pano[:, :, : w // 2], np.roll(pano, w // 4, axis=1)[:, :, w // 2 :]], axis=2)
    cut_scores = seam_scores(np.roll(cut, w // 2, axis=2))  # move the internal cut onto the seam
    assert cut_scores["seam_colour_ratio"] > 2 * max(seamless, rolled)
    assert cut_scores["seam_gradient_ratio"] > seam_scores(pano)["seam_gradient_ratio"]


def test_bad_inputs_name_the_argument(clips):
    a, _ = clips
    with pytest.raises(ValueError, match="images"):
        epipolar_consistency(a.rgb[0], a.poses)
    with pytest.raises(ValueError, match="poses"):
        epipolar_consistency(a.rgb[:1], a.poses[:1])
