"""Captions in two steps, as in the paper: a captioner per cube face, then a summariser that merges six captions.

The built-in pair reads the scene graph (what each face shows); `Blip2Captioner` and `LLMSummariser` plug in
real models from local directories through transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from diffpano.data.procedural.furniture import Item
from diffpano.data.procedural.materials import FLOORS
from diffpano.data.procedural.render import DOOR, FIRST_ITEM_LABEL, WINDOW, View
from diffpano.geometry.projection import equirect_to_cubemap

if TYPE_CHECKING:
    from diffpano.data.procedural.scene_mesh import SceneMeshRenderer

FACE_NAMES = ("front", "right", "back", "left", "up", "down")
MIN_SHARE = 0.01  # a thing must cover 1% of a face to be mentioned
SUMMARY_INSTRUCTION = (
    "Given six prompts describing a room, summarize them into a single caption of two or three sentences "
    "describing what the room looks like."
)


@dataclass
class FaceFacts:
    """What one cube face shows: items by visible share, window, door, and rooms seen through doorways."""

    items: list[Item] = field(default_factory=list)
    window: bool = False
    door: bool = False
    next_rooms: list[str] = field(default_factory=list)


@dataclass
class FrameFacts:
    """What a keyframe shows: the camera's room, its items by visible area, and the six faces."""

    room: str
    wall: str
    floor: str
    faces: list[FaceFacts]
    items: list[Item] = field(default_factory=list)


def frame_facts(renderer: SceneMeshRenderer, cube: View, room_index: int) -> FrameFacts:
    """Facts of a keyframe from its cube-face rendering (labels and rooms per pixel)."""
    scene = renderer.scene
    room = scene.rooms[room_index]
    faces, area = [], {}
    for k, (label, rooms) in enumerate(zip(cube.label, cube.room, strict=True)):
        n = label.size
        ids, counts = np.unique(label[label >= FIRST_ITEM_LABEL], return_counts=True)
        items = []
        for i in np.argsort(-counts):
            item = renderer.items[int(ids[i]) - FIRST_ITEM_LABEL]
            own = renderer.item_room[int(ids[i]) - FIRST_ITEM_LABEL] == room_index
            if own and counts[i] >= MIN_SHARE * n and (item.noun != "ceiling light" or FACE_NAMES[k] == "up"):
                items.append(item)
                area[id(item)] = (area.get(id(item), (0, item))[0] + int(counts[i]), item)
        other, other_counts = np.unique(rooms[(rooms != room_index) & (rooms < len(scene.rooms))], return_counts=True)
        seen = zip(other, other_counts, strict=True)
        next_rooms = [scene.rooms[int(r)].kind for r, c in seen if c >= 3 * MIN_SHARE * n]
        faces.append(FaceFacts(items, bool((label == WINDOW).mean() >= MIN_SHARE),
                               bool((label == DOOR).mean() >= MIN_SHARE), next_rooms))
    ranked = [item for _, item in sorted(area.values(), key=lambda x: -x[0]) if item.noun != "ceiling light"]
    return FrameFacts(room.kind, room.wall, FLOORS[room.floor][0], faces, ranked)


class FaceCaptioner(Protocol):
    """Captions each of six cube faces (6, s, s, 3) uint8; facts are given when the scene graph is known."""

    def caption_faces(self, faces: np.ndarray, facts: FrameFacts | None = None) -> list[str]: ...


class Summariser(Protocol):
    """Merges six face captions into one panorama caption."""

    def summarise(self, captions: list[str], facts: FrameFacts | None = None) -> str: ...


