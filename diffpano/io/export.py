"""A tour exported for 3D tools: nerfstudio's `transforms.json` with equirectangular cameras, or a COLMAP text model
of the tour's cube faces with a PINHOLE camera, the input Gaussian-splatting trainers read. Conventions:
docs/export.md."""

from __future__ import annotations

import json

import numpy as np
import torch

from diffpano.geometry.projection import CUBE_FACE_ANGLES, CUBE_FACES, equirect_to_cubemap, view_rotation
from diffpano.io import storage
from diffpano.io.manifest import Tour, png_bytes, to_uint8

FORMATS = ("nerfstudio", "colmap")
# nerfstudio's cameras look along -z with +y up (OpenGL); ours along +z with +y down (OpenCV, docs/geometry.md).
OPENGL_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def view_file(index: int) -> str:
    """Where a view's panorama goes in a nerfstudio export (relative to it), named by its index in the tour."""
    return f"images/{index:03d}.png"


def face_name(index: int, face: str) -> str:
    """A cube face's image name in a COLMAP model: relative to the export's images/ folder, as COLMAP names images."""
    return f"{index:03d}_{face}.png"


def nerfstudio_transforms(tour: Tour) -> dict:
    """transforms.json of a tour: one EQUIRECTANGULAR camera (nerfstudio's focal length for it is the height), each
    view's image and camera-to-world in OpenGL axes."""
    height, width = tour.images.shape[1:3]
    poses = np.asarray(tour.poses, np.float64) @ OPENGL_FROM_OPENCV
    frames = [{"file_path": view_file(i), "transform_matrix": pose.tolist()} for i, pose in enumerate(poses)]
    return {"camera_model": "EQUIRECTANGULAR", "w": width, "h": height, "fl_x": float(height), "fl_y": float(height),
            "cx": width / 2, "cy": height / 2, "frames": frames}


def face_poses(pose: np.ndarray) -> np.ndarray:
    """(6, 4, 4) camera-to-world poses (OpenCV axes) of a view's cube faces, in CUBE_FACES order: the view's centre,
    turned by each face's yaw and pitch."""
    yaw = torch.tensor([a[0] for a in CUBE_FACE_ANGLES], dtype=torch.float64)
    pitch = torch.tensor([a[1] for a in CUBE_FACE_ANGLES], dtype=torch.float64)
    turns = np.round(view_rotation(yaw, pitch).numpy(), 12)  # exact 0 and 1 for quarter turns
    poses = np.repeat(np.asarray(pose, np.float64)[None], len(CUBE_FACES), axis=0)
    poses[:, :3, :3] = poses[:, :3, :3] @ turns
    return poses


def colmap_image_line(image_id: int, pose: np.ndarray, name: str) -> str:
    """An images.txt line: COLMAP stores world-to-camera, rotation as a unit quaternion (w, x, y, z)."""
    import pycolmap

    rotation = pose[:3, :3].T
    x, y, z, w = pycolmap.Rotation3d(rotation).quat  # Eigen's order
    tx, ty, tz = -rotation @ pose[:3, 3]
    return " ".join(str(v) for v in (image_id, w, x, y, z, tx, ty, tz, 1, name))


def colmap_model(tour: Tour, face_size: int) -> dict[str, str]:
    """cameras.txt, images.txt and points3D.txt of a tour's cube faces: one PINHOLE camera of 90 degrees shared by
    every face, each face's pose, no points (trainers that need points start from random ones)."""
    half = face_size / 2
    lines = [colmap_image_line(len(CUBE_FACES) * i + k + 1, pose, face_name(i, face))
             for i, view in enumerate(tour.poses)
             for k, (face, pose) in enumerate(zip(CUBE_FACES, face_poses(view), strict=True))]
    return {
        "cameras.txt": f"# CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]\n1 PINHOLE {face_size} {face_size} {half} {half} "
                       f"{half} {half}\n",
        "images.txt": "# IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then the image's 2D points (none)\n"
                      + "".join(f"{line}\n\n" for line in lines),
        "points3D.txt": "# POINT3D_ID X Y Z R G B ERROR TRACK[] (none)\n",
    }


def export_nerfstudio(tour: Tour, out: str) -> list[str]:
    """Write a tour as a nerfstudio dataset under out (local or s3://); the files written."""
    files = {view_file(i): png_bytes(image) for i, image in enumerate(tour.images)}
    files["transforms.json"] = json.dumps(nerfstudio_transforms(tour), indent=2).encode()
    return storage.write_files(out, files)


def export_colmap(tour: Tour, out: str, face_size: int | None = None) -> list[str]:
    """Write a tour as COLMAP images and a text model (sparse/0) of its cube faces under out; the files written.
    face_size defaults to the panorama's angular resolution (90 degrees of H rows over 180)."""
    size = face_size or tour.images.shape[1] // 2
    if size < 1:
        raise ValueError(f"face_size: must be a positive number of pixels, got {size}")
    panos = torch.from_numpy(tour.images).permute(0, 3, 1, 2).double() / 255.0
    faces = equirect_to_cubemap(panos, size).permute(0, 1, 3, 4, 2).numpy()  # (N, 6, s, s, 3)
    files = {f"images/{face_name(i, face)}": png_bytes(to_uint8(faces[i, k]))
             for i in range(len(faces)) for k, face in enumerate(CUBE_FACES)}
    files |= {f"sparse/0/{name}": text.encode() for name, text in colmap_model(tour, size).items()}
    return storage.write_files(out, files)
