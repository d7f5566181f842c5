"""Evaluation metrics on constructed cases with known answers: views, FID/IS/CLIP, PSNR/SSIM/LPIPS, FAED."""

from __future__ import annotations

import json
import math

import lpips_reference
import numpy as np
import pytest
import torch
from torch import nn

from diffpano.data.procedural.build import ProceduralSpec, render_clips
from diffpano.geometry.projection import equirect_to_perspective
from diffpano.metrics import distribution, faed, features, paired, seam, views
from diffpano.metrics import lpips as lpips_metric
from diffpano.metrics.features import MissingWeights, SmallFeatureNet, SmallTextImageScorer


def _procedural(scene: int, frames: int = 8, height: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Rendered procedural panoramas (frames, 3, H, 2H) uint8 of one scene, and their captions."""
    spec = ProceduralSpec(scenes=scene + 1, clips_per_scene=1, frames=frames, height=height, width=2 * height,
                          depth=False)
    clip = render_clips(spec, scene, [0])[0]
    return torch.from_numpy(clip.rgb).permute(0, 3, 1, 2).contiguous(), list(clip.captions)


@pytest.fixture(scope="module")
def scenes() -> dict:
    """Two procedural scenes of 12 panoramas at 32x64, and uniform noise panoramas."""
    a, captions = _procedural(0, 12)
    b, _ = _procedural(1, 12)
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return {"a": a, "b": b, "noise": noise, "captions": captions}


def _noisy(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """uint8 images plus Gaussian noise of std (in 0..255 units)."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


# --- views -------------------------------------------------------------------------------------------------------


def test_views_have_the_documented_shapes_and_keep_the_dtype(scenes):
    p = scenes["a"][:2]
    assert views.full(p) is p
    assert views.rolled(p).shape == p.shape
    crops = views.random_crops(p, n=5, size=16, seed=1)
    assert crops.shape == (10, 3, 16, 16) and crops.dtype == torch.uint8
    horizontal = views.horizontal_crops(p, n=8, size=12)
    assert horizontal.shape == (16, 3, 12, 12) and horizontal.dtype == torch.uint8
    as_float = views.horizontal_crops(p.float() / 255, n=4, size=12)
    assert as_float.dtype == torch.float32 and 0 <= float(as_float.min()) and float(as_float.max()) <= 1
    with pytest.raises(ValueError, match="width = 2\\*height"):
        views.rolled(p[..., :40])
    with pytest.raises(ValueError, match="view family"):
        views.view_images(p, "seam")


def test_rolled_moves_the_seam_to_the_centre_and_twice_is_the_identity(scenes):
    p = scenes["a"][:3]
    r = views.rolled(p)
    assert torch.equal(r[..., 32], p[..., 0]) and torch.equal(r[..., 31], p[..., -1])
    assert torch.equal(views.rolled(r), p)


def test_horizontal_crops_equal_the_perspective_crop_at_their_yaw(scenes):
    p = scenes["a"][:2].float() / 255
    crops = views.horizontal_crops(p, n=8, size=16)
    assert views.horizontal_yaws(8) == [0, 45, 90, 135, 180, 225, 270, 315]
    for b in range(2):
        for k in range(8):
            expected = equirect_to_perspective(p[b], 90.0, 45.0 * k, 0.0, 16, 16)
            torch.testing.assert_close(crops[b * 8 + k], expected)
    as_uint8 = views.horizontal_crops(scenes["a"][:1], n=8, size=16)
    expected = equirect_to_perspective(scenes["a"][0].float(), 90.0, 135.0, 0.0, 16, 16).round().to(torch.uint8)
    assert torch.equal(as_uint8[3], expected)


def test_random_crops_are_reproducible_by_seed_and_independent_of_batching(scenes):
    p = scenes["a"][:3]
    first = views.random_crops(p, n=4, size=16, seed=7)
    assert torch.equal(first, views.random_crops(p, n=4, size=16, seed=7))
    assert not torch.equal(first, views.random_crops(p, n=4, size=16, seed=8))
    split = torch.cat((views.random_crops(p[:1], 4, 16, seed=7), views.random_crops(p[1:], 4, 16, seed=7, start=1)))
    assert torch.equal(first, split)


def test_random_directions_are_uniform_on_the_sphere():
    yaw, pitch = views.random_directions(500, 20, seed=0)
    z = torch.sin(torch.deg2rad(pitch))
    # Uniform on the sphere: the height z is uniform in [-1, 1] (mean 0, E z^2 = 1/3) and yaw uniform in a full turn.
    assert abs(float(z.mean())) < 0.02 and abs(float((z**2).mean()) - 1 / 3) < 0.02
    assert abs(float(yaw.mean())) < 3 and float(yaw.min()) >= -180 and float(yaw.max()) < 180


# --- FID / IS / CLIP ---------------------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_forms():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2).
    assert distribution.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 4 + 9 - 12)
    # Diagonal covariances: sum over dimensions of (sqrt(a) - sqrt(b))^2 plus the squared mean difference.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = 1.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert distribution.frechet_distance([0, 0, 0], np.diag(a), [1, 0, 0], np.diag(b)) == pytest.approx(expected)
    # A singular covariance (fewer samples than dimensions) still gives a finite distance.
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5, 20))
    assert math.isfinite(distribution.fid(f, f + 1)) and distribution.fid(f, f + 1) == pytest.approx(20, rel=1e-3)