def a(word: str) -> str:
    """The word with its indefinite article."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def listing(things: list[str]) -> str:
    """'a, b and c'."""
    return things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]


class SceneGraphCaptioner:
    """BLIP2-style short captions of each face, read from the scene graph."""

    def caption_faces(self, faces: np.ndarray | None, facts: FrameFacts | None = None) -> list[str]:
        """Six short captions: four walls, the ceiling, the floor."""
        if facts is None:
            raise ValueError("facts: SceneGraphCaptioner needs the frame's scene-graph facts")
        out = []
        for name, face in zip(FACE_NAMES, facts.faces, strict=True):
            if name == "up":
                light = " with a ceiling light" if any(i.noun == "ceiling light" for i in face.items) else ""
                out.append(f"the ceiling of {a(facts.room)}{light}")
            elif name == "down":
                out.append(f"{facts.floor} in {a(facts.room)}")
            elif face.items:
                out.append(f"{a(facts.room)} with {facts.wall} walls and {face.items[0].phrase}")
            elif face.window:
                out.append(f"a {facts.wall} wall with a window in {a(facts.room)}")
            elif face.next_rooms:
                out.append(f"a doorway to {a(face.next_rooms[0])}")
            else:
                out.append(f"a {facts.wall} wall in {a(facts.room)}")
        return out


OPENERS = (
    "{a_adj_room} with {wall} walls and {floor}.",
    "This {adj}{room} has {wall} walls and {floor}.",
    "A view of {a_adj_room} with {wall} walls and {floor}.",
    "The {room} is painted {wall} and has {floor}.",
)
PLACINGS = ("stands", "sits", "is placed")


class TemplateSummariser:
    """Two or three varied sentences from the facts: room, walls, floor, main furniture, windows and doorways."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def summarise(self, captions: list[str], facts: FrameFacts | None = None) -> str:
        """One panorama caption."""
        if facts is None:
            raise ValueError("facts: TemplateSummariser needs the frame's scene-graph facts")
        rng = self.rng
        adj = str(rng.choice(["", "", "cozy ", "bright ", "quiet ", "modern "]))
        opener = str(rng.choice(OPENERS)).format(
            a_adj_room=a(adj + facts.room), adj=adj, room=facts.room, wall=facts.wall, floor=facts.floor
        )
        sentences = [opener[0].upper() + opener[1:]]
        items = facts.items[:3]
        under = next((i for i in items if i.under_window), None)
        if under is not None:
            sentences.append(f"{under.phrase.capitalize()} {rng.choice(PLACINGS)} under the window.")
            items = [i for i in items if i is not under]
        if items:
            phrases = [i.phrase for i in items]
            sentences.append(str(rng.choice([
                "There is {x}.", "It is furnished with {x}.", "The room contains {x}.", "You can see {x}.",
            ])).format(x=listing(phrases)))
        nxt = next((r for f in facts.faces for r in f.next_rooms), None)
        if nxt and len(sentences) < 3:
            sentences.append(f"A doorway leads to the {nxt}.")
        elif under is None and any(f.window for f in facts.faces) and len(sentences) < 3:
            sentences.append(str(rng.choice(["Light comes in through a window.", "There is a window."])))
        return " ".join(sentences)


class Blip2Captioner:
    """Face captions from a local BLIP2 directory (transformers), as in the paper."""

    def __init__(self, model_dir: str, device: str = "cpu", prompt: str | None = None, max_new_tokens: int = 30):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.processor = Blip2Processor.from_pretrained(model_dir, local_files_only=True)
        self.model = Blip2ForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.device, self.prompt, self.max_new_tokens = device, prompt, max_new_tokens

    def caption_faces(self, faces: np.ndarray, facts: FrameFacts | None = None) -> list[str]:
        """Six captions, one generation batch."""
        import torch

        inputs = self.processor(images=list(faces), text=[self.prompt] * len(faces) if self.prompt else None,
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


class LLMSummariser:
    """Merges face captions with a local causal language model (transformers), as in the paper."""

    def __init__(self, model_dir: str, device: str = "cpu", max_new_tokens: int = 96):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def prompt(self, captions: list[str]) -> str:
        """The instruction and the six captions, in the model's chat format when it has one."""
        text = SUMMARY_INSTRUCTION + "\n" + "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text + "\nCaption:"

    def summarise(self, captions: list[str], facts: FrameFacts | None = None) -> str:
        """One caption, greedy decoding."""
        import torch

        inputs = self.tokenizer(self.prompt(captions), return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


class CaptionModels:
    """The face captioner and summariser a dataset spec names, loaded once per scene: local BLIP2 / LLM
    directories, or the scene-graph pair (its template summariser seeded per clip)."""

    def __init__(self, captioner: str | None = None, summariser: str | None = None) -> None:
        self.captioner: FaceCaptioner = Blip2Captioner(captioner) if captioner else SceneGraphCaptioner()
        self.summariser: Summariser | None = LLMSummariser(summariser) if summariser else None

    def pair(self, seed: int) -> tuple[FaceCaptioner, Summariser]:
        """(captioner, summariser) for one clip."""
        return self.captioner, self.summariser or TemplateSummariser(seed)


def caption_frame(
    renderer: SceneMeshRenderer, pose: np.ndarray, captioner: FaceCaptioner, summariser: Summariser, face_size: int = 64
) -> tuple[str, list[str]]:
    """(panorama caption, six face captions) of a keyframe."""
    cube = renderer.render_cube(pose, face_size)
    room = renderer.scene.locate(float(pose[0, 3]), float(pose[2, 3]))[0]
    facts = frame_facts(renderer, cube, room)
    faces = captioner.caption_faces(cube.rgb, facts)
    return summariser.summarise(faces, facts), faces


def caption_panorama(rgb: np.ndarray, captioner: FaceCaptioner, summariser: Summariser,
                     face_size: int = 64) -> tuple[str, list[str]]:
    """(panorama caption, six face captions) of a panorama image (H, W, 3) uint8 with no scene facts (captures)."""
    faces = equirect_to_cubemap(torch.from_numpy(rgb).permute(2, 0, 1).float(), face_size)
    faces = faces.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
    captions = captioner.caption_faces(faces)
    return summariser.summarise(captions), captions
