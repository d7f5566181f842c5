"""Tour specs into tours (diffpano.pipelines.tours): the one path of the model deployment, bulk jobs and evaluation."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from diffpano.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from diffpano.io.manifest import Tour, commit_tours
from diffpano.pipelines.tours import make_tours, pending, record_failures, settings
from diffpano.specs import BulkSpec, validate_specs


def spec(tour_id: str, **fields) -> BulkSpec:
    """A two-view spec with fast settings."""
    return BulkSpec.model_validate({"tour_id": tour_id, "prompt": "a red kitchen", "num_views": 2, "seed": 3,
                                    "num_inference_steps": 2, "height": 16} | fields)


class CountingPipe:
    """The tiny pipeline, counting its calls."""

    def __init__(self, pipe) -> None:
        self.pipe, self.calls, self.model_name = pipe, [], pipe.model_name

    def __call__(self, prompts, poses, **kw):
        self.calls.append((len(prompts), kw.get("scheduler")))
        return self.pipe(prompts, poses, **kw)


def test_specs_sharing_settings_share_one_call_and_each_tour_is_as_if_alone(tiny_pipe):
    counting = CountingPipe(tiny_pipe)
    specs = [spec("a"), spec("b", seed=4), spec("c", scheduler="euler-a"), spec("d", num_views=3)]
    tours = make_tours(counting, specs)
    assert sorted(counting.calls, key=str) == sorted([(2, None), (1, "euler-a"), (1, None)], key=str)
    assert all(isinstance(t, Tour) for t in tours.values()) and list(tours) != []
    alone = make_tours(tiny_pipe, [spec("b", seed=4)])["b"]
    assert np.array_equal(alone.images, tours["b"].images) and tours["b"].seed == 4
    assert tours["d"].images.shape[0] == 3 and tours["a"].num_inference_steps == 2
    assert (tours["a"].scheduler, tours["c"].scheduler) == ("ddim", "euler-a")  # the model's own, or the one named


def test_defaults_come_from_the_library_and_a_failing_group_fails_alone(tiny_pipe):
    assert settings(BulkSpec(tour_id="x", prompt="a"))[3:5] == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    tours = make_tours(tiny_pipe, [spec("ok"), spec("bad", height=18)])  # not a multiple of the model's 4
    assert isinstance(tours["ok"], Tour)
    assert isinstance(tours["bad"], ValueError) and "height" in str(tours["bad"])


def data_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_given_panoramas_by_path_or_inline_are_kept_and_an_unreadable_one_fails_its_tour_alone(tiny_pipe, tmp_path):
    """images in a spec: an absolute path and a data: URI each come back exactly as given; a missing file fails its
    own tour, not the others'."""
    rng = np.random.default_rng(0)
    on_disk, inline = (rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(on_disk).save(tmp_path / "given.png")
    tours = make_tours(tiny_pipe, [spec("path", images={"0": str(tmp_path / "given.png")}),
                                   spec("inline", images={"1": data_uri(inline)}),
                                   spec("missing", images={"0": str(tmp_path / "missing.png")}), spec("plain")])
    assert np.array_equal(tours["path"].images[0], on_disk) and np.array_equal(tours["inline"].images[1], inline)
    assert isinstance(tours["missing"], ValueError) and "images.0: there is no file" in str(tours["missing"])
    assert isinstance(tours["plain"], Tour)


@pytest.mark.parametrize(("images", "message"), [
    ({"2": "/a.png"}, "images: view 2 is outside the tour's 2 views"),
    ({"0": "given.png"}, "images.0: a data:image/png;base64,... URI, an s3:// URI or an absolute path"),
    ({"0": "data:image/png;base64," + "A" * (12 << 20)}, "images.0: an inline image may hold at most 8 MiB"),
])
def test_given_panoramas_a_spec_cannot_use_are_refused_naming_the_view(images, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        spec("t", images=images)


def test_pending_skips_tours_in_the_manifest_and_failures_are_recorded_once(tiny_pipe, tmp_path):
    out = str(tmp_path / "out")
    specs = [spec("a"), spec("b")]
    commit_tours(out, [make_tours(tiny_pipe, specs[:1])["a"]])
    assert [s.tour_id for s in pending(out, specs)] == ["b"]
    assert record_failures(out, "run", []) is None
    uri = record_failures(out, "run", [{"tour_id": "b", "error": "ValueError: x"}])
    written = (tmp_path / "out" / "failures" / "run.jsonl").read_text()
    assert written == '{"tour_id": "b", "error": "ValueError: x"}\n'
    assert uri.endswith("failures/run.jsonl")


def test_a_spec_names_a_known_scheduler_or_is_refused_naming_the_field():
    good, bad = validate_specs([{"tour_id": "a", "prompt": "x", "scheduler": "dpmpp-2m"},
                                {"tour_id": "b", "prompt": "x", "scheduler": "plms"}])
    assert [s.scheduler for s in good] == ["dpmpp-2m"]
    assert bad[0].line == 2 and bad[0].field == "scheduler"
