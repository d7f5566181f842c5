"""Procedural renderer speed on one core: equirectangular keyframes per second, goal >= 5/s at 256x512.

The dataset path (the scene's mesh, ray cast by Embree: SceneMeshRenderer) side by side with the box ray caster it
replaced (SceneRenderer, the tests' oracle); also times a whole dataset keyframe (panorama + depth, cube faces and
captions, PNG encoding) for planning builds.
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
from diffpano.data.procedural.render import SceneRenderer  # noqa: E402
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer  # noqa: E402
from diffpano.data.procedural.scenes import generate_scene  # noqa: E402
from diffpano.data.procedural.walks import clip_poses  # noqa: E402
from diffpano.io.depth import depth_png_bytes  # noqa: E402
from diffpano.io.manifest import png_bytes  # noqa: E402

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
    scenes = [generate_scene(1000 + s) for s in range(args.scenes)]
    walks = [clip_poses(scene, args.frames, 0.5, np.random.default_rng(s)) for s, scene in enumerate(scenes)]
    rates = {}
    for name, make in (("mesh (dataset path)", lambda sc: SceneMeshRenderer(sc, threads=1)),
                       ("box ray caster (oracle)", SceneRenderer)):
        jobs = [(make(scene), poses) for scene, poses in zip(scenes, walks, strict=True)]
        jobs[0][0].render(jobs[0][1][0], h, w)  # warm the direction-grid cache
        start = time.perf_counter()
        for renderer, poses in jobs:
            for pose in poses:
                renderer.render(pose, h, w)
        rates[name] = (args.scenes * args.frames) / (time.perf_counter() - start)
    jobs = [(SceneMeshRenderer(scene, threads=1), poses) for scene, poses in zip(scenes, walks, strict=True)]
    start = time.perf_counter()
    for k, (renderer, poses) in enumerate(jobs):
        summariser = TemplateSummariser(k)
        for pose in poses:
            view = renderer.render(pose, h, w)
            caption_frame(renderer, pose, SceneGraphCaptioner(), summariser)
            png_bytes(view.rgb), depth_png_bytes(view.depth)
    full_s = (time.perf_counter() - start) / (args.scenes * args.frames)
    rows = [[f"render {name} (rgb+depth+labels)", f"{rate:.1f}", f"{1e3 / rate:.0f}"] for name, rate in rates.items()]
    rows.append(["full keyframe, mesh (+captions, PNGs)", f"{1 / full_s:.1f}", f"{full_s * 1e3:.0f}"])
    render_per_s = rates["mesh (dataset path)"]
    print(f"{args.scenes} scenes x {args.frames} keyframes at {h}x{w}, one thread, loadavg {os.getloadavg()[0]:.2f}")
    print(format_table(["stage", "panoramas/s", "ms each"], rows))
    print(f"mesh / box caster: {render_per_s / rates['box ray caster (oracle)']:.2f}x")
    print(goal_line(f">= {GOAL_PER_S} panoramas/s at {h}x{w} on one core (measured {render_per_s:.1f})",
                    render_per_s >= GOAL_PER_S))
    write_json(args.json, {"size": [h, w], "render_per_s": render_per_s, "box_caster_per_s": rates[
        "box ray caster (oracle)"], "keyframe_per_s": 1 / full_s})


if __name__ == "__main__":
    main()
