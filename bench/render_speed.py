"""Procedural renderer speed on one core: equirectangular keyframes per second, goal >= 5/s at 256x512.

Also times a whole dataset keyframe (panorama + depth, cube faces and captions, PNG encoding) for planning builds.
Run: python bench/render_speed.py [--size 256x512] [--scenes 8] [--frames 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the goal states

import numpy as np  # noqa: E402
from common import format_table, goal_line, write_json  # noqa: E402

from diffpano.data.captions import SceneGraphCaptioner, TemplateSummariser, caption_frame  # noqa: E402
from diffpano.data.manifest import depth_png_bytes  # noqa: E402
from diffpano.data.render import SceneRenderer  # noqa: E402
from diffpano.data.scenes import generate_scene  # noqa: E402
from diffpano.data.walks import clip_poses  # noqa: E402
from diffpano.manifest import png_bytes  # noqa: E402

GOAL_PER_S = 5.0


def main() -> None:
    """Time rendering and full keyframes over several scenes and walks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x512")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    jobs = []
    for s in range(args.scenes):
        scene = generate_scene(1000 + s)
        jobs.append((SceneRenderer(scene), clip_poses(scene, args.frames, 0.5, np.random.default_rng(s))))
    jobs[0][0].render(jobs[0][1][0], h, w)  # warm the direction-grid cache
    start = time.perf_counter()
    for renderer, poses in jobs:
        for pose in poses:
            renderer.render(pose, h, w)
    render_s = (time.perf_counter() - start) / (args.scenes * args.frames)
    start = time.perf_counter()
    for k, (renderer, poses) in enumerate(jobs):
        summariser = TemplateSummariser(k)
        for pose in poses:
            view = renderer.render(pose, h, w)
            caption_frame(renderer, pose, SceneGraphCaptioner(), summariser)
            png_bytes(view.rgb), depth_png_bytes(view.depth)
    full_s = (time.perf_counter() - start) / (args.scenes * args.frames)
    rows = [["render (rgb+depth+labels)", f"{1 / render_s:.1f}", f"{render_s * 1e3:.0f}"],
            ["full keyframe (+captions, PNGs)", f"{1 / full_s:.1f}", f"{full_s * 1e3:.0f}"]]
    print(f"{args.scenes} scenes x {args.frames} keyframes at {h}x{w}, one thread, loadavg {os.getloadavg()[0]:.2f}")
    print(format_table(["stage", "panoramas/s", "ms each"], rows))
    print(goal_line(f">= {GOAL_PER_S} panoramas/s at {h}x{w} on one core (measured {1 / render_s:.1f})",
                    1 / render_s >= GOAL_PER_S))
    write_json(args.json, {"size": [h, w], "render_per_s": 1 / render_s, "keyframe_per_s": 1 / full_s})


if __name__ == "__main__":
    main()
