"""Tour specs into tours (diffpano.pipelines.tours): the one path of the model deployment, bulk jobs and evaluation."""

from __future__ import annotations

import numpy as np

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
