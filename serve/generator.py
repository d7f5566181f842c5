"""The model deployment: one DiffPano pipeline per replica, requests batched by views with @serve.batch."""

from __future__ import annotations

import asyncio
import collections
import time
from itertools import groupby

import numpy as np
from ray import serve

from diffpano.manifest import Tour, commit_tours, image_path, png_bytes
from diffpano.modelio import resolve_model
from serve.schemas import GenerationJob, GenerationResult

HEALTH_PROBE_AFTER_S = 300.0  # without a batch for this long, check_health runs a one-step probe


def _views(jobs: list[GenerationJob]) -> int:
    """Batch size in views: a tour of N views counts N."""
    return sum(job.views() for job in jobs)


@serve.deployment(
    name="PanoGenerator", max_ongoing_requests=8, max_queued_requests=16, health_check_period_s=10,
    health_check_timeout_s=60, autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class PanoGenerator:
    """Loads the model once; generates batches of tours whose settings agree, in a worker thread."""

    def __init__(self, model: str | None = None, device: str | None = None, max_batch_views: int = 8,
                 batch_wait_timeout_s: float = 0.1) -> None:
        self.pipe = resolve_model(model, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.generate_batch.set_max_batch_size(max_batch_views)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_views: collections.deque[int] = collections.deque(maxlen=256)
        self.batches = 0
        self.last_batch = time.monotonic()

    def info(self) -> dict:
        """The model's name, default size and the multiple that heights and widths must be of."""
        return {"model": self.pipe.model_name, "default_size": list(self.pipe.default_size),
                "size_multiple": self.pipe.size_multiple}

    def stats(self) -> dict:
        """Recent batch sizes in views (newest last) and how many batches this replica has run."""
        return {"batch_views": list(self.batch_views), "batches": self.batches}

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """One tour (batched with others arriving at the same time)."""
        return await self.generate_batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1, batch_size_fn=_views)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list[GenerationResult | Exception]:
        """Tours of a batch, grouped by settings that one pipeline call must share; errors stay per tour."""
        self.batch_views.append(_views(jobs))
        self.batches += 1
        results: dict[int, GenerationResult | Exception] = {}
        order = sorted(range(len(jobs)), key=lambda i: _group_key(jobs[i]))
        for _, members in groupby(order, key=lambda i: _group_key(jobs[i])):
            idx = list(members)
            try:
                out = await asyncio.to_thread(self._run, [jobs[i] for i in idx])
            except ValueError as err:  # a setting the model refuses (a size it cannot make)
                out = [err] * len(idx)
            results.update(zip(idx, out, strict=True))
        self.last_batch = time.monotonic()
        return [results[i] for i in range(len(jobs))]

    def _run(self, jobs: list[GenerationJob]) -> list[GenerationResult]:
        """One pipeline call for tours with the same view count, size, steps and guidance."""
        first = jobs[0]
        poses = np.stack([np.asarray(j.poses, dtype=np.float64).reshape(-1, 4, 4) for j in jobs])
        out = self.pipe([j.prompts for j in jobs], poses, height=first.height, width=first.width,
                        num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                        seed=[j.seed for j in jobs])
        results = []
        for b, job in enumerate(jobs):
            images = out.images[b]
            h, w = images.shape[1:3]
            result = GenerationResult(tour_id=job.tour_id, model=self.pipe.model_name, seed=out.seeds[b], height=h,
                                      width=w, pngs=[png_bytes(im) for im in images])
            if job.store_root:
                tour = Tour(job.tour_id, images, list(out.prompts[b]), out.poses[b], out.seeds[b],
                            self.pipe.model_name, job.num_inference_steps, job.guidance_scale)
                result.manifest_uri = commit_tours(job.store_root, [tour])
                result.image_uris = [f"{job.store_root}/{image_path(job.tour_id, i)}" for i in range(len(images))]
            results.append(result)
        return results

    def check_health(self) -> None:
        """Raise unless the model answers: a recent batch finished, or a one-step probe runs."""
        if time.monotonic() - self.last_batch < HEALTH_PROBE_AFTER_S:
            return
        h, w = self.pipe.default_size
        self.pipe(["probe"], np.eye(4)[None], height=h, width=w, num_inference_steps=1, guidance_scale=0.0, seed=0)
        self.last_batch = time.monotonic()


def _group_key(job: GenerationJob) -> tuple:
    """Settings that tours of one pipeline call share."""
    return job.views(), job.height, job.width, job.num_inference_steps, job.guidance_scale
