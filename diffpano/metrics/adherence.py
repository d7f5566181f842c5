"""Prompt adherence on procedural scenes: does a panorama show the room type and wall colour its prompt asks for?

A small seamless CNN, trained on the procedural renderer's own views, names the room type and wall colour of a
panorama; prompts are parsed for the room type and wall colour they state, and the two are compared.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffpano.data.procedural.prompts import COLOURS, parse_prompt
from diffpano.data.procedural.render import camera_pose
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import ROOM_TYPES, Room, Scene, generate_scene
from diffpano.data.procedural.walks import free_spot
from diffpano.geometry.spherical import check_panorama_size
from diffpano.geometry.trajectories import walk
from diffpano.metrics.images import channels_first, float_images
from diffpano.models.seamless import make_seamless
from diffpano.pipelines.loading import pick_device

INPUT_SIZE = (64, 128)
BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "metrics" / "adherence"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
CAMERA_CLEARANCE = 0.35  # metres from walls and furniture footprints
HELD_OUT_SEED_OFFSET = 1_000_003  # the classifier's held-out scenes: seed + this, so they are not training scenes
FLOORS = ("a wooden floor", "a carpet", "a tiled floor", "a stone floor")

def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AdherenceClassifier(nn.Module):
    """Seamless CNN on (N, 3, 64, 128) panoramas in [0, 1]: room-type logits (N, 6) and wall-colour logits (N, 12)."""

    def __init__(self, width: int = 24, rooms: Sequence[str] = ROOM_TYPES, colours: Sequence[str] = COLOURS) -> None:
        super().__init__()
        self.width, self.rooms, self.colours = width, tuple(rooms), tuple(colours)
        w = width
        self.features = nn.Sequential(
            _block(3, w // 2, 2), _block(w // 2, w, 2), _block(w, w, 1), _block(w, 2 * w, 2),
            _block(2 * w, 2 * w, 1), _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
        )
        self.dropout = nn.Dropout(0.2)
        self.room_head = nn.Linear(8 * w, len(self.rooms))
        # Wall colour is mostly a matter of pooled colour statistics; the head also sees the mean input colour.
        self.colour_head = nn.Linear(8 * w + 3, len(self.colours))
        make_seamless(self)

    def config(self) -> dict:
        """Constructor arguments, JSON-serialisable."""
        return {"width": self.width, "rooms": list(self.rooms), "colours": list(self.colours),
                "input_size": list(INPUT_SIZE)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(room logits, colour logits) of images (N, 3, 64, 128) in [0, 1]."""
        mean = x.mean((2, 3))
        f = self.features(x * 2 - 1)
        pooled = self.dropout(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))
        return self.room_head(pooled), self.colour_head(torch.cat([pooled, mean], 1))


def _as_input(panoramas: np.ndarray | torch.Tensor, arg: str = "panoramas") -> torch.Tensor:
    """(N, 3, 64, 128) float in [0, 1] of uint8 (N, H, W, 3) images or float (N, 3, H, W) tensors in [0, 1]."""
    x = channels_first(panoramas, arg, single=True)
    check_panorama_size(int(x.shape[2]), int(x.shape[3]), field=arg)
    # Area averaging: a generated 256x512 panorama looks like a supersampled rendering, not an aliased one.
    return float_images(x, name=arg, check_range=True, size=INPUT_SIZE)


