"""What a user sees of a bulk job: a bar that moves as batches are committed, a summary, and no ERROR lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from diffpano.io.manifest import read_manifest

pytestmark = pytest.mark.ray  # bulk jobs, dataset builds and training run on Ray here


def test_progress_advances_as_each_batch_is_committed_and_the_run_logs_no_error(tiny_model_dir, tmp_path):
    out = tmp_path / "progress"
    cmd = [sys.executable, "-m", "diffpano.cli", "bulk", "--synthetic", "3", "--views", "2", "--steps", "10",
           "--batch-size", "1", "--model", str(tiny_model_dir), "--out", str(out)]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    text, shown = b"", []  # shown: (count on the bar, tours in the manifest at that moment)
    deadline = time.monotonic() + 300
    while (chunk := proc.stdout.read(4096)) and time.monotonic() < deadline:
        text += chunk
        for count in re.findall(rb"(\d)/3 \[", chunk):
            shown.append((int(count), read_manifest(str(out)).column("tour_id").unique().to_pylist()))
    proc.wait(timeout=60)
    output = text.decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    counts = [c for c, _ in shown]
    assert counts[0] == 0 and 1 in counts and 2 in counts and counts[-1] == 3, counts
    assert counts == sorted(counts), counts
    for count, committed in shown:  # the bar never runs ahead of the manifest ...
        assert count <= len(committed) <= count + 1, (count, committed)
    # ... nor lags it by a batch: read just after the bar printed, the manifest holds what the bar says (the next
    # batch may commit in between now and then, but a bar one batch behind would read count + 1 every time)
    assert sum(len(committed) == count for count, committed in shown) > len(shown) / 2, shown
    assert any(0 < count < 3 and len(committed) < 3 for count, committed in shown), shown  # moved before the end
    assert "tours/h" in output and "3 tours / 6 views written" in output, output[-2000:]
    error_lines = [line for line in output.splitlines() if re.search(r"\bERROR\b| E \d+ \d+\]", line)]
    assert error_lines == [], error_lines
