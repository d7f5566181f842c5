"""Prompt adherence: prompt parsing, the room-type / wall-colour classifier, the shipped weights and the metric."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from diffpano.data.captions import OPENERS, FaceFacts, FrameFacts, TemplateSummariser
from diffpano.data.procedural.build import ProceduralSpec, render_clips
from diffpano.data.procedural.furniture import Item
from diffpano.data.procedural.materials import FLOORS, WALL_COLOURS
from diffpano.data.procedural.scenes import ROOM_TYPES
from diffpano.metrics.adherence import (
    BUNDLED,
    AdherenceClassifier,
    accuracy,
    adherence,
    load_classifier,
    make_training_set,
    parse_prompt,
    predict,
    predict_logits,
    save_classifier,
    train_classifier,
)

HELD_OUT_SEED = 424242  # neither the shipped classifier (seed 0) nor the small one below trained on these scenes


@pytest.fixture
def one_thread():
    """Train on one thread: two threads on a loaded two-core machine stall far more than they gain."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def held_out():
    """120 labelled views (30 scenes x 4) from scenes no classifier here was trained on."""
    return make_training_set(30, 4, seed=HELD_OUT_SEED)


@pytest.fixture(scope="module")
def shipped():
    """The classifier shipped in diffpano/assets/metrics/adherence."""
    return load_classifier(device="cpu")


@pytest.mark.parametrize(("prompt", "room", "wall"), [
    # dataset caption openers
    ("A bedroom with blue walls and a wooden floor. There is a white bed.", "bedroom", "blue"),
    ("This cozy office has black walls and a gray carpet.", "office", "black"),
    ("The kitchen is painted green and has a white tiled floor.", "kitchen", "green"),
    ("A view of a bright living room with beige walls and a stone floor. A doorway leads to the kitchen.",
     "living room", "beige"),
    # user prompts
    ("a blue bedroom", "bedroom", "blue"),
    ("A living room with green walls.", "living room", "green"),
    ("a cozy dark red office", "office", "red"),
    ("Grey walls in a corridor", "hallway", "gray"),
    ("A LIVING-ROOM WITH PURPLE WALLS", "living room", "purple"),
    ("the walls of the hallway are yellow", "hallway", "yellow"),
    ("an office with walls painted in a pale pink", "office", "pink"),
    ("A cozy bedroom, painted orange, with a white bed", "bedroom", "orange"),
    ("a bathroom with brown-painted walls", "bathroom", "brown"),
    # furniture and floor colours are not wall colours
    ("A bedroom with a white bed and a gray carpet.", "bedroom", None),
    ("a kitchen with a red fridge, a black table and a white tiled floor", "kitchen", None),
    ("a bedroom with a bed painted white", "bedroom", None),
    ("A white sofa and a blue rug in a living room with yellow walls", "living room", "yellow"),
    ("a blue bedroom with a white bed", "bedroom", "blue"),
    # another room named as elsewhere is not the room shown
    ("A bedroom next to a blue kitchen", "bedroom", None),
    ("a doorway to a kitchen", None, None),
    # missing information
    ("an office", "office", None),
    ("a room with white walls", None, "white"),
    ("a cozy room", None, None),
    ("", None, None),
])
def test_parse_prompt(prompt, room, wall):
    assert parse_prompt(prompt) == (room, wall)


def test_parse_prompt_reads_every_dataset_caption():
    # Every opener, room type and wall colour, with furniture of other colours and a doorway to another room.
    items = [Item("bed", "white"), Item("rug", "gray"), Item("table", "black")]
    captions = []
    for k, (room, wall) in enumerate(itertools.product(ROOM_TYPES, WALL_COLOURS)):
        floor = list(FLOORS.values())[k % len(FLOORS)][0]
        other = ROOM_TYPES[(ROOM_TYPES.index(room) + 1) % len(ROOM_TYPES)]
        faces = [FaceFacts(items[:1], window=True, next_rooms=[other])] + [FaceFacts() for _ in range(5)]
        for seed in range(4):
            caption = TemplateSummariser(k * 10 + seed).summarise([], FrameFacts(room, wall, floor, faces, items))
            captions.append(caption)
            assert parse_prompt(caption) == (room, wall), caption
    starts = ("This ", "A view of ", "The ")
    assert all(any(c.startswith(s) for c in captions) for s in starts)  # every opener of OPENERS was read
    assert any(not c.startswith(starts) for c in captions) and len(OPENERS) == 4


def test_parse_prompt_rejects_non_text():
    with pytest.raises(ValueError, match="text"):
        parse_prompt(None)


def test_classifier_is_small_and_seamless():
    model = AdherenceClassifier().eval()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 1_000_000
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        rooms, colours = model(x)
        rolled = model(torch.roll(x, 16, dims=-1))  # circular padding: a roll by the total stride is an exact symmetry
    assert rooms.shape == (2, 6) and colours.shape == (2, 12)
    torch.testing.assert_close(rolled[0], rooms, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rolled[1], colours, atol=1e-4, rtol=1e-4)


def test_training_set_labels_match_rooms():
    images, rooms, colours = make_training_set(3, 2, seed=1)
    assert images.shape == (6, 64, 128, 3) and images.dtype == np.uint8
    assert rooms.shape == colours.shape == (6,)
    assert rooms.max() < len(ROOM_TYPES) and colours.max() < len(WALL_COLOURS)
    again = make_training_set(3, 2, seed=1)
    np.testing.assert_array_equal(again[0], images)