@torch.no_grad()
def predict_logits(
    model: AdherenceClassifier, panoramas: np.ndarray | torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(room logits (N, 6), colour logits (N, 12)) on the CPU, in batches, with the model in eval mode."""
    x = _as_input(panoramas)
    device = next(model.parameters()).device
    model.eval()
    rooms, colours = [], []
    for k in range(0, len(x), batch_size):
        r, c = model(x[k : k + batch_size].to(device))
        rooms.append(r.float().cpu())
        colours.append(c.float().cpu())
    if not rooms:
        return torch.zeros(0, len(model.rooms)), torch.zeros(0, len(model.colours))
    return torch.cat(rooms), torch.cat(colours)


def predict(model: AdherenceClassifier, panoramas: np.ndarray | torch.Tensor) -> tuple[list[str], list[str]]:
    """(room type names, wall colour names) of panoramas: uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]."""
    rooms, colours = predict_logits(model, panoramas)
    return [model.rooms[i] for i in rooms.argmax(1).tolist()], [model.colours[i] for i in colours.argmax(1).tolist()]


def save_classifier(model: AdherenceClassifier, directory: str | Path, info: dict | None = None) -> Path:
    """Write config.json (with `info`, e.g. how it was trained, under "training") and model.safetensors; the dir."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    config = model.config() | ({"training": info} if info else {})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_classifier(directory: str | Path = BUNDLED, device: str | torch.device | None = None) -> AdherenceClassifier:
    """The classifier saved in a directory (default: the one shipped with diffpano), in eval mode on the device."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"directory: {path} holds no {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((path / CONFIG_FILE).read_text())
    model = AdherenceClassifier(config["width"], config["rooms"], config["colours"])
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.to(pick_device(device)).eval()


def _camera_spot(scene: Scene, room: Room, rng: np.random.Generator) -> tuple[float, float]:
    """A floor point in the room: near its hub half the time, anywhere free otherwise (the hub when nothing fits)."""
    hub = room.meeting_point
    near_hub = rng.random() < 0.5
    for _ in range(30):
        if near_hub:
            x, z = hub + rng.normal(0, 0.5, 2)
        else:
            x, z = rng.uniform(room.x0, room.x1), rng.uniform(room.z0, room.z1)
        if free_spot(scene, room, float(x), float(z), CAMERA_CLEARANCE):
            return float(x), float(z)
    return float(hub[0]), float(hub[1])


def training_seed(seed: int, index: int) -> int:
    """Scene seed of the index-th scene of a training set."""
    return int(np.random.SeedSequence([seed, index, 0xADE]).generate_state(1)[0])


def make_training_set(
    num_scenes: int, views_per_scene: int, size: tuple[int, int] = INPUT_SIZE, seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), room labels (N,), colour labels (N,)) rendered from random rooms of random scenes.

    Labels index ROOM_TYPES and the wall colours; rooms are visited in turn so small rooms get their share.
    """
    if num_scenes < 1:
        raise ValueError(f"num_scenes: need at least one scene, got {num_scenes}")
    if views_per_scene < 1:
        raise ValueError(f"views_per_scene: need at least one view per scene, got {views_per_scene}")
    h, w = size
    check_panorama_size(h, w, field="size")
    rng = np.random.default_rng([seed, 0xADE])
    images = np.zeros((num_scenes * views_per_scene, h, w, 3), np.uint8)
    rooms = np.zeros(len(images), np.int64)
    colours = np.zeros(len(images), np.int64)
    n = 0
    for s in tqdm(range(num_scenes), desc="render", disable=not progress):
        scene = generate_scene(training_seed(seed, s))
        renderer = SceneMeshRenderer(scene)
        order = rng.permutation(len(scene.rooms))
        for v in range(views_per_scene):
            room = scene.rooms[int(order[v % len(order)])]
            x, z = _camera_spot(scene, room, rng)
            eye = scene.eye_height + float(rng.uniform(-0.15, 0.15))
            pose = camera_pose(x, z, float(rng.uniform(-np.pi, np.pi)), eye)
            images[n] = renderer.render(pose, h, w).rgb
            rooms[n], colours[n] = ROOM_TYPES.index(room.kind), COLOURS.index(room.wall)
            n += 1
    return images, rooms, colours



