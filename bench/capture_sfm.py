"""Structure from motion of 360-degree captures at 512x1024: seconds per keyframe of COLMAP rig SfM (by stage, one
and two threads), and the whole capture job on Ray (frames, SfM, captions with tiny local models, PNGs) with one
capture against several, to show how it scales across captures. Procedural walks stand in for captures.
Run: python bench/capture_sfm.py [--keyframes 16] [--captures 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
from common import format_table, write_json  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_captioners import write_tiny_blip2, write_tiny_llm  # noqa: E402

from diffpano.data.captures.build import CaptureSpec  # noqa: E402
from diffpano.data.captures.sfm import reconstruct  # noqa: E402
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer  # noqa: E402
from diffpano.data.procedural.scenes import generate_scene  # noqa: E402
from diffpano.data.procedural.walks import clip_poses  # noqa: E402


def walk(seed: int, keyframes: int) -> list[np.ndarray]:
    """Panoramas 512x1024 of a walk 0.5 m a step through procedural scene `seed`."""
    scene = generate_scene(seed)
    renderer = SceneMeshRenderer(scene)
    return [renderer.render(p, 512, 1024).rgb for p in clip_poses(scene, keyframes, 0.5, np.random.default_rng(seed))]


def sfm_rows(panoramas: list[np.ndarray], root: Path) -> list[list]:
    """Seconds per keyframe of reconstruct() by stage, with one and with two COLMAP threads."""
    rows = []
    for threads in (1, 2):
        timings: dict[str, float] = {}
        models = reconstruct(panoramas, Path(tempfile.mkdtemp(dir=root)), threads, 0, timings)
        total = sum(timings.values())
        n = len(panoramas)
        rows.append([threads, f"{sum(len(m.frames) for m in models)}/{n}"]
                    + [f"{timings[s] / n:.2f}" for s in ("views", "features", "matching", "mapping")]
                    + [f"{total / n:.2f}"])
    return rows


def job_rows(captures: list[Path], root: Path, blip2: str, llm: str) -> tuple[list[list], list[float]]:
    """The whole capture job on local Ray (2 CPUs), over the first capture alone and over all of them."""
    import ray

    from batch.dataset import build_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    spec = CaptureSpec(spacing=0.4, camera_height=1.5, captioner=blip2, summariser=llm)
    rows, rates = [], []
    for subset in (captures[:1], captures):
        started = time.perf_counter()
        summary = build_dataset(spec, str(Path(tempfile.mkdtemp(dir=root)) / "ds"), [str(c) for c in subset],
                                progress=False)
        seconds = time.perf_counter() - started
        rates.append(summary.frames_written / seconds)
        rows.append([len(subset), summary.frames_written, f"{seconds:.1f}", f"{60 * len(subset) / seconds:.2f}",
                     f"{rates[-1]:.2f}", len(summary.failures)])
    ray.shutdown()
    return rows, rates


def main() -> None:
    """Measure and print both tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keyframes", type=int, default=16)
    parser.add_argument("--captures", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        walks = [walk(seed, args.keyframes) for seed in range(args.captures)]
        sfm = sfm_rows(walks[0], root)
        print(f"COLMAP rig SfM of one {args.keyframes}-keyframe capture at 512x1024, seconds per keyframe")
        print(format_table(["threads", "registered", "views", "features", "matching", "mapping", "total"], sfm))
        captures = []
        for i, panoramas in enumerate(walks):
            folder = root / "captures" / f"walk{i}"
            folder.mkdir(parents=True)
            for k, rgb in enumerate(panoramas):
                Image.fromarray(rgb).save(folder / f"{k:04d}.png")
            captures.append(folder)
        blip2, llm = write_tiny_blip2(root / "blip2"), write_tiny_llm(root / "llm")
        jobs, rates = job_rows(captures, root, blip2, llm)
        print(f"\nThe capture job on Ray (2 CPUs, a task of one CPU per capture, {args.keyframes} frames each)")
        print(format_table(["captures", "keyframes", "seconds", "captures/min", "keyframes/s", "failed"], jobs))
        print(f"\nscaling: {rates[1] / rates[0]:.2f}x the keyframes/s of one capture with {args.captures} captures "
              f"on 2 CPUs")
        write_json(args.json, {"sfm": sfm, "jobs": jobs, "scaling": rates[1] / rates[0]})


if __name__ == "__main__":
    main()