def test_short_training_beats_chance(held_out, one_thread):
    # 40 scenes x 4 views, 150 steps of 32 (about 9 s on one core): measured held-out room 0.36-0.45 and wall
    # 0.96-1.00 over training seeds 0-2 and two training sets. Chance is 0.17 and 0.08, always naming the commonest
    # room type of this held-out set scores 0.24: the thresholds sit above that with a margin below the measured.
    images, rooms, colours = make_training_set(40, 4, seed=100)
    model = train_classifier(images, rooms, colours, steps=150, batch_size=32, seed=0, progress=False, device="cpu")
    scores = accuracy(model, *held_out)
    assert scores["room_accuracy"] >= 0.3, scores
    assert scores["wall_accuracy"] >= 0.8, scores


def test_shipped_classifier_is_accurate(shipped, held_out):
    # Measured on fresh held-out scenes (four sets of 120 views): room 0.82-0.88 (0.84 on this one), wall 1.00.
    assert (BUNDLED / "model.safetensors").stat().st_size < 2_000_000
    scores = accuracy(shipped, *held_out)
    assert scores["room_accuracy"] >= 0.7, scores
    assert scores["wall_accuracy"] >= 0.95, scores


def test_shipped_classifier_reads_larger_panoramas(shipped):
    # Generated panoramas come larger than 64x128 and are area-resized: 128x256 renderings read like 64x128 ones
    # (measured here: room 0.95, wall 1.00 on 20 views; at 256x512: room 0.93, wall 1.00 on 60 views).
    images, rooms, colours = make_training_set(10, 2, size=(128, 256), seed=HELD_OUT_SEED + 1)
    scores = accuracy(shipped, images, rooms, colours)
    assert scores["wall_accuracy"] >= 0.9, scores
    assert scores["room_accuracy"] >= 0.55, scores


def test_adherence_own_captions_beat_shuffled(shipped):
    # Dataset keyframes and their own captions (measured room 0.80, wall 1.00) against the same keyframes with the
    # captions of other scenes (measured room 0.15, wall 0.00).
    spec = ProceduralSpec(scenes=10, clips_per_scene=1, frames=4, height=64, width=128, depth=False, face_size=16,
                          seed=31)
    clips = [clip for s in range(spec.scenes) for clip in render_clips(spec, s, [0])]
    images = np.concatenate([c.rgb for c in clips])
    prompts = [p for c in clips for p in c.captions]
    own = adherence(shipped, images, prompts)
    shuffled = adherence(shipped, images, prompts[len(prompts) // 2 :] + prompts[: len(prompts) // 2])
    assert own["rooms_stated"] == own["walls_stated"] == own["count"] == 40
    assert own["wall_accuracy"] >= 0.9 and own["room_accuracy"] >= 0.6, own
    assert shuffled["wall_accuracy"] <= 0.3, shuffled
    assert shuffled["room_accuracy"] <= own["room_accuracy"] - 0.3, (own, shuffled)


def test_adherence_leaves_out_unstated_prompts(shipped, held_out):
    images = held_out[0][:3]
    rooms, colours = predict(shipped, images)
    prompts = [f"a {colours[0]} {rooms[0]}", "a cozy room", f"a room with {colours[2]} walls"]
    out = adherence(shipped, images, prompts)
    assert out["rooms_stated"] == 1 and out["rooms_unstated"] == 2 and out["room_accuracy"] == 1.0
    assert out["walls_stated"] == 2 and out["walls_unstated"] == 1 and out["wall_accuracy"] == 1.0
    assert adherence(shipped, images[:1], ["a cozy room"])["room_accuracy"] is None


def test_predict_accepts_uint8_arrays_and_unit_tensors(shipped, held_out):
    images = held_out[0][:4]
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert predict(shipped, images) == predict(shipped, as_tensor)
    rooms, colours = predict(shipped, images)
    assert all(r in ROOM_TYPES for r in rooms) and all(c in WALL_COLOURS for c in colours)


def test_save_load_round_trip(tmp_path, held_out):
    model = AdherenceClassifier()
    torch.nn.init.normal_(model.room_head.weight)
    save_classifier(model, tmp_path / "clf", info={"steps": 0})
    loaded = load_classifier(tmp_path / "clf", device="cpu")
    images = held_out[0][:8]
    before, after = predict_logits(model, images), predict_logits(loaded, images)
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=0)
    assert predict(model, images) == predict(loaded, images)
    assert loaded.rooms == ROOM_TYPES and loaded.colours == tuple(WALL_COLOURS)
    with pytest.raises(FileNotFoundError, match="directory"):
        load_classifier(tmp_path / "missing")


@pytest.mark.parametrize("shape", [(2, 64, 100, 3), (2, 64, 128, 4), (64, 128), (2, 3, 64, 64)])
def test_wrong_panorama_shape_raises(shipped, shape):
    with pytest.raises(ValueError, match="panoramas"):
        predict(shipped, np.zeros(shape, np.uint8))


def test_bad_inputs_raise_naming_the_argument(shipped, held_out):
    images = held_out[0][:2]
    with pytest.raises(ValueError, match="prompts"):
        adherence(shipped, images, ["a blue bedroom"])
    with pytest.raises(ValueError, match="prompts"):
        adherence(shipped, images, "a blue bedroom")
    with pytest.raises(ValueError, match="panoramas"):
        adherence(shipped, images[:, :, :100], ["a", "b"])
    with pytest.raises(ValueError, match="rooms"):
        train_classifier(images, np.zeros(3, np.int64), np.zeros(2, np.int64), steps=1, progress=False)
    with pytest.raises(ValueError, match="images"):
        train_classifier(images[..., 0], np.zeros(2, np.int64), np.zeros(2, np.int64), steps=1, progress=False)
    with pytest.raises(ValueError, match="size"):
        make_training_set(1, 1, size=(64, 100))


def test_model_space_tensors_are_refused(shipped):
    with pytest.raises(ValueError, match="panoramas.*\\[0, 1\\]"):
        predict(shipped, torch.rand(1, 3, 64, 128) * 2 - 1)
