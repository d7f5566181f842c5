"""Caption facts of a mesh keyframe from its per-face semantic labels: what each cube face shows, the room type the
objects suggest, and colour words measured from the rendered pixels; the captioner -> summariser stack does the rest.
"""

from __future__ import annotations

import numpy as np

from diffpano.data.captions import MIN_SHARE, FaceCaptioner, FaceFacts, FrameFacts, Summariser
from diffpano.data.meshes.mesh import STRUCTURE
from diffpano.data.meshes.raycast import MeshRenderer
from diffpano.data.procedural.furniture import Item
from diffpano.data.procedural.materials import WALL_COLOURS
from diffpano.data.procedural.render import View

ROOM_CUES = {  # object -> the room it suggests
    "bed": "bedroom", "toilet": "bathroom", "bathtub": "bathroom", "shower": "bathroom", "stove": "kitchen",
    "oven": "kitchen", "fridge": "kitchen", "dishwasher": "kitchen", "desk": "office", "monitor": "office",
    "computer": "office", "sofa": "living room", "tv": "living room", "fireplace": "living room",
    "dining table": "dining room", "washing machine": "laundry room",
}


def colour_word(rgb: np.ndarray) -> str:
    """The palette's nearest colour name to a mean RGB in [0, 1]."""
    names = list(WALL_COLOURS)
    d = np.linalg.norm(np.array([WALL_COLOURS[n] for n in names]) - rgb, axis=1)
    return names[int(np.argmin(d))]


def room_kind(nouns: list[str]) -> str:
    """The room type the largest visible object with a cue suggests (nouns by visible area), else 'room'."""
    return next((ROOM_CUES[n] for n in nouns if n in ROOM_CUES), "room")


def mesh_frame_facts(renderer: MeshRenderer, cube: View) -> FrameFacts:
    """FrameFacts of a keyframe of a labelled mesh, read from its six rendered cube faces."""
    labels = renderer.mesh.labels
    rgb = cube.rgb.reshape(-1, 3) / 255.0
    flat = cube.label.reshape(-1)

    def mean_colour(name: str) -> np.ndarray | None:
        sel = flat == labels.index(name) if name in labels else np.zeros_like(flat, bool)
        return rgb[sel].mean(0) if sel.any() else None

    faces, area = [], {}
    for label in cube.label:
        n = label.size
        ids, counts = np.unique(label[label >= 0], return_counts=True)
        items = []
        for i in np.argsort(-counts):
            noun = labels[int(ids[i])]
            if noun in STRUCTURE or counts[i] < MIN_SHARE * n:
                continue
            if noun not in area:
                area[noun] = [0, Item(noun, colour_word(mean_colour(noun)))]
            area[noun][0] += int(counts[i])
            items.append(area[noun][1])
        share = {s: (labels.index(s) == label).mean() if s in labels else 0.0 for s in ("window", "door")}
        faces.append(FaceFacts(items, share["window"] >= MIN_SHARE, share["door"] >= MIN_SHARE))
    ranked = [item for _, item in sorted(area.values(), key=lambda x: -x[0])]
    wall, floor = mean_colour("wall"), mean_colour("floor")
    return FrameFacts(room_kind([i.noun for i in ranked]), colour_word(wall) if wall is not None else "plain",
                      f"a {colour_word(floor)} floor" if floor is not None else "a floor", faces, ranked)


def caption_mesh_frame(renderer: MeshRenderer, pose: np.ndarray, captioner: FaceCaptioner, summariser: Summariser,
                       face_size: int = 64) -> tuple[str, list[str]]:
    """(panorama caption, six face captions): label facts when the mesh has labels, else the captioner's eyes."""
    cube = renderer.render_cube(pose, face_size)
    facts = mesh_frame_facts(renderer, cube) if renderer.mesh.has_labels else None
    faces = captioner.caption_faces(cube.rgb, facts)
    return summariser.summarise(faces, facts), faces
