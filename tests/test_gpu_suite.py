"""bench/gpu_suite.py rehearsed on the CPU (--dry-run): every section runs and reports numbers into one folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["cuda_tests", "training", "tours_bundled", "tours_sd", "serve", "bulk"]

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.serve]


def dry_run_of(out: Path, *options: str) -> subprocess.CompletedProcess:
    """The suite's dry run into out, with options."""
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out),
                           *options], cwd=ROOT, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The suite's whole dry run (eager cases) into a fresh folder, and the finished process."""
    out = tmp_path_factory.mktemp("gpu-suite")
    return out, dry_run_of(out)


def test_the_dry_run_succeeds_and_prints_progress_and_a_summary(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for i, name in enumerate(SECTIONS, 1):
        assert f"[{i}/{len(SECTIONS)}] {name}: " in done.stdout
    assert "first results" in done.stdout and "summary in" in done.stdout  # the final table


def test_every_section_reports_finite_positive_numbers(dry_run):
    out, _ = dry_run
    payload = json.loads((out / "summary.json").read_text())
    assert payload["mode"] == "dry-run" and list(payload["sections"]) == SECTIONS
    for name, section in payload["sections"].items():
        assert section["metrics"], (name, section)
        for key, value in section["metrics"].items():
            assert math.isfinite(value) and value > 0, (name, key, value)
        expected = "skipped" if name == "cuda_tests" else "ok"
        assert section["status"] == expected, (name, section["reason"], section["log_tail"])
    assert "no CUDA device" in payload["sections"]["cuda_tests"]["reason"]
    training = payload["sections"]["training"]["metrics"]
    assert {"stage-1 panoramas/s, eager", "stage-2 views/s, eager", "stage-1 panoramas/s, eager, batch 8"} \
        <= training.keys()
    for kind in ("tours_bundled", "tours_sd"):
        metrics = payload["sections"][kind]["metrics"]
        assert {"4-view tour s, eager", "8-view tour s, eager", "4-view peak MB, eager",
                "8-view peak MB, eager"} <= metrics.keys()
    serve = payload["sections"]["serve"]["metrics"]
    assert {"views/s c=1, HTTP batching", "views/s c=2, HTTP batch of 1"} <= serve.keys()


def test_the_folder_holds_every_log_result_and_the_readable_summary(dry_run):
    out, _ = dry_run
    summary = (out / "summary.md").read_text()
    for name in SECTIONS:
        log = out / "logs" / f"{name}.log"
        assert log.exists() and log.stat().st_size > 0, name
        assert f"## {name}" in summary
        if name != "cuda_tests":
            assert json.loads((out / "results" / f"{name}.json").read_text()), name
    assert not (out / "scratch").exists()  # datasets, runs and the tiny model are removed


def test_compiled_tours_are_measured_and_really_compiled(tmp_path):
    """The compiled cases, rehearsed on one section (compiling takes minutes on the CPU)."""
    done = dry_run_of(tmp_path, "--compile-mode", "default", "--only", "tours_sd")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    section = json.loads((tmp_path / "summary.json").read_text())["sections"]["tours_sd"]
    assert section["status"] == "ok" and section["metrics"]["4-view tour s, compiled (default)"] > 0
    cases = json.loads((tmp_path / "results" / "tours_sd.json").read_text())["cases"]
    assert [c["compiled"] for c in cases] == [c["mode"] != "off" for c in cases], cases  # no fallback to eager