def test_running_stats_agree_with_feature_stats():
    f = np.random.default_rng(1).standard_normal((50, 6)) * 3 + 100
    acc = distribution.RunningStats()
    for chunk in np.array_split(f, 7):
        acc.update(chunk)
    mu, sigma = acc.stats()
    ref_mu, ref_sigma = distribution.feature_stats(f)
    np.testing.assert_allclose(mu, ref_mu)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-9)


def test_fid_is_zero_for_identical_sets_and_grows_with_the_difference(scenes):
    net = SmallFeatureNet(seed=0)
    real = net.features(torch.cat((scenes["a"], scenes["b"])))
    perturbed = net.features(_noisy(torch.cat((scenes["a"], scenes["b"])), 4.0))
    noise = net.features(torch.cat((scenes["noise"], _noisy(scenes["noise"], 30.0, seed=1))))
    assert real.shape == (24, 64) and real.dtype == torch.float64
    different = distribution.fid(real, noise)
    assert different > 0
    assert abs(distribution.fid(real, real)) < 1e-3 * different
    assert 0 < distribution.fid(real, perturbed) < different


def test_inception_score_of_known_distributions():
    uniform = torch.full((40, 16), 1 / 16)
    assert distribution.inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0))
    confident = torch.eye(16).repeat(5, 1)  # every class equally often in every split, each prediction certain
    mean, std = distribution.inception_score(confident, splits=5)
    assert mean == pytest.approx(16.0) and std == pytest.approx(0.0, abs=1e-9)
    # Certain predictions of uneven classes: E KL = H(p(y)), so IS = exp(H) = 2 ** 1.75 for p(y) = 1/2, 1/4, 1/8, 1/8.
    uneven = torch.eye(4)[[0, 0, 0, 0, 1, 1, 2, 3]]
    assert distribution.inception_score(uneven, splits=1) == pytest.approx((2**1.75, 0.0))
    # Two unsure halves: p(y|x) = (0.9, 0.1) or (0.1, 0.9), p(y) = (0.5, 0.5): KL = 0.9 ln 1.8 + 0.1 ln 0.2 for each.
    soft = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).repeat(3, 1)
    assert distribution.inception_score(soft, splits=1)[0] == pytest.approx(math.exp(0.9 * math.log(1.8)
                                                                                      + 0.1 * math.log(0.2)))
    # Splits are consecutive: one split of certain, balanced predictions (16) and one of uniform ones (1).
    mean, std = distribution.inception_score(torch.cat((confident[:16], uniform[:16])), splits=2)
    assert mean == pytest.approx(8.5) and std == pytest.approx(math.sqrt(2 * 7.5**2))


