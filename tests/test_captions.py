"""Captions: per-face then merged, naming the room type and wall colour of the room the camera stands in."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_captioners import write_tiny_blip2, write_tiny_llm

from diffpano.data.captions import (
    FACE_NAMES,
    SUMMARY_INSTRUCTION,
    Blip2Captioner,
    LLMSummariser,
    SceneGraphCaptioner,
    TemplateSummariser,
    caption_frame,
)
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import generate_scene
from diffpano.data.procedural.walks import clip_poses


@pytest.fixture(scope="module")
def captioned():
    """(room kind, wall colour, caption, face captions) of keyframes from ten scenes."""
    out = []
    for seed in range(10):
        scene = generate_scene(seed)
        renderer = SceneMeshRenderer(scene)
        summariser = TemplateSummariser(seed)
        for pose in clip_poses(scene, 3, 1.0, np.random.default_rng(seed)):
            room = scene.rooms[scene.locate(pose[0, 3], pose[2, 3])[0]]
            caption, faces = caption_frame(renderer, pose, SceneGraphCaptioner(), summariser, face_size=48)
            out.append((room.kind, room.wall, caption, faces))
    return out


def test_captions_name_room_type_and_wall_colour(captioned):
    for kind, wall, caption, faces in captioned:
        assert kind in caption and f"{wall} " in caption, caption
        assert len(faces) == len(FACE_NAMES)
        assert faces[4].startswith("the ceiling") and ("floor" in faces[5] or "carpet" in faces[5])
        assert 2 <= caption.count(".") <= 3 and caption[0].isupper()


def test_captions_are_varied_english(captioned):
    captions = [c for _, _, c, _ in captioned]
    openings = {" ".join(c.split()[:2]) for c in captions}
    assert len(set(captions)) == len(captions)
    assert len(openings) >= 4
    assert not any(" a office" in c or " a a" in c or "an " + "b" in c for c in captions)


def test_captions_mention_visible_furniture_of_the_room():
    scene = generate_scene(3)
    renderer = SceneMeshRenderer(scene)
    room = next(r for r in scene.rooms if r.kind == "kitchen")
    from diffpano.data.procedural.render import camera_pose

    caption, _ = caption_frame(renderer, camera_pose(*room.hub, 0.0, scene.eye_height), SceneGraphCaptioner(),
                               TemplateSummariser(0))
    nouns = [i.noun for i in room.items if i.noun != "ceiling light"]
    assert sum(n in caption for n in nouns) >= 1, (caption, nouns)


def test_scene_graph_pair_needs_facts():
    with pytest.raises(ValueError, match="facts"):
        SceneGraphCaptioner().caption_faces(np.zeros((6, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="facts"):
        TemplateSummariser().summarise(["a"] * 6)


def test_llm_summariser_loads_a_local_directory(tmp_path):
    """The model path of the paper's summariser: a (tiny, random) causal LM and tokenizer from a local folder."""
    summariser = LLMSummariser(write_tiny_llm(tmp_path), max_new_tokens=5)
    assert "1. a room with blue walls" in summariser.prompt(["a room with blue walls"] * 6)
    summary = summariser.summarise(["a room with blue walls"] * 6)
    # only the generated tokens, never the prompt echoed back: at most max_new_tokens (re-tokenized with a margin)
    assert SUMMARY_INSTRUCTION not in summary and "1. a room" not in summary, summary
    assert len(summariser.tokenizer(summary, add_special_tokens=False).input_ids) <= 10, summary
    assert summariser.summarise(["a room with blue walls"] * 6) == summary  # greedy: the same text again


def test_blip2_captioner_loads_a_local_directory(tmp_path):
    """The model path of the paper's face captioner: a (tiny, random) BLIP2 and processor from a local folder."""
    captioner = Blip2Captioner(write_tiny_blip2(tmp_path), max_new_tokens=4)
    faces = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    captions = captioner.caption_faces(faces)
    assert len(captions) == 6 and captioner.caption_faces(faces) == captions  # one per face, deterministic
    tokenizer = captioner.processor.tokenizer
    assert all(len(tokenizer(c, add_special_tokens=False).input_ids) <= 8 for c in captions), captions
