"""Torch datasets over a docs/datasets.md dataset: single keyframes (stage 1) and windows of a clip (stage 2).

Images are read and decoded in __getitem__ (i.e. in DataLoader workers); __init__ reads only the manifest, and
the datasets hold plain Python and numpy data so that they pickle to worker processes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from diffpano.data.manifest import read_dataset
from diffpano.geometry.spherical import check_panorama_size, nearest_views, yaw_matrix
from diffpano.io import storage
from diffpano.io.depth import decode_depth
from diffpano.io.manifest import decode_rgb, resolve_uri

FLIP = np.diag([-1.0, 1.0, 1.0, 1.0])  # mirrors camera and world x (docs/geometry.md: u -> W-1-u maps theta to -theta)


def yaw_roll_pose(pose: np.ndarray, shift: int, width: int) -> np.ndarray:
    """Pose of a panorama whose columns were rolled by `shift` (np.roll(img, shift, axis=1)).

    New pixel u shows old pixel u - shift, whose longitude is 2*pi*shift/W less, so R_new = R_old @ yaw(-2*pi*shift/W).
    """
    out = pose.copy()
    out[:3, :3] = pose[:3, :3] @ yaw_matrix(-2 * math.pi * shift / width).numpy()
    return out


def flip_pose(pose: np.ndarray) -> np.ndarray:
    """Pose of a horizontally flipped panorama in the mirrored world: F T F with F = diag(-1, 1, 1, 1)."""
    return FLIP @ pose @ FLIP


def check_probability(value: float, name: str) -> float:
    """A probability in [0, 1], or ValueError naming the argument."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {value}")
    return float(value)


class KeyframeStore:
    """The manifest rows of a dataset, sorted by (clip_id, frame_index), and how to load one keyframe."""

    def __init__(self, root: str, size: tuple[int, int] | None, load_depth: bool) -> None:
        self.root = str(root)
        if not storage.exists(self.root):
            raise ValueError(f"root: dataset not found: {self.root}")
        table = read_dataset(self.root)
        if table.num_rows == 0:
            raise ValueError(f"root: no keyframes in the manifest of {self.root}")
        if size is not None:
            check_panorama_size(int(size[0]), int(size[1]), field="size")
            size = (int(size[0]), int(size[1]))
        self.size = size
        self.load_depth = load_depth
        table = table.sort_by([("clip_id", "ascending"), ("frame_index", "ascending")])
        col = table.column
        self.scene_ids: list[str] = col("scene_id").to_pylist()
        self.clip_ids: list[str] = col("clip_id").to_pylist()
        self.frame_indices = np.asarray(col("frame_index").to_pylist(), dtype=np.int64)
        self.captions: list[str] = col("caption").to_pylist()
        self.poses = np.asarray(col("pose_c2w").to_pylist(), dtype=np.float64).reshape(-1, 4, 4)
        self.rgb_uris = [resolve_uri(self.root, u) for u in col("rgb_uri").to_pylist()]
        self.depth_uris = [None if u is None else resolve_uri(self.root, u) for u in col("depth_uri").to_pylist()]
        self.sizes = np.stack([col("height").to_numpy(), col("width").to_numpy()], axis=1).astype(np.int64)

    def __len__(self) -> int:
        """Number of keyframes."""
        return len(self.rgb_uris)

    def target_size(self, row: int) -> tuple[int, int]:
        """(H, W) that row's images are delivered at."""
        return self.size or (int(self.sizes[row, 0]), int(self.sizes[row, 1]))

    def load(self, row: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB (H, W, 3) uint8 and depth (H, W) metres (zeros = unknown when the row has none) at size (H, W)."""
        rgb = resize_rgb(decode_rgb(storage.read_bytes(self.rgb_uris[row])), size)
        if not self.load_depth:
            return rgb, None
        uri = self.depth_uris[row]
        depth = np.zeros(size, np.float32) if uri is None else resize_depth(decode_depth(storage.read_bytes(uri)), size)
        return rgb, depth


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB resized to (H, W): area averaging when shrinking, bilinear when enlarging."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    shrink = h <= rgb.shape[0] and w <= rgb.shape[1]
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BOX if shrink else Image.BILINEAR))


def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Depth resized to (H, W) by nearest neighbour (no averaging across depth edges or with unknown pixels)."""
    h, w = size
    if depth.shape == (h, w):
        return depth
    return np.asarray(Image.fromarray(depth.astype(np.float32)).resize((w, h), Image.NEAREST))


def to_image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] of (H, W, 3) uint8."""
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


class AugmentedFrames:
    """Shared options and the geometry-preserving augmentations of both datasets."""

    def __init__(
        self, root: str, size: tuple[int, int] | None, yaw_augment: bool, flip_prob: float, caption_dropout: float,
        seed: int, load_depth: bool,
    ) -> None:
        self.store = KeyframeStore(root, size, load_depth)
        self.yaw_augment = bool(yaw_augment)
        self.flip_prob = check_probability(flip_prob, "flip_prob")
        self.caption_dropout = check_probability(caption_dropout, "caption_dropout")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations __getitem__ draws (call before creating the DataLoader's iterator)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of one item: a function of (seed, epoch, index) only, whichever worker loads it."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def frame(self, row: int, size: tuple[int, int], flip: bool, shift: int) -> dict:
        """One keyframe flipped (optionally), its columns rolled by shift, with the matching pose."""
        rgb, depth = self.store.load(row, size)
        pose = self.store.poses[row]
        if flip:
            rgb, pose = rgb[:, ::-1], flip_pose(pose)
            depth = None if depth is None else depth[:, ::-1]
        if shift:
            rgb, pose = np.roll(rgb, shift, axis=1), yaw_roll_pose(pose, shift, size[1])
            depth = None if depth is None else np.roll(depth, shift, axis=1)
        out = dict(image=to_image_tensor(rgb), pose=torch.from_numpy(pose.astype(np.float32)))
        if depth is not None:
            out["depth"] = torch.from_numpy(np.array(depth, dtype=np.float32))[None]
        return out

    def draw_shift(self, rng: np.random.Generator, width: int) -> int:
        """A random column shift in [0, W) when yaw augmentation is on, else 0 (draws either way: stable streams)."""
        shift = int(rng.integers(width))
        return shift if self.yaw_augment else 0


class PanoramaDataset(AugmentedFrames, Dataset):
    """Stage-1 samples: one keyframe per item with image, caption, pose (and depth), augmented."""

    def __init__(
        self, root: str, size: tuple[int, int] | None = None, yaw_augment: bool = True, flip_prob: float = 0.0,
        caption_dropout: float = 0.0, seed: int = 0, load_depth: bool = False,
    ) -> None:
        super().__init__(root, size, yaw_augment, flip_prob, caption_dropout, seed, load_depth)

    def __len__(self) -> int:
        """Number of keyframes."""
        return len(self.store)

    def __getitem__(self, index: int) -> dict:
        """image (3, H, W) in [-1, 1], caption ("" when dropped), pose (4, 4), [depth (1, H, W)], ids."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} keyframes")
        rng = self.rng(index)
        size = self.store.target_size(index)
        flip = bool(rng.random() < self.flip_prob)
        shift = self.draw_shift(rng, size[1])
        drop = bool(rng.random() < self.caption_dropout)
        s = self.store
        out = self.frame(index, size, flip, shift)
        out.update(
            caption="" if drop else s.captions[index], scene_id=s.scene_ids[index], clip_id=s.clip_ids[index],
            frame_index=int(s.frame_indices[index]),
        )
        return out