def _check_labels(images: np.ndarray, rooms: np.ndarray, colours: np.ndarray) -> None:
    """Raise ValueError naming the argument when images and labels do not match."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    for name, labels, count in (("rooms", rooms, len(ROOM_TYPES)), ("colours", colours, len(COLOURS))):
        if labels.shape != (len(images),):
            raise ValueError(f"{name}: expected one label per image ({len(images)}), got shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= count):
            raise ValueError(f"{name}: labels must be in [0, {count}), got [{labels.min()}, {labels.max()}]")


def train_classifier(
    images: np.ndarray, rooms: np.ndarray, colours: np.ndarray, steps: int = 600, batch_size: int = 64,
    lr: float = 3e-3, seed: int = 0, progress: bool = True, device: str | torch.device | None = None,
    width: int = 24,
) -> AdherenceClassifier:
    """A classifier trained with Adam on both heads' cross entropy, images rolled by a random yaw and mirrored."""
    images, rooms, colours = np.asarray(images), np.asarray(rooms), np.asarray(colours)
    _check_labels(images, rooms, colours)
    if len(images) == 0:
        raise ValueError("images: need at least one training image")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps: need steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    dev = pick_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = _as_input(images, "images")
    y_room, y_colour = torch.as_tensor(rooms), torch.as_tensor(colours)
    model = AdherenceClassifier(width).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(range(steps), desc="train adherence", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        x = x_all[idx]
        # Labels do not depend on yaw: roll the columns, and mirror (a mirrored room is still the same room).
        shifts = torch.randint(x.shape[-1], (batch_size,), generator=gen)
        cols = (torch.arange(x.shape[-1])[None] + shifts[:, None]) % x.shape[-1]
        x = torch.gather(x, 3, cols[:, None, None, :].expand(-1, 3, x.shape[2], -1))
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        # A little brightness jitter so generated images with other exposure still read the same.
        x = (x * (1 + 0.1 * (torch.rand(batch_size, 1, 1, 1, generator=gen) * 2 - 1))).clamp(0, 1)
        logits_room, logits_colour = model(x.to(dev))
        loss = F.cross_entropy(logits_room, y_room[idx].to(dev)) + F.cross_entropy(logits_colour, y_colour[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def accuracy(model: AdherenceClassifier, images: np.ndarray, rooms: np.ndarray, colours: np.ndarray) -> dict:
    """Room and wall accuracy of the classifier on labelled images."""
    images, rooms, colours = np.asarray(images), np.asarray(rooms), np.asarray(colours)
    _check_labels(images, rooms, colours)
    pr, pc = predict_logits(model, images)
    return {"room_accuracy": float((pr.argmax(1).numpy() == rooms).mean()),
            "wall_accuracy": float((pc.argmax(1).numpy() == colours).mean()), "count": len(images)}



def adherence(model: AdherenceClassifier, panoramas: np.ndarray | torch.Tensor, prompts: Sequence[str]) -> dict:
    """Share of panoramas showing the room type and wall colour their prompts state.

    Prompts that state no room type (no wall colour) are left out of room_accuracy (wall_accuracy) and counted in
    rooms_unstated (walls_unstated); an accuracy over no prompts is None.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("prompts: expected a sequence of prompt strings, one per panorama")
    x = _as_input(panoramas)
    if len(prompts) != len(x):
        raise ValueError(f"prompts: need one prompt per panorama, got {len(prompts)} prompts for {len(x)} panoramas")
    wanted = [parse_prompt(p) for p in prompts]
    rooms, colours = predict(model, x)
    room_hits = [got == want for (want, _), got in zip(wanted, rooms, strict=True) if want is not None]
    wall_hits = [got == want for (_, want), got in zip(wanted, colours, strict=True) if want is not None]
    return {
        "room_accuracy": float(np.mean(room_hits)) if room_hits else None,
        "wall_accuracy": float(np.mean(wall_hits)) if wall_hits else None,
        "rooms_stated": len(room_hits), "walls_stated": len(wall_hits),
        "rooms_unstated": len(x) - len(room_hits), "walls_unstated": len(x) - len(wall_hits),
        "count": len(x),
    }


def prompts_grid() -> list[str]:
    """The model card's 72 prompts: one per (wall colour, room type), in the dataset captions' style, floors cycling."""
    out = []
    for i, (colour, room) in enumerate(itertools.product(COLOURS, ROOM_TYPES)):
        article = "An" if room[0] in "aeiou" else "A"
        out.append(f"{article} {room} with {colour} walls and {FLOORS[i % len(FLOORS)]}.")
    return out


def prompt_panoramas(pipe, prompts: Sequence[str], **gen) -> np.ndarray:
    """One panorama per prompt (N, H, W, 3) uint8 from a pipeline, prompt i with seed i, in batches of 12 one-view
    tours; gen is passed on to the pipeline (height, width, num_inference_steps, guidance_scale, ...)."""
    images = []
    for i in range(0, len(prompts), 12):
        chunk = list(prompts[i : i + 12])
        out = pipe([[p] for p in chunk], np.stack([walk(1)] * len(chunk)), seed=list(range(i, i + len(chunk))), **gen)
        images.append(out.images[:, 0])
    return np.concatenate(images)
