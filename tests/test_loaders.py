"""Training datasets: keyframes and clip windows, geometry-preserving augmentations, determinism, workers, S3."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffpano.data.loaders import ClipDataset, PanoramaDataset, collate_clips, flip_pose, yaw_roll_pose
from diffpano.data.manifest import Clip, commit_clips
from diffpano.geometry.spherical import direction_grid, make_pose, validate_poses, yaw_matrix

H, W = 16, 32


def make_clip(clip_id: str, frames: int, seed: int, depth: bool = True) -> Clip:
    """A clip of random images and depth, walking along x while turning."""
    rng = np.random.default_rng(seed)
    yaws = rng.uniform(-math.pi, math.pi, frames)
    poses = torch.stack([
        make_pose(yaw_matrix(float(a)), torch.tensor([0.5 * i, 0.1 * seed, -0.3 * i], dtype=torch.float64))
        for i, a in enumerate(yaws)
    ]).numpy()
    rgb = rng.integers(0, 256, (frames, H, W, 3), dtype=np.uint8)
    dep = rng.integers(1, 9000, (frames, H, W)).astype(np.float64) / 1000.0 if depth else None
    return Clip(f"scene-{seed}", clip_id, [f"{clip_id} view {i}" for i in range(frames)], poses, rgb, dep)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, dict[str, Clip]]:
    """A local dataset with clips of 5, 3 and 2 keyframes (one manifest part per clip)."""
    root = str(tmp_path_factory.mktemp("loaders") / "ds")
    clips = {c.clip_id: c for c in (make_clip("a", 5, 1), make_clip("b", 3, 2), make_clip("c", 2, 3))}
    for clip in clips.values():
        commit_clips(root, [clip])
    return root, clips


def world_dirs(pose: torch.Tensor) -> torch.Tensor:
    """World directions (H, W, 3) of every pixel of a panorama at pose."""
    return direction_grid(H, W, torch.float64) @ pose[:3, :3].T.double()


def find_shift(image: torch.Tensor, source: np.ndarray) -> int:
    """The k with image == np.roll(source, k, axis=1) (image in [-1, 1], source uint8)."""
    img = np.round((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    matches = [k for k in range(W) if np.array_equal(img, np.roll(source, k, axis=1))]
    assert len(matches) == 1
    return matches[0]


def test_yaw_roll_pose_maps_new_pixel_to_old_pixel_direction():
    pose = make_pose(yaw_matrix(0.7), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).numpy()
    for k in (1, 5, W - 3):
        new = torch.from_numpy(yaw_roll_pose(pose, k, W))
        # new pixel u shows old pixel u - k: np.roll of the old directions by k
        expected = torch.roll(world_dirs(torch.from_numpy(pose)), k, dims=1)
        torch.testing.assert_close(world_dirs(new), expected, atol=1e-9, rtol=0)
        torch.testing.assert_close(new[:3, 3], torch.from_numpy(pose[:3, 3]))


def test_flip_pose_is_a_rotation_of_the_mirrored_world():
    pose = make_pose(yaw_matrix(0.7), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).numpy()
    new = torch.from_numpy(flip_pose(pose))
    validate_poses(new, "flipped")  # proper rotation: det +1
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    # new pixel u shows old pixel W-1-u, seen in the world mirrored in x
    expected = world_dirs(torch.from_numpy(pose)).flip(1) @ mirror.T
    torch.testing.assert_close(world_dirs(new), expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(new[:3, 3], mirror @ torch.from_numpy(pose[:3, 3]))


def test_panorama_sample_yaw_matches_pose(dataset):
    root, clips = dataset
    ds = PanoramaDataset(root, yaw_augment=True, load_depth=True, seed=3)
    assert len(ds) == 10
    shifts = set()
    for index in range(4):
        sample = ds[index]
        clip = clips[sample["clip_id"]]
        f = sample["frame_index"]
        assert sample["image"].shape == (3, H, W) and sample["image"].dtype == torch.float32
        assert sample["image"].min() >= -1 and sample["image"].max() <= 1
        assert sample["caption"] == clip.captions[f] and sample["pose"].dtype == torch.float32
        k = find_shift(sample["image"], clip.rgb[f])
        shifts.add(k)
        expected = torch.roll(world_dirs(torch.from_numpy(clip.poses[f])), k, dims=1)
        torch.testing.assert_close(world_dirs(sample["pose"].double()), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(sample["depth"][0].numpy(), np.roll(clip.depth[f], k, axis=1), atol=1e-6)
    assert len(shifts) > 1


def test_flip_with_yaw_keeps_image_and_pose_consistent(dataset):
    root, clips = dataset
    ds = PanoramaDataset(root, flip_prob=1.0, yaw_augment=True, seed=1)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    for index in (0, 6):
        sample = ds[index]
        clip = clips[sample["clip_id"]]
        f = sample["frame_index"]
        k = find_shift(sample["image"], clip.rgb[f][:, ::-1])
        validate_poses(sample["pose"], "pose")
        old = world_dirs(torch.from_numpy(clip.poses[f]))
        expected = torch.roll(old.flip(1) @ mirror.T, k, dims=1)
        torch.testing.assert_close(world_dirs(sample["pose"].double()), expected, atol=1e-5, rtol=0)


def test_caption_dropout(dataset):
    root, clips = dataset
    assert all(PanoramaDataset(root, caption_dropout=1.0)[i]["caption"] == "" for i in range(3))
    keep = PanoramaDataset(root, caption_dropout=0.0)
    assert [keep[i]["caption"] for i in range(5)] == clips["a"].captions
    half = ClipDataset(root, num_views=2, num_ref_views=1, caption_dropout=0.5, yaw_augment=False)
    kinds = set()
    for i in range(len(half)):
        captions = half[i]["captions"]
        assert len(captions) == 2 and (all(captions) or not any(captions))  # one decision per window
        kinds.add(bool(captions[0]))
    assert kinds == {True, False}


def test_determinism_by_seed_and_epoch(dataset):
    root, _ = dataset
    opts = dict(flip_prob=0.5, caption_dropout=0.5)
    a, b = PanoramaDataset(root, seed=7, **opts), PanoramaDataset(root, seed=7, **opts)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["pose"], y["pose"])
        assert x["caption"] == y["caption"]
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["pose"], b[i]["pose"]) for i in range(len(a)))
    a.set_epoch(1)
    assert torch.equal(a[4]["image"], b[4]["image"])
    other = PanoramaDataset(root, seed=8, **opts)
    assert any(not torch.equal(a[i]["pose"], other[i]["pose"]) for i in range(len(a)))


def test_clip_windows_and_reference_views(dataset):
    root, clips = dataset
    ds = ClipDataset(root, num_views=3, num_ref_views=2, yaw_augment=False, load_depth=True)
    assert len(ds) == 3 + 1  # clip a (5 frames): 3 windows, b (3): 1, c (2): too short
    assert len(ClipDataset(root, num_views=3, num_ref_views=2, stride=2)) == 2 + 1
    sample = ds[1]
    assert sample["clip_id"] == "a" and sample["frame_indices"].tolist() == [1, 2, 3]
    assert sample["images"].shape == (3, 3, H, W) and sample["poses"].shape == (3, 4, 4)
    assert sample["depth"].shape == (3, 1, H, W)
    assert sample["captions"] == clips["a"].captions[1:4]
    assert sample["ref_index"].shape == (3, 2) and sample["ref_index"].dtype == torch.int64
    assert sample["ref_valid"].dtype == torch.bool and bool(sample["ref_valid"].all())
    assert sample["ref_index"][0].tolist() == [1, 2]  # nearest centres along the walk
    torch.testing.assert_close(sample["poses"].double(), torch.from_numpy(clips["a"].poses[1:4]), atol=1e-6, rtol=0)
    padded = ClipDataset(root, num_views=2, num_ref_views=3)[0]
    assert padded["ref_index"].shape == (2, 3) and padded["ref_valid"].sum(-1).tolist() == [1, 1]


def test_clip_augmentation_per_view_yaw_shared_flip(dataset):
    root, clips = dataset
    ds = ClipDataset(root, num_views=5, num_ref_views=2, flip_prob=1.0, seed=2)
    sample = ds[0]
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    shifts = []
    for f in range(5):
        k = find_shift(sample["images"][f], clips["a"].rgb[f][:, ::-1])
        shifts.append(k)
        old = world_dirs(torch.from_numpy(clips["a"].poses[f]))
        expected = torch.roll(old.flip(1) @ mirror.T, k, dims=1)
        torch.testing.assert_close(world_dirs(sample["poses"][f].double()), expected, atol=1e-5, rtol=0)
    assert len(set(shifts)) > 1


def test_resize(dataset):
    root, clips = dataset
    sample = PanoramaDataset(root, size=(8, 16), yaw_augment=False, load_depth=True)[0]
    assert sample["image"].shape == (3, 8, 16) and sample["depth"].shape == (1, 8, 16)
    assert set(np.unique(sample["depth"].numpy())) <= set(np.unique(clips["a"].depth[0].astype(np.float32)))
    big = ClipDataset(root, num_views=2, num_ref_views=1, size=(32, 64))[0]
    assert big["images"].shape == (2, 3, 32, 64)


def test_clear_errors(tmp_path, dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match="root: dataset not found: .*nowhere"):
        PanoramaDataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no keyframes .*empty"):
        PanoramaDataset(str(tmp_path / "empty"))
    for kwargs, name in [
        (dict(num_views=0, num_ref_views=1), "num_views"), (dict(num_views=2, num_ref_views=0), "num_ref_views"),
        (dict(num_views=2, num_ref_views=1, stride=0), "stride"), (dict(num_views=6, num_ref_views=1), "num_views"),
        (dict(num_views=2, num_ref_views=1, flip_prob=1.5), "flip_prob"),
        (dict(num_views=2, num_ref_views=1, size=(8, 8)), "size"),
    ]:
        with pytest.raises(ValueError, match=name):
            ClipDataset(root, **kwargs)


def test_dataloader_with_workers(dataset):
    root, _ = dataset
    ds = PanoramaDataset(root, caption_dropout=0.3, load_depth=True)
    pickle.loads(pickle.dumps(ds))
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, shuffle=False))
    assert [len(b["caption"]) for b in batches] == [4, 4, 2]
    assert batches[0]["image"].shape == (4, 3, H, W) and batches[0]["depth"].shape == (4, 1, H, W)
    serial = [ds[i]["image"] for i in range(4)]
    assert torch.equal(batches[0]["image"], torch.stack(serial))  # same draws in workers as in the main process
    clips = ClipDataset(root, num_views=3, num_ref_views=2)
    batch = next(iter(DataLoader(clips, batch_size=2, num_workers=2, collate_fn=collate_clips)))
    assert batch["images"].shape == (2, 3, 3, H, W) and batch["ref_index"].shape == (2, 3, 2)
    assert len(batch["captions"]) == 2 and len(batch["captions"][0]) == 3


def test_reads_from_s3(s3_endpoint):
    root = "s3://diffpano-test/loaders/ds"
    clip = make_clip("s3clip", 3, 5)
    commit_clips(root, [clip])
    ds = PanoramaDataset(root, yaw_augment=False, load_depth=True)
    assert len(ds) == 3
    sample = ds[2]
    expected = torch.from_numpy(clip.rgb[2]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(sample["image"], expected)
    np.testing.assert_allclose(sample["depth"][0].numpy(), clip.depth[2], atol=1e-6)
    assert ClipDataset(root, num_views=3, num_ref_views=2)[0]["images"].shape == (3, 3, H, W)
