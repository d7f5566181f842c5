"""Structure from motion of equirectangular keyframes with COLMAP (pycolmap) as a rig of virtual perspective cameras:
each panorama is resampled into RIG_VIEWS with the project's projection code (diffpano.geometry.projection's rays,
diffpano.geometry.spherical's sampling), the views share the panorama's centre, and COLMAP reconstructs them as one rig
whose
pose is the panorama's (docs/captures.md)."""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffpano.geometry.projection import perspective_rays, view_rotation
from diffpano.geometry.spherical import circular_grid_sample, direction_to_sample_grid
from diffpano.io.manifest import to_uint8

# (yaw, pitch) in degrees of the rig's 90-degree views: four around the horizon and four each above and below,
# turned 45 degrees; COLMAP's own panorama example uses the same overlapping layout.
RIG_VIEWS: tuple[tuple[float, float], ...] = tuple(
    [(y, 0.0) for y in (0, 90, 180, 270)] + [(y, p) for p in (35.0, -35.0) for y in (45, 135, 225, 315)])
VIEW_FOV = 90.0
SIFT_PEAK_THRESHOLD = 0.002  # COLMAP's 0.0067 is tuned for photos; rooms' painted walls need a lower one
MIN_FEATURES = 40  # median SIFT features per view below this: the capture is too plain for features
MIN_MODEL_FRAMES = 3  # a reconstructed model with fewer panoramas is not kept


@dataclass
class Model:
    """One connected reconstruction: the registered keyframes (indices into the input), their camera-to-world poses
    (OpenCV axes, COLMAP's arbitrary world and scale) and the sparse 3D points."""

    frames: list[int]
    poses: np.ndarray  # (F, 4, 4) float64, panorama camera-to-world
    points: np.ndarray  # (P, 3) float64


