"""The model deployment: one DiffPano pipeline per replica, requests batched by views with @serve.batch."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
from ray import serve

from diffpano.data.proxy import spec_proxy
from diffpano.defaults import BATCH_WAIT_S, MAX_BATCH_VIEWS, MAX_LORAS, STORAGE_WAIT_S
from diffpano.io import storage
from diffpano.io.manifest import Tour, commit_tours, image_path, png_bytes
from diffpano.models.lora import LoraSet
from diffpano.pipelines.compiling import check_mode, compile_pipeline
from diffpano.pipelines.loading import resolve_model
from diffpano.pipelines.tours import make_tours
from serve.schemas import GenerationJob, GenerationResult, Progress

HEALTH_PROBE_AFTER_S = 300.0  # without a batch for this long, check_health runs a one-step probe
STUCK_AFTER_S = 3600.0  # a pipeline call running longer than this fails the health check (the replica is replaced)
PREVIEWS = 3  # previews a streamed tour sends, at a quarter, half and three quarters of its steps


class HeldLora:
    """A LoRA the multiplexer counts as loaded on this replica; evicting it drops its adapter."""

    def __init__(self, generator: PanoGenerator, name: str) -> None:
        self.generator, self.name, self.held = generator, name, True

    def __del__(self) -> None:
        """Drop the adapter once (the multiplexer calls this on eviction, and the collector may again later)."""
        if self.held:
            self.held = False
            self.generator._locked(self.generator.loras.drop, self.name)


class Cancelled(Exception):
    """The client of a streamed tour went away: its remaining steps are not run."""


def outcome(result: GenerationResult | Exception) -> GenerationResult:
    """A tour's result, or its error raised for its request (make_tours and @serve.batch hand errors back as
    values)."""
    if isinstance(result, Exception):
        raise result
    return result


def preview_steps(total: int) -> set[int]:
    """The steps (1-based) after which a streamed tour sends a preview: evenly spaced, at most PREVIEWS."""
    return {round(total * k / (PREVIEWS + 1)) for k in range(1, PREVIEWS + 1)} - {0, total}


def _views(jobs: list[GenerationJob]) -> int:
    """Batch size in views: a tour of N views counts N."""
    return sum(job.view_count() for job in jobs)


@serve.deployment(name="PanoGenerator", max_ongoing_requests=8, max_queued_requests=16, health_check_period_s=10,
                  health_check_timeout_s=60)
class PanoGenerator:
    """Loads the model once; generates batches of tours whose settings agree, in a worker thread."""

    def __init__(self, model: str | None = None, device: str | None = None, max_batch_views: int = MAX_BATCH_VIEWS,
                 batch_wait_timeout_s: float = BATCH_WAIT_S, compile: str = "off",
                 scheduler: str | None = None, storage_wait_s: float = STORAGE_WAIT_S, lora_root: str | None = None,
                 max_loras: int = MAX_LORAS) -> None:
        storage.set_storage_wait(storage_wait_s)  # stored tours' writes wait out outages this long
        self.pipe = compile_pipeline(resolve_model(model, device, scheduler=scheduler), check_mode(compile))
        self.pipe.set_progress_bar_config(disable=True)
        self.loras = LoraSet(self.pipe, lora_root, max_loras)
        # Ray Serve's model multiplexing: requests for a LoRA go to replicas that hold it (set up here, where the
        # LRU's size is known; Ray detects it on the instance)
        async def hold_lora(name: str) -> HeldLora:  # a plain function: the multiplexer keeps its state on it
            return await self._hold_lora(name)

        self.hold_lora = serve.multiplexed(max_num_models_per_replica=max_loras)(hold_lora)
        self.max_batch_views = max_batch_views
        self.generate_batch.set_max_batch_size(max_batch_views)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_views: collections.deque[int] = collections.deque(maxlen=256)
        self.batches = 0
        self.cancelled = 0
        self.last_batch = time.monotonic()
        self.lock = threading.Lock()  # one pipeline call at a time: its modules keep per-call state (EA context)
        self.busy_since: float | None = None  # when the running pipeline call started

    def info(self) -> dict:
        """The model's name, default size and the multiple that heights and widths must be of."""
        return {"model": self.pipe.model_name, "default_size": list(self.pipe.default_size),
                "size_multiple": self.pipe.size_multiple}

    def stats(self) -> dict:
        """Recent batch sizes in views (newest last), how many batches this replica has run, how many streamed tours
        it stopped because their client went away, and the LoRAs it holds (least recently used first)."""
        return {"batch_views": list(self.batch_views), "batches": self.batches, "cancelled": self.cancelled,
                "loras": self.loras.names()}

    async def _hold_lora(self, name: str) -> HeldLora:
        """Load a LoRA for the multiplexer (which drops the least recently used beyond max_loras)."""
        await asyncio.to_thread(self._locked, self.loras.load, name)
        return HeldLora(self, name)

    def _locked(self, fn: Callable, *args) -> object:
        """fn(*args) under the pipeline lock."""
        with self.lock:
            return fn(*args)

    async def _lora_of_request(self) -> None:
        """Load the LoRA the request was routed for (its multiplexed model id), if any."""
        if name := serve.get_multiplexed_model_id():
            await self.hold_lora(name)

    def _tours(self, jobs: list[GenerationJob], **options) -> dict:
        """make_tours under the pipeline lock (called in a worker thread)."""
        with self.lock:
            self.busy_since = time.monotonic()
            try:
                return make_tours(self.pipe, jobs, loras=self.loras, geometry=spec_proxy, **options)
            finally:
                self.busy_since = None
                self.last_batch = time.monotonic()

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """One tour, batched with others arriving at the same time; a tour larger than a batch runs alone."""
        await self._lora_of_request()
        if job.view_count() > self.max_batch_views:  # @serve.batch refuses an item larger than the batch
            return outcome(await self._run_alone(job))
        return outcome(await self.generate_batch(job))

    async def _run_alone(self, job: GenerationJob) -> GenerationResult | Exception:
        """One tour outside the batcher (the pipeline denoises it in windows of views); its error as a value."""
        tour = (await asyncio.to_thread(self._tours, [job]))[job.tour_id]
        return await asyncio.to_thread(self._result, job, tour)

    @serve.batch(max_batch_size=MAX_BATCH_VIEWS, batch_wait_timeout_s=BATCH_WAIT_S, batch_size_fn=_views)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list[GenerationResult | Exception]:
        """Tours of a batch (diffpano.pipelines.tours groups them by shared settings); errors stay per tour."""
        self.batch_views.append(_views(jobs))
        self.batches += 1
        tours = await asyncio.to_thread(self._tours, jobs)
        return [await asyncio.to_thread(self._result, job, tours[job.tour_id]) for job in jobs]

    async def generate_stream(self, job: GenerationJob) -> AsyncIterator[Progress | GenerationResult]:
        """One tour, alone (a batch's steps are shared), as a Progress after every UNet call and the result last.
        When the caller stops reading (the HTTP client went away), the tour stops at its next step."""
        await self._lora_of_request()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress] = asyncio.Queue()
        stop = threading.Event()
        on_step = self._step_reporter(job.tour_id, stop, lambda p: loop.call_soon_threadsafe(events.put_nowait, p))
        work = asyncio.ensure_future(asyncio.to_thread(
            self._tours, [job], callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["pred_original_sample"]))
        getter = None
        try:
            while not (work.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            yield outcome(await asyncio.to_thread(self._result, job, work.result()[job.tour_id]))
        finally:
            stop.set()  # a caller that went away: the worker thread raises Cancelled at its next step
            if getter is not None:
                getter.cancel()

    def _step_reporter(self, tour_id: str, stop: threading.Event, send: Callable[[Progress], object]) -> Callable:
        """The pipeline's step-end callback for a streamed tour: sends Progress (with a preview PNG at
        preview_steps), and raises Cancelled once `stop` is set."""

        def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
            if stop.is_set():
                self.cancelled += 1
                raise Cancelled(f"tour {tour_id}: the client went away after {step} of {pipe.num_timesteps} steps")
            total = pipe.num_timesteps
            preview = None
            if step + 1 in preview_steps(total):
                preview = png_bytes(pipe.preview(tensors["pred_original_sample"][0, 0]))
            send(Progress(tour_id=tour_id, step=step + 1, steps=total, preview_png=preview))
            return {}

        return on_step

    def _result(self, job: GenerationJob, tour: Tour | Exception) -> GenerationResult | Exception:
        """The answer for one job: its PNGs, stored under job.store_root when asked."""
        if isinstance(tour, Exception):
            return tour
        h, w = tour.images.shape[1:3]
        result = GenerationResult(tour_id=job.tour_id, model=tour.model, seed=tour.seed, scheduler=tour.scheduler,
                                  height=h, width=w, pngs=[png_bytes(im) for im in tour.images],
                                  poses=[[float(x) for x in p.reshape(16)] for p in tour.poses])
        if job.store_root:
            result.manifest_uri = commit_tours(job.store_root, [tour])
            result.image_uris = [f"{job.store_root}/{image_path(job.tour_id, i)}" for i in range(len(tour.images))]
        return result

    def check_health(self) -> None:
        """Raise unless the model answers: a pipeline call is running or finished recently, or a one-step probe
        runs."""
        busy = self.busy_since
        if busy is not None and time.monotonic() - busy > STUCK_AFTER_S:
            raise RuntimeError(f"a pipeline call has run for {time.monotonic() - busy:.0f} s: the replica is stuck")
        if time.monotonic() - self.last_batch < HEALTH_PROBE_AFTER_S or not self.lock.acquire(blocking=False):
            return
        try:
            h, w = self.pipe.default_size
            self.pipe(["probe"], np.eye(4)[None], height=h, width=w, num_inference_steps=1, guidance_scale=0.0,
                      seed=0)
            self.last_batch = time.monotonic()
        finally:
            self.lock.release()