class ClipDataset(AugmentedFrames, Dataset):
    """Stage-2 samples: windows of num_views consecutive keyframes of one clip, with K nearest reference views."""

    def __init__(
        self, root: str, num_views: int, num_ref_views: int, stride: int = 1, size: tuple[int, int] | None = None,
        yaw_augment: bool = True, flip_prob: float = 0.0, caption_dropout: float = 0.0, seed: int = 0,
        load_depth: bool = False,
    ) -> None:
        for name, value in (("num_views", num_views), ("num_ref_views", num_ref_views), ("stride", stride)):
            if int(value) < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        super().__init__(root, size, yaw_augment, flip_prob, caption_dropout, seed, load_depth)
        self.num_views, self.num_ref_views, self.stride = int(num_views), int(num_ref_views), int(stride)
        self.windows = self.find_windows()
        if not self.windows:
            raise ValueError(f"num_views: no clip in {self.store.root} has {self.num_views} or more keyframes")

    def find_windows(self) -> list[int]:
        """First rows of all windows: every stride-th start within a clip that leaves num_views frames."""
        starts, clip_ids = [], self.store.clip_ids
        begin = 0
        for row in range(1, len(clip_ids) + 1):
            if row == len(clip_ids) or clip_ids[row] != clip_ids[begin]:
                starts.extend(range(begin, row - self.num_views + 1, self.stride))
                begin = row
        return starts

    def __len__(self) -> int:
        """Number of windows."""
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        """images (N, 3, H, W), captions [N], poses (N, 4, 4), ref_index/ref_valid (N, K), [depth (N, 1, H, W)]."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        rng = self.rng(index)
        start, s = self.windows[index], self.store
        rows = range(start, start + self.num_views)
        size = s.target_size(start)  # frames of a clip share a size; resize any that do not
        flip = bool(rng.random() < self.flip_prob)  # one mirrored world for the whole clip
        shifts = [self.draw_shift(rng, size[1]) for _ in rows]  # each view may face its own way
        drop = bool(rng.random() < self.caption_dropout)
        frames = [self.frame(row, size, flip, shift) for row, shift in zip(rows, shifts, strict=True)]
        poses = torch.stack([f["pose"] for f in frames])
        ref_index, ref_valid = nearest_views(poses, self.num_ref_views)
        out = dict(
            images=torch.stack([f["image"] for f in frames]), poses=poses,
            captions=["" if drop else s.captions[r] for r in rows],
            ref_index=ref_index.long(), ref_valid=ref_valid.bool(),
            scene_id=s.scene_ids[start], clip_id=s.clip_ids[start],
            frame_indices=torch.from_numpy(s.frame_indices[start : start + self.num_views].copy()),
        )
        if s.load_depth:
            out["depth"] = torch.stack([f["depth"] for f in frames])
        return out


def collate_clips(samples: list[dict]) -> dict:
    """Batch ClipDataset samples, keeping captions as a list (B) of lists (N) rather than default_collate's (N, B)."""
    captions = [sample["captions"] for sample in samples]
    batch = default_collate([{k: v for k, v in sample.items() if k != "captions"} for sample in samples])
    batch["captions"] = captions
    return batch