def view_size(pano_height: int) -> int:
    """Side in pixels of a rig view that keeps the panorama's angular resolution (90 degrees of H = 180)."""
    return max(32, pano_height // 2)


def view_rotations() -> np.ndarray:
    """(V, 3, 3) rotations from each rig view's camera frame to the panorama frame."""
    yaw = torch.tensor([v[0] for v in RIG_VIEWS], dtype=torch.float64)
    pitch = torch.tensor([v[1] for v in RIG_VIEWS], dtype=torch.float64)
    return view_rotation(yaw, pitch).numpy()


def view_masks(size: int) -> np.ndarray:
    """(V, s, s) bool: the pixels each view owns (closest view axis), so every panorama direction gives features in
    one view only and no 3D point is triangulated twice."""
    yaw = torch.tensor([v[0] for v in RIG_VIEWS], dtype=torch.float64)
    pitch = torch.tensor([v[1] for v in RIG_VIEWS], dtype=torch.float64)
    rays = perspective_rays(size, size, VIEW_FOV, yaw, pitch, torch.float64).numpy()
    axes = view_rotations()[:, :, 2]
    return np.argmax(rays @ axes.T, axis=-1) == np.arange(len(RIG_VIEWS))[:, None, None]


def write_views(panoramas: list[np.ndarray], images: Path, masks: Path) -> int:
    """Render every panorama (H, W, 3) uint8 to the rig's views as images/viewV/NNNNN.bmp (scratch files: BMP skips
    PNG's compression, the slowest part of this), with COLMAP masks; the view side in pixels."""
    size = view_size(panoramas[0].shape[0])
    owned = view_masks(size)
    yaw = torch.tensor([v[0] for v in RIG_VIEWS], dtype=torch.float64)
    pitch = torch.tensor([v[1] for v in RIG_VIEWS], dtype=torch.float64)
    rays = perspective_rays(size, size, VIEW_FOV, yaw, pitch, torch.float32)
    grid = direction_to_sample_grid(rays).reshape(1, len(RIG_VIEWS) * size, size, 2)  # once for every panorama
    masks_png = []
    for v in range(len(RIG_VIEWS)):
        (images / f"view{v}").mkdir(parents=True, exist_ok=True)
        (masks / f"view{v}").mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(owned[v])).save(buffer, format="PNG")
        masks_png.append(buffer.getvalue())
    for i, pano in enumerate(panoramas):
        tensor = torch.from_numpy(pano).permute(2, 0, 1)[None].float()
        views = circular_grid_sample(tensor, grid)[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
        for v, view in enumerate(views.reshape(len(RIG_VIEWS), size, size, 3)):
            Image.fromarray(view).save(images / f"view{v}" / f"{i:05d}.bmp")
            (masks / f"view{v}" / f"{i:05d}.bmp.png").write_bytes(masks_png[v])
    return size


def rig_config(size: int):
    """COLMAP's rig: view 0 is the reference sensor; the others are pure rotations of it, known exactly."""
    import pycolmap

    rotations = view_rotations()
    focal = (size / 2) / math.tan(math.radians(VIEW_FOV) / 2)
    cameras = []
    for v, r in enumerate(rotations):
        camera = pycolmap.Camera.create_from_model_id(0, pycolmap.CameraModelId.SIMPLE_PINHOLE, focal, size, size)
        camera.has_prior_focal_length = True
        cam_from_ref = None if v == 0 else pycolmap.Rigid3d(
            pycolmap.Rotation3d(r.T @ rotations[0]), np.zeros((3, 1)))
        cameras.append(pycolmap.RigConfigCamera(ref_sensor=v == 0, image_prefix=f"view{v}/",
                                                cam_from_rig=cam_from_ref, camera=camera))
    return pycolmap.RigConfig(cameras=cameras)


def reconstruct(panoramas: list[np.ndarray], work: Path, threads: int = 1, seed: int = 0,
                timings: dict[str, float] | None = None, peak_threshold: float = SIFT_PEAK_THRESHOLD) -> list[Model]:
    """COLMAP models of the keyframes, largest first; ValueError when the scene is too plain or nothing registers.
    `timings`, when given, receives the seconds of each stage (views, features, matching, mapping)."""
    import pycolmap

    timings = {} if timings is None else timings
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = now - clock[0]
        clock[0] = now

    # COLMAP's INFO log is about 100 lines a keyframe; warnings and errors still show
    pycolmap.logging.minloglevel = max(pycolmap.logging.minloglevel, int(pycolmap.logging.WARNING))
    pycolmap.set_random_seed(seed)
    images, masks, database = work / "images", work / "masks", work / "database.db"
    size = write_views(panoramas, images, masks)
    lap("views")
    config = rig_config(size)
    camera = config.cameras[0].camera
    extraction = pycolmap.FeatureExtractionOptions(num_threads=threads)
    extraction.sift.peak_threshold = peak_threshold
    pycolmap.extract_features(database, images, camera_mode=pycolmap.CameraMode.PER_FOLDER,
                              reader_options=pycolmap.ImageReaderOptions(
                                  mask_path=masks, camera_model=camera.model_name,
                                  camera_params=camera.params_to_string()),
                              extraction_options=extraction, device=pycolmap.Device.cpu)
    with pycolmap.Database.open(database) as db:
        features = [db.num_keypoints_for_image(image.image_id) for image in db.read_all_images()]
        pycolmap.apply_rig_config([config], db)
    lap("features")
    if np.median(features) < MIN_FEATURES:
        raise ValueError(f"features: a median of {np.median(features):.0f} SIFT features per view (need "
                         f"{MIN_FEATURES}); the scene is too plain for structure from motion")
    matching = pycolmap.FeatureMatchingOptions(num_threads=threads, rig_verification=True,
                                               skip_image_pairs_in_same_frame=True)
    pycolmap.match_sequential(database, pairing_options=pycolmap.SequentialPairingOptions(overlap=10),
                              matching_options=matching, device=pycolmap.Device.cpu)
    lap("matching")
    options = pycolmap.IncrementalPipelineOptions(
        num_threads=threads, random_seed=seed, min_model_size=MIN_MODEL_FRAMES, ba_refine_sensor_from_rig=False,
        ba_refine_focal_length=False, ba_refine_principal_point=False, ba_refine_extra_params=False)
    (work / "sparse").mkdir(exist_ok=True)
    recs = pycolmap.incremental_mapping(database, images, work / "sparse", options)
    lap("mapping")
    models = [m for m in (_model(rec) for rec in recs.values()) if len(m.frames) >= MIN_MODEL_FRAMES]
    if not models:
        raise ValueError(f"reconstruction: COLMAP registered no model of {MIN_MODEL_FRAMES} or more of the "
                         f"{len(panoramas)} keyframes (too little overlap between them, or too few features)")
    return sorted(models, key=lambda m: -len(m.frames))


def _model(rec) -> Model:
    """A Model of a pycolmap Reconstruction: the reference view's pose is the panorama's (RIG_VIEWS[0] is the
    panorama frame itself), keyframe index from the image name."""
    ref_from_pano = view_rotations()[0].T
    poses = {}
    for image in rec.images.values():
        if image.has_pose and image.name.startswith("view0/"):
            cam_from_world = image.cam_from_world().matrix()
            pano_from_world = np.eye(4)
            pano_from_world[:3, :3] = ref_from_pano.T @ cam_from_world[:3, :3]
            pano_from_world[:3, 3] = ref_from_pano.T @ cam_from_world[:3, 3]
            poses[int(Path(image.name).stem)] = np.linalg.inv(pano_from_world)
    frames = sorted(poses)
    points = np.array([p.xyz for p in rec.points3D.values()], dtype=np.float64).reshape(-1, 3)
    return Model(frames, np.stack([poses[f] for f in frames]) if frames else np.zeros((0, 4, 4)), points)