def test_inception_score_agrees_with_torchmetrics(scenes):
    """torchmetrics' InceptionScore (PanFusion's implementation) fed the same class logits: the same mean and std
    over the same splits (torchmetrics shuffles with torch's RNG first, so the test replays that permutation)."""
    from torchmetrics.image.inception import InceptionScore

    net = SmallFeatureNet(seed=0)
    weights = torch.randn(64, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class Logits(nn.Module):
        """Class logits of images: the small net's features, standardised over the batch, through a random head
        (the random net alone predicts nearly the same class for every panorama, which would make IS ~ 1)."""

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            f = net.features(images)
            return 3 * ((f - f.mean(0)) / f.std(0)) @ weights

    images = torch.cat((scenes["a"], scenes["b"], scenes["noise"][:8]))  # 32 panoramas
    probs = torch.softmax(Logits()(images), dim=1)
    for splits in (1, 4):
        metric = InceptionScore(feature=Logits(), splits=splits)
        metric.update(images)
        torch.manual_seed(splits)
        order = torch.randperm(32)
        torch.manual_seed(splits)
        reference = metric.compute()
        mean, std = distribution.inception_score(probs[order], splits=splits)
        assert mean == pytest.approx(float(reference[0]), rel=1e-9) and mean > 2  # far from IS = 1 (one class)
        if splits > 1:
            assert std == pytest.approx(float(reference[1]), rel=1e-6) and std > 0.01


def test_small_text_image_scorer_is_deterministic_in_range_and_fits_colour_words():
    gen = torch.Generator().manual_seed(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}

    def make(count: int) -> tuple[torch.Tensor, list[str]]:
        names = [list(colours)[i % 3] for i in range(count)]
        base = torch.tensor([colours[n] for n in names], dtype=torch.float32)[:, :, None, None]
        imgs = (base + torch.randn(count, 3, 32, 64, generator=gen) * 25).round().clamp(0, 255).to(torch.uint8)
        return imgs, [f"a {n} room" for n in names]

    images, texts = make(30)
    scorer = SmallTextImageScorer(seed=0)
    s = scorer.score(images, texts)
    assert s.shape == (30,) and bool(((s >= 0) & (s <= 100)).all())
    assert torch.equal(s, SmallTextImageScorer(seed=0).score(images, texts))
    assert distribution.clip_score(scorer, images, texts, batch_size=7) == pytest.approx(float(s.mean()))
    scorer.fit(images, texts)
    held_out, held_texts = make(15)
    matching = distribution.clip_score(scorer, held_out, held_texts)
    shuffled = distribution.clip_score(scorer, held_out, held_texts[1:] + held_texts[:1])  # every colour mismatched
    assert 0 <= shuffled < matching <= 100


def test_distribution_metrics_report_every_view_family(scenes):
    real, fake, prompts = scenes["a"][:6], scenes["b"][:6], scenes["captions"][:6]
    common = dict(crops=3, horizontal=4, crop_size=16, is_splits=2, batch_size=4)
    out = distribution.distribution_metrics(
        real, fake, prompts, SmallFeatureNet(seed=0), SmallTextImageScorer(seed=0), **common
    )
    for family in views.VIEW_FAMILIES:
        assert out[f"fid_{family}"] > 0 and out[f"is_{family}"] >= 1
    assert 0 <= out["clip_full"] <= 100 and 0 <= out["clip_horizontal"] <= 100
    assert out["n_real"] == out["n_fake"] == 6 and out["missing"] == []
    same = distribution.distribution_metrics(
        real, list(real.split(2)), None, SmallFeatureNet(seed=0), None, views=("full", "crops"), **common
    )
    assert abs(same["fid_full"]) < 1e-3 * out["fid_full"] and abs(same["fid_crops"]) < 1e-3 * out["fid_crops"]
    assert "clip_full" not in same and same["missing"] == [features.MISSING["clip"]]


def test_distribution_metrics_without_weights_leave_metrics_out_with_the_reason(scenes):
    out = distribution.distribution_metrics(
        scenes["a"][:4], scenes["b"][:4], scenes["captions"][:4], None, None, crop_size=16, crops=2
    )
    assert not any(k.startswith(("fid", "is_", "clip")) for k in out)
    assert out["missing"] == [features.MISSING["inception"], features.MISSING["clip"]]
    assert "--inception" in out["missing"][0] and "--clip" in out["missing"][1]
    with pytest.raises(ValueError, match="prompts"):
        distribution.distribution_metrics(None, scenes["b"][:4], scenes["captions"][:3], None, SmallTextImageScorer())


def test_omnifid_compares_cube_faces_per_group_not_averaged_pixels(scenes):
    """Only the rows above 67.5 degrees of latitude differ, which the up face alone sees: its term grows, the down
    and side terms stay at zero; identical sets score zero on every face."""
    real = scenes["a"][:6]
    fake = real.clone()
    fake[:, :, : real.shape[2] // 8] = scenes["noise"][:6, :, : real.shape[2] // 8]
    net = SmallFeatureNet(seed=0)
    out = distribution.omnifid(real, fake, net)
    same = distribution.omnifid(real, real.clone(), net)
    assert out["omnifid_up"] > 1e3 * max(abs(out["omnifid_down"]), abs(out["omnifid_sides"]), 1e-9)
    assert max(abs(v) for v in same.values()) < 1e-4 * out["omnifid_up"]
    assert out["omnifid"] == pytest.approx((out["omnifid_up"] + out["omnifid_down"] + out["omnifid_sides"]) / 3)
    faces = views.cube_faces(real[:2], "sides", 16)
    assert faces.shape == (8, 3, 16, 16) and faces.dtype == torch.uint8
    front = equirect_to_perspective(real[0].float(), 90.0, 0.0, 0.0, 16, 16).round().clamp(0, 255).byte()
    assert (faces[0].int() - front.int()).abs().max() <= 1  # the first side face is the front view


# --- seam discontinuity score ------------------------------------------------------------------------------------


def test_discontinuity_score_of_hand_computed_cases():
    """A lone white pixel beside the seam: Scharr/16 gives 255 * (3 + 10 + 3) / 16 over the 4 rows of the column
    before the seam and 0 on the column after it, so DS = 255 / 8. A step at the seam gives 255. A step two columns
    away from the seam is outside the strip's two straddling gradient columns: DS 0 there."""
    lone = torch.zeros(1, 3, 4, 8)
    lone[:, :, 1, 0] = 1.0
    assert float(seam.boundary_discontinuity(lone)[0, 0]) == pytest.approx(255 / 8)
    step = torch.zeros(1, 3, 4, 8)
    step[..., :2] = 1.0
    assert seam.boundary_discontinuity(step)[0].tolist() == pytest.approx([255, 255, 255, 127.5, 0, 0, 0, 127.5])
    red = torch.zeros(1, 3, 4, 8)
    red[:, 0, :, :4] = 1.0  # gray weights: pure red is 0.299 of white
    assert float(seam.boundary_discontinuity(red)[0, 0]) == pytest.approx(0.299 * 255)
    away = torch.zeros(1, 3, 4, 8)
    away[..., 2:6] = 1.0  # steps between columns 1|2 and 5|6
    ds = seam.boundary_discontinuity(away)[0]
    assert float(ds[0]) == 0 and float(ds[2]) == pytest.approx(255)


def test_discontinuity_of_a_real_panorama_rises_only_when_its_seam_is_cut(scenes):
    """A rendered panorama is seamless: seam_ds within the spread of its interior boundaries; rolling it by a
    third makes the old seam an interior boundary, and gluing two scenes' halves cuts the seam open."""
    pano = scenes["a"][:4]
    whole = seam.discontinuity_scores(pano)
    assert whole["seam_ds"] < 2 * whole["seam_ds_interior"]
    cut = torch.cat([pano[..., : pano.shape[-1] // 2], scenes["noise"][:4, :, :, pano.shape[-1] // 2 :]], dim=-1)
    assert seam.discontinuity_scores(cut)["seam_ds"] > 3 * whole["seam_ds"]


# --- PSNR / SSIM / LPIPS -----------------------------------------------------------------------------------------


def test_psnr_and_ssim_of_identical_and_noisy_panoramas(scenes):
    target = scenes["a"][:4]
    same = paired.paired_metrics(target, target.clone())
    assert same["psnr"] == math.inf and same["psnr_capped"] == paired.PSNR_CAP and same["identical"] == 4
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    mixed = paired.paired_metrics(torch.cat((target[:1], _noisy(target[1:], 10.0))), target)
    assert mixed["psnr"] == math.inf and mixed["identical"] == 1 and math.isfinite(mixed["psnr_capped"])
    results = [paired.paired_metrics(_noisy(target, std), target) for std in (2.0, 8.0, 32.0)]
    assert results[0]["psnr"] > results[1]["psnr"] > results[2]["psnr"]
    assert results[0]["ssim"] > results[1]["ssim"] > results[2]["ssim"]
    flat = torch.full((1, 3, 16, 32), 0.5)
    assert float(paired.psnr(flat + 0.1, flat)[0]) == pytest.approx(20.0)


def test_ssim_wraps_around_in_longitude(scenes):
    target = scenes["a"][:2]
    pred = _noisy(target, 12.0)
    reference = paired.ssim(pred, target)
    rolled = paired.ssim(torch.roll(pred, 21, dims=-1), torch.roll(target, 21, dims=-1))
    torch.testing.assert_close(rolled, reference)


@pytest.mark.parametrize("net", sorted(lpips_metric.BACKBONES))
def test_lpips_equals_torchmetrics_and_the_original_package(net, tmp_path):
    """Same backbone weights and images as tests/lpips_reference.py gave both references (with torchvision)."""
    weights = lpips_reference.write_seeded_backbone(net, tmp_path / f"{net}.pth")
    got = lpips_metric.lpips(*lpips_reference.image_pairs(), weights=weights, net=net)
    for reference in ("torchmetrics", "lpips"):
        expected = torch.tensor(lpips_reference.REFERENCE[net][reference], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_lpips_is_zero_on_equal_images_symmetric_and_grows_with_noise(scenes, tmp_path):
    weights = lpips_reference.write_seeded_backbone("alex", tmp_path / "alex.pth")
    target = scenes["a"][:3]
    assert lpips_metric.lpips(target, target.clone(), weights).abs().max() < 1e-6
    noisy = _noisy(target, 16.0)
    torch.testing.assert_close(lpips_metric.lpips(noisy, target, weights), lpips_metric.lpips(target, noisy, weights))
    means = [float(lpips_metric.lpips(_noisy(target, std), target, weights).mean()) for std in (4.0, 16.0, 64.0)]
    assert means[0] < means[1] < means[2]


def test_lpips_errors_name_the_weights_and_the_rule(scenes, tmp_path):
    image = scenes["a"][:1]
    with pytest.raises(MissingWeights, match="--lpips-weights"):
        lpips_metric.lpips(image, image)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state_dict")
    with pytest.raises(ValueError, match="junk.pth is not a torch state_dict file"):
        lpips_metric.lpips(image, image, junk)
    vgg = lpips_reference.write_seeded_backbone("vgg", tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match=r"not a torchvision alexnet state_dict \(0.weight has shape \(64, 3, 3, 3\)"):
        lpips_metric.lpips(image, image, vgg, net="alex")
    with pytest.raises(ValueError, match="net: expected one of alex, vgg, squeeze, got 'resnet'"):
        lpips_metric.lpips(image, image, vgg, net="resnet")
    with pytest.raises(ValueError, match="LPIPS needs RGB images"):
        lpips_metric.lpips(image[:, :1], image[:, :1], vgg, net="vgg")


@pytest.mark.parametrize("net", sorted(lpips_metric.BACKBONES))
def test_lpips_names_the_least_image_side_of_its_backbone(net, tmp_path):
    weights = lpips_reference.write_seeded_backbone(net, tmp_path / f"{net}.pth")
    side = lpips_metric.BACKBONES[net].min_size
    square = torch.rand(1, 3, side, side)
    assert lpips_metric.lpips(square, square.flip(-1), weights, net=net)[0] > 0
    for shape in ((side - 1, 2 * side), (2 * side, side - 1)):
        small = torch.rand(1, 3, *shape)
        with pytest.raises(lpips_metric.ImagesTooSmall, match=f"at least {side}x{side} pixels, got {shape[0]}x"):
            lpips_metric.lpips(small, small, weights, net=net)
        with pytest.raises(RuntimeError):  # the backbone itself cannot run there, so the bound is the least one
            lpips_metric.load_lpips(weights, net)(small, small)


# --- FAED --------------------------------------------------------------------------------------------------------

TINY_AE = faed.AutoencoderConfig(latent_channels=4, channels=(8, 8, 8))


@pytest.fixture(scope="module")
def trained_ae(scenes):
    """A tiny autoencoder trained for a few steps on procedural panoramas, with its initial weights and losses."""
    initial = faed.PanoAutoencoder(TINY_AE)
    model = faed.PanoAutoencoder(TINY_AE)
    model.load_state_dict(initial.state_dict())
    losses = []
    faed.train_autoencoder(
        torch.cat((scenes["a"], scenes["b"])), steps=60, batch_size=4, lr=3e-3, model=model,
        progress=lambda step, loss: losses.append(loss),
    )
    return initial.eval(), model, losses


def test_faed_autoencoder_learns_to_reconstruct(scenes, trained_ae):
    initial, model, losses = trained_ae
    assert len(losses) == 60 and not model.training
    test = torch.cat((scenes["a"], scenes["b"]))
    assert faed.reconstruction_error(model, test) < 0.8 * faed.reconstruction_error(initial, test)
    assert model(test[:2].float() / 127.5 - 1).shape == (2, 3, 32, 64)


def test_faed_features_are_latitude_weighted_and_seamless(scenes, trained_ae):
    _, model, _ = trained_ae
    f = faed.autoencoder_features(model, scenes["a"])
    assert f.shape == (12, 4 * 32 // 8) and f.dtype == torch.float64
    # A roll by the encoder's stride (8 px) rolls the latent by one column: the width-averaged features stay put.
    torch.testing.assert_close(faed.autoencoder_features(model, torch.roll(scenes["a"], 8, dims=-1)), f)
    with pytest.raises(ValueError, match="multiples of 8"):
        faed.autoencoder_features(model, scenes["a"][..., :28, :56])


def test_faed_is_zero_for_identical_sets_and_larger_for_noise(scenes, trained_ae):
    _, model, _ = trained_ae
    # Two disjoint samples of the same distribution: alternate keyframes of the same two walks.
    x = torch.cat((scenes["a"][::2], scenes["b"][::2]))
    y = torch.cat((scenes["a"][1::2], scenes["b"][1::2]))
    to_noise = faed.faed(model, x, scenes["noise"])
    assert abs(faed.faed(model, x, x.clone())) < 1e-3 * to_noise
    assert to_noise > 2 * faed.faed(model, x, y) > 0


def test_faed_autoencoder_save_load_round_trip(scenes, trained_ae, tmp_path):
    _, model, _ = trained_ae
    faed.save_autoencoder(model, str(tmp_path / "faed"))
    config = json.loads((tmp_path / "faed" / "config.json").read_text())
    assert config == {"kind": faed.KIND, "latent_channels": 4, "channels": [8, 8, 8]}
    loaded = faed.load_autoencoder(str(tmp_path / "faed"))
    assert torch.equal(faed.autoencoder_features(loaded, scenes["a"]), faed.autoencoder_features(model, scenes["a"]))


def test_train_autoencoder_accepts_datasets_and_iterables(scenes):
    dataset = [{"image": img.float() / 127.5 - 1} for img in scenes["a"][:4]]  # PanoramaDataset items
    model = faed.train_autoencoder(dataset, steps=1, batch_size=2, config=TINY_AE)
    assert isinstance(model, faed.PanoAutoencoder)
    one_shot = (img for img in scenes["a"][:4])  # an iterable read once: 2 steps of 2 images
    model = faed.train_autoencoder(one_shot, steps=2, batch_size=2, config=TINY_AE)
    assert not model.training


# --- real-weight wrappers with tiny stand-in files ---------------------------------------------------------------


class _TinyInception(nn.Module):
    """The StyleGAN3 Inception call convention on a tiny net; feature 0 reports the input width it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2048)
        self.head = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        f = self.proj(x.float().mean(dim=(2, 3)) / 255)
        f[:, 0] = float(x.shape[-1])
        if return_features:
            return f
        return torch.softmax(self.head(f), dim=-1)


def test_torchscript_inception_loads_a_scripted_file(tmp_path, scenes):
    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    net = features.TorchScriptInception(path, batch_size=5)
    assert isinstance(net, features.FeatureExtractor)
    f = net.features(scenes["a"][:7])
    assert f.shape == (7, 2048) and f.dtype == torch.float64 and bool((f[:, 0] == 299).all())
    p = net.probabilities(scenes["a"][:7])
    assert p.shape == (7, 1008)
    torch.testing.assert_close(p.sum(1), torch.ones(7, dtype=torch.float64))
    with pytest.raises(MissingWeights, match="--inception"):
        features.TorchScriptInception(tmp_path / "absent.pt")


def _write_tiny_clip(directory) -> None:
    """A random tiny CLIP model and its processor (BPE tokenizer over a few words) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory.mkdir()
    words = ["a", "room", "with", "bed", "kitchen", "sofa", "table", "red", "blue"]
    letters = sorted(set("".join(words)))
    vocab = {c: i for i, c in enumerate(letters + [c + "</w>" for c in letters])}
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    end = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=24, bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(directory))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(directory))


def test_clip_scorer_loads_a_local_directory_and_scores_like_torchmetrics(tmp_path, scenes):
    """ClipScorer against torchmetrics' own clip_score, given the same saved CLIP directory (loaded separately)."""
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    _write_tiny_clip(tmp_path / "clip")
    scorer = features.ClipScorer(tmp_path / "clip", batch_size=3)
    assert isinstance(scorer, features.TextImageScorer)

    class Projected(nn.Module):
        """The CLIP model as torchmetrics calls it. transformers 5 returns the projected embeddings as the
        pooler_output of an output object where torchmetrics 1.9 expects the tensor itself; nothing else changes."""

        def __init__(self, model) -> None:
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def reference_model():
        model = CLIPModel.from_pretrained(str(tmp_path / "clip"), local_files_only=True).eval()
        return Projected(model), CLIPProcessor.from_pretrained(str(tmp_path / "clip"), local_files_only=True)

    images = torch.cat((scenes["a"][:4], scenes["noise"][:2]))
    texts = ["a red room with a bed", "a blue sofa", "a kitchen with a table", "", "room", "a bed a bed a sofa"]
    s = scorer.score(images, texts)  # in batches of 3, texts and images through one processor call
    assert s.shape == (6,) and s.dtype == torch.float64
    with torch.no_grad():  # torchmetrics clamps the mean of a call at 0: one pair per call gives each pair's score
        reference = torch.stack([clip_score(img, text, reference_model) for img, text in zip(images, texts,
                                                                                           strict=True)])
    torch.testing.assert_close(s, reference.double(), atol=1e-4, rtol=1e-4)
    assert (s > 0).sum() >= 2 and len(set(s.round(decimals=3).tolist())) >= 3, s  # not all clamped, not constant
    assert distribution.clip_score(scorer, images, texts, batch_size=4) == pytest.approx(float(s.mean()))
    # A caption longer than the text model's 24 positions is truncated (keeping its end token) instead of failing.
    long = scorer.score(images[:1], [scenes["captions"][0]])
    assert long.shape == (1,) and 0 <= float(long[0]) <= 100
    with pytest.raises(MissingWeights, match="--clip"):
        features.ClipScorer(tmp_path / "absent")
