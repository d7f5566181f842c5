"""The model deployment: one DiffPano pipeline per replica, requests batched by views with @serve.batch."""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np
from ray import serve

from diffpano.defaults import BATCH_WAIT_S, MAX_BATCH_VIEWS, STORAGE_WAIT_S
from diffpano.io import storage
from diffpano.io.manifest import Tour, commit_tours, image_path, png_bytes
from diffpano.pipelines.compiling import check_mode, compile_pipeline
from diffpano.pipelines.loading import resolve_model
from diffpano.pipelines.tours import make_tours
from serve.schemas import GenerationJob, GenerationResult

HEALTH_PROBE_AFTER_S = 300.0  # without a batch for this long, check_health runs a one-step probe


def _views(jobs: list[GenerationJob]) -> int:
    """Batch size in views: a tour of N views counts N."""
    return sum(job.view_count() for job in jobs)


@serve.deployment(name="PanoGenerator", max_ongoing_requests=8, max_queued_requests=16, health_check_period_s=10,
                  health_check_timeout_s=60)
class PanoGenerator:
    """Loads the model once; generates batches of tours whose settings agree, in a worker thread."""

    def __init__(self, model: str | None = None, device: str | None = None, max_batch_views: int = MAX_BATCH_VIEWS,
                 batch_wait_timeout_s: float = BATCH_WAIT_S, compile: str = "off",
                 scheduler: str | None = None, storage_wait_s: float = STORAGE_WAIT_S) -> None:
        storage.set_storage_wait(storage_wait_s)  # stored tours' writes wait out outages this long
        self.pipe = compile_pipeline(resolve_model(model, device, scheduler=scheduler), check_mode(compile))
        self.pipe.set_progress_bar_config(disable=True)
        self.max_batch_views = max_batch_views
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
        """One tour, batched with others arriving at the same time; a tour larger than a batch runs alone."""
        if job.view_count() > self.max_batch_views:  # @serve.batch refuses an item larger than the batch
            return await self._run_alone(job)
        return await self.generate_batch(job)

    async def _run_alone(self, job: GenerationJob) -> GenerationResult:
        """One tour outside the batcher (the pipeline denoises it in windows of views)."""
        tour = (await asyncio.to_thread(make_tours, self.pipe, [job]))[job.tour_id]
        result = await asyncio.to_thread(self._result, job, tour)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=MAX_BATCH_VIEWS, batch_wait_timeout_s=BATCH_WAIT_S, batch_size_fn=_views)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list[GenerationResult | Exception]:
        """Tours of a batch (diffpano.pipelines.tours groups them by shared settings); errors stay per tour."""
        self.batch_views.append(_views(jobs))
        self.batches += 1
        tours = await asyncio.to_thread(make_tours, self.pipe, jobs)
        self.last_batch = time.monotonic()
        return [await asyncio.to_thread(self._result, job, tours[job.tour_id]) for job in jobs]

    def _result(self, job: GenerationJob, tour: Tour | Exception) -> GenerationResult | Exception:
        """The answer for one job: its PNGs, stored under job.store_root when asked."""
        if isinstance(tour, Exception):
            return tour
        h, w = tour.images.shape[1:3]
        result = GenerationResult(tour_id=job.tour_id, model=tour.model, seed=tour.seed, scheduler=tour.scheduler,
                                  height=h, width=w, pngs=[png_bytes(im) for im in tour.images])
        if job.store_root:
            result.manifest_uri = commit_tours(job.store_root, [tour])
            result.image_uris = [f"{job.store_root}/{image_path(job.tour_id, i)}" for i in range(len(tour.images))]
        return result

    def check_health(self) -> None:
        """Raise unless the model answers: a recent batch finished, or a one-step probe runs."""
        if time.monotonic() - self.last_batch < HEALTH_PROBE_AFTER_S:
            return
        h, w = self.pipe.default_size
        self.pipe(["probe"], np.eye(4)[None], height=h, width=w, num_inference_steps=1, guidance_scale=0.0, seed=0)
        self.last_batch = time.monotonic()
