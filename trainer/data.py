"""Training samples of latent models read from the latent cache, with the loaders' geometry-true augmentations."""

from __future__ import annotations

import numpy as np
import torch

from diffpano.data.loaders import ClipDataset, PanoramaDataset, flip_pose, yaw_roll_pose


class LatentFrames:
    """Replaces decoded images by cached latents (C, h, w); yaw rolls move whole latent columns (f pixels each)."""

    latents: dict[tuple[str, int], np.ndarray]
    factor: int

    def draw_shift(self, rng: np.random.Generator, width: int) -> int:
        """A pixel shift that is a whole number of latent columns."""
        shift = super().draw_shift(rng, width)
        return shift - shift % self.factor

    def frame(self, row: int, size: tuple[int, int], flip: bool, shift: int) -> dict:
        """One keyframe's latent, flipped and rolled like the image would be, with the matching pose."""
        s = self.store
        key = (s.clip_ids[row], int(s.frame_indices[row]))
        if key not in self.latents:
            raise ValueError(f"latent cache: no latent for clip {key[0]} frame {key[1]}; rebuild the cache")
        lat, pose = self.latents[key], s.poses[row]
        if flip:  # the VAE is close to flip-equivariant: a mirrored latent stands for the mirrored image
            lat, pose = lat[..., ::-1], flip_pose(pose)
        if shift:
            lat, pose = np.roll(lat, shift // self.factor, axis=-1), yaw_roll_pose(pose, shift, size[1])
        return {"image": torch.from_numpy(np.ascontiguousarray(lat, dtype=np.float32)),
                "pose": torch.from_numpy(pose.astype(np.float32))}


class LatentPanoramaDataset(LatentFrames, PanoramaDataset):
    """Stage-1 samples of a latent model."""

    def __init__(self, root: str, latents: dict, factor: int, **options) -> None:
        super().__init__(root, **options)
        self.latents, self.factor = latents, factor


class LatentClipDataset(LatentFrames, ClipDataset):
    """Stage-2 samples of a latent model."""

    def __init__(self, root: str, latents: dict, factor: int, **options) -> None:
        super().__init__(root, **options)
        self.latents, self.factor = latents, factor
