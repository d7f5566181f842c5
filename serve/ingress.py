"""The HTTP API (docs/http-api.md): a FastAPI app, built on each ingress replica, in front of the model deployment.

Routes live on a module-level router and reach the replica through a FastAPI dependency; the app itself is built by
the replica (`__serve_build_asgi_app__`), so nothing module-level is mutated at run time.
"""
# No `from __future__ import annotations`: FastAPI reads the route annotations at run time.

import asyncio
import base64
import contextlib
import hmac
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import Field, StringConstraints, field_validator, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from diffpano.defaults import BATCH_WAIT_S, MAX_BATCH_VIEWS, MAX_LORAS, STORAGE_WAIT_S, random_seed
from diffpano.io import storage
from diffpano.io.manifest import png_bytes, read_tours
from diffpano.models.lora import LORA_FILE
from diffpano.pipelines.compiling import CompileMode
from diffpano.pipelines.given import decode_panorama, given_bytes
from diffpano.pipelines.schedulers import SCHEDULER_NAMES
from diffpano.specs import ID_PATTERN, BulkSpec, Sampling, Strict
from serve.jobstore import JobStore
from serve.online import BACKOFF_S, JobRunner
from serve.quotas import Quotas
from serve.schemas import (
    GenerationJob,
    GenerationResult,
    JobRequest,
    JobStatus,
    PanoramaRequest,
    Progress,
    TourRequest,
    TourResponse,
    View,
    error_detail,
    inline_only,
    validation_detail,
)
from serve.webhooks import EVENTS, allowed_hosts, secret_key, url_problem

ResourceId = Annotated[str, FastAPIPath(pattern=ID_PATTERN)]  # tour and job ids: 422 otherwise
DOCS_ASSETS = "/docs-assets"  # Swagger UI and ReDoc's scripts, from the fastapi-offline package (no CDN)
OPEN_PATHS = ("/healthz", "/viewer", "/docs", "/openapi.json", "/redoc", "/favicon.ico", DOCS_ASSETS)
REPLICA_HEADER = "X-DiffPano-Replica"  # which ingress replica answered (docs/http-api.md)
MAX_TOUR_LOSSES = 3  # model replicas an online job's tour may lose before it counts as failed
KEY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
KeyName = Annotated[str, StringConstraints(pattern=f"^{KEY_NAME.pattern}$")]
ANONYMOUS = "anonymous"  # the callers of a server without API keys, as quotas count them


class ServerSettings(Strict):
    """The application's arguments (Serve config YAML `args`)."""

    model: str | None = None  # model directory or s3:// URI; None: the bundled model
    device: str | None = None
    output_root: str = "outputs/served"  # where output="store" writes (docs/tours.md); clients never choose the path
    api_key_env: str = "DIFFPANO_API_KEY"  # when this variable (or api_key_file) is set, /v1 needs the key
    api_key_file: str | None = None  # one key per line, "KEY" or "NAME KEY" (quotas are set per NAME)
    quota_images_per_minute: int | None = Field(None, ge=1)  # every key's quota unless `quotas` names it; None: none
    quotas: dict[KeyName, Annotated[int, Field(ge=1)]] = {}  # images per minute by key name
    max_body_bytes: int = Field(16 << 20, ge=1024)  # room for panoramas given inline (images)
    max_height: int = Field(512, ge=8)
    default_steps: int | None = Field(None, ge=1)  # None: the library's default (diffpano.defaults)
    default_guidance: float | None = Field(None, ge=0.0)
    retry_after_s: int = Field(5, ge=1)
    job_concurrency: int = Field(4, ge=1)  # tours of one online job in flight: interactive requests share the queue
    job_heartbeat_s: float = Field(1.0, gt=0)  # how often a job's owner records its progress (GET /v1/jobs lags this)
    job_lease_s: float = Field(15.0, gt=0)  # a job whose record stays unchanged this long is taken over by a replica
    storage_wait_s: float = Field(STORAGE_WAIT_S, ge=0)  # online jobs' reads and writes wait out outages this long
    default_scheduler: Literal[SCHEDULER_NAMES] | None = None  # None: the model's own
    max_batch_views: int = Field(MAX_BATCH_VIEWS, ge=1)
    batch_wait_timeout_s: float = Field(BATCH_WAIT_S, ge=0.0)
    compile: CompileMode = "off"  # torch.compile of the replicas' UNet (diffpano.pipelines.compiling)
    mesh_roots: list[str] = []  # folders or s3:// prefixes whose meshes requests may name (mesh_uri); none by default
    lora_root: str | None = None  # LoRAs a request may name: LORA_ROOT/NAME/pytorch_lora_weights.safetensors
    max_loras_per_replica: int = Field(MAX_LORAS, ge=1)  # LoRAs a model replica keeps loaded (LRU)
    webhook_secret: str | None = None  # signs job webhooks (whsec_ + base64); else DIFFPANO_WEBHOOK_SECRET
    webhook_allow: list[str] | str | None = None  # hosts job webhooks may call; else DIFFPANO_WEBHOOK_ALLOW

    @field_validator("webhook_secret")
    @classmethod
    def _secret_is_standard(cls, v: str | None) -> str | None:
        """A Standard Webhooks secret, refused at start when malformed."""
        if v is not None:
            secret_key(v)
        return v

    @model_validator(mode="after")
    def _lease_outlasts_beats(self) -> "ServerSettings":
        """A lease spans several heartbeats, so one slow write does not hand a live job to another replica."""
        if self.job_lease_s < 3 * self.job_heartbeat_s:
            raise ValueError("job_lease_s: must be at least 3 x job_heartbeat_s")
        return self

    @model_validator(mode="after")
    def _loras_run_eager(self) -> "ServerSettings":
        """LoRAs are switched per request; a compiled UNet would be recompiled at every switch."""
        if self.lora_root is not None and self.compile != "off":
            raise ValueError(f"lora_root: LoRAs are served with compile: off (switching adapters would recompile a "
                             f"compiled UNet); got compile: {self.compile}")
        return self

    def webhook_key(self) -> bytes | None:
        """The HMAC key that signs webhooks (ValueError naming webhook_secret when it is malformed), or None."""
        secret = self.webhook_secret or os.environ.get("DIFFPANO_WEBHOOK_SECRET")
        return secret_key(secret) if secret else None

    def webhook_hosts(self) -> list[str]:
        """The hosts (or host:port) job webhooks may call; none unless configured."""
        return allowed_hosts(self.webhook_allow if self.webhook_allow is not None
                             else os.environ.get("DIFFPANO_WEBHOOK_ALLOW"))

    def api_keys(self) -> dict[str, str]:
        """The accepted API keys by name: api_key_file's lines ("KEY" is named "default"), else the variable's one
        key ("default"); {} when none is configured (then /v1 is open and its callers share the name "anonymous")."""
        if self.api_key_file:
            keys = {}
            for n, line in enumerate(Path(self.api_key_file).read_text().splitlines(), 1):
                parts = line.split()
                if len(parts) > 2 or (len(parts) == 2 and not KEY_NAME.fullmatch(parts[0])):
                    raise ValueError(f"api_key_file: line {n}: expected KEY or NAME KEY, NAME of letters, digits, "
                                     "'-' and '_'")
                name = parts[0] if len(parts) == 2 else "default"
                if parts and name in keys:
                    raise ValueError(f"api_key_file: line {n}: the name {name!r} is given twice (a line with a key "
                                     "alone is named default)")
                if parts:
                    keys[name] = parts[-1]
            return keys
        key = os.environ.get(self.api_key_env)
        return {"default": key} if key else {}


def unprocessable(field: str, message: str) -> HTTPException:
    """422 naming the field."""
    return HTTPException(422, detail=error_detail(field, message))


def storage_unavailable(err: OSError) -> HTTPException:
    """503 when the output storage can't be reached: the request was fine, try again later."""
    return HTTPException(503, detail=f"output storage unavailable: {err}", headers={"Retry-After": "5"})


@contextmanager
def storage_errors() -> Iterator[None]:
    """Storage failures inside the block answer 503 (storage_unavailable) at once: a request waits out no outage."""
    try:
        with storage.wait_at_most(0.0):
            yield
    except OSError as err:
        raise storage_unavailable(err) from None


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def progress_data(p: Progress) -> dict:
    """The data of a progress event: step, steps, tour_id, and the preview when this step has one."""
    data = {"step": p.step, "steps": p.steps, "tour_id": p.tour_id}
    if p.preview_png is not None:
        data["preview_png_base64"] = base64.b64encode(p.preview_png).decode()
    return data


def replica_error(err: ValueError) -> HTTPException:
    """422 for a model replica's ValueError: its own message (not Ray's traceback around it), naming the field it
    names first (a LoRA, a mesh, a given panorama), else the size."""
    message = str(getattr(err, "cause", None) or err)
    named = message.split(":", 1)[0]
    return unprocessable(named if named in ("lora", "mesh_uri") or named.startswith("images.") else "height", message)


def error_event(err: Exception) -> str:
    """The error event of a stream that failed after it started: the 4xx/5xx status and body it would have had."""
    if isinstance(err, HTTPException):
        return sse("error", {"status": err.status_code, "detail": err.detail})
    if isinstance(err, ValueError):
        return sse("error", {"status": 422, "detail": replica_error(err).detail})
    return sse("error", {"status": 503, "detail": f"model replica unavailable ({type(err).__name__}); retry later"})


def known_job(status: JobStatus | None, job_id: str) -> JobStatus:
    """The status, or 404 for an unknown job id."""
    if status is None:
        raise HTTPException(404, detail=f"job_id: no job {job_id!r}")
    return status


def viewer_asset(name: str) -> str:
    """A file of the viewer shipped in the package."""
    return resources.files("serve").joinpath("viewer", name).read_text()


def read_stored_tour(root: str, tour_id: str) -> TourResponse | None:
    """The views of a tour stored under root with their images inline; None when its manifest has no such tour."""
    try:
        [tour] = read_tours(root, [tour_id])
    except ValueError:
        return None
    h, w = tour.images.shape[1:3]
    views = [View(view_index=i, prompt=tour.prompts[i], pose_c2w=[float(x) for x in tour.poses[i].reshape(16)],
                  height=h, width=w, image_uri=tour.image_uris[i],
                  image_png_base64=base64.b64encode(png_bytes(image)).decode())
             for i, image in enumerate(tour.images)]
    return TourResponse(tour_id=tour_id, model=tour.model, seed=tour.seed, scheduler=tour.scheduler, views=views,
                        manifest_uri=storage.join(root, "manifest"))


def find_stored_tour(root: str, jobs: JobStore, tour_id: str) -> TourResponse:
    """A tour stored under the output root itself or in the output of an online job naming it; 404 otherwise."""
    for out in (root, *jobs.outputs_holding(tour_id)):
        if (tour := read_stored_tour(out, tour_id)) is not None:
            return tour
    raise HTTPException(404, detail=f"tour_id: no stored tour {tour_id!r}")


def tour_response(result: GenerationResult, prompts: list[str], poses: np.ndarray) -> TourResponse:
    """docs/http-api.md tour body: inline PNGs, or stored URIs."""
    stored = result.image_uris is not None
    poses = np.asarray(result.poses) if result.poses is not None else poses  # a geometry's walk: the replica's
    views = [View(view_index=i, prompt=prompts[i], pose_c2w=[float(x) for x in poses[i].reshape(16)],
                  height=result.height, width=result.width,
                  image_png_base64=None if stored else base64.b64encode(png).decode(),
                  image_uri=result.image_uris[i] if stored else None)
             for i, png in enumerate(result.pngs)]
    return TourResponse(tour_id=result.tour_id, model=result.model, seed=result.seed, scheduler=result.scheduler,
                        views=views, manifest_uri=result.manifest_uri)


@serve.deployment(name="DiffPanoAPI", max_ongoing_requests=64)
@serve.ingress()
class DiffPanoAPI:
    """Validates requests, asks the model deployment, answers per docs/http-api.md."""

    def __init__(self, generator: DeploymentHandle, settings: dict) -> None:
        self.generator = generator
        self.settings = ServerSettings.model_validate(settings)
        self.api_keys = self.settings.api_keys()
        self.loras_seen: set[str] = set()
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()
        self.replica = serve.get_replica_context().replica_id.unique_id
        s = self.settings
        storage.set_storage_wait(s.storage_wait_s)
        self.quotas = Quotas(storage.absolute(s.output_root), s.quota_images_per_minute, s.quotas)
        self.webhook_key, self.webhook_hosts = s.webhook_key(), s.webhook_hosts()
        self.jobs = JobRunner(storage.absolute(s.output_root), self.job_tour, self.replica, s.job_concurrency,
                              s.job_heartbeat_s, s.job_lease_s, self.webhook_key)
        # Runs while the replica lives: resumes jobs a lost replica held (the constructor runs in the replica's loop).
        self._watcher = asyncio.get_running_loop().create_task(self.jobs.watch())

    def __serve_build_asgi_app__(self) -> FastAPI:
        """This replica's FastAPI app (Serve calls it after the constructor)."""
        return build_api(self)

    async def job_tour(self, spec: BulkSpec, out: str) -> None:
        """One tour of an online job, stored under out; waits (not fails) while the model deployment is full, and
        tries again when the model replica generating it is lost (up to MAX_TOUR_LOSSES times)."""
        losses = 0
        while True:
            try:
                job = await self.job(spec, spec.prompt_list(), spec.pose_array(), spec.tour_id, out)
                await self.model_for(job).generate.remote(job)
                return
            except BackPressureError:
                pass
            except HTTPException as err:  # the model's sizes could not be asked yet (full or being replaced)
                if err.status_code != 503:
                    raise
            except RayActorError:
                losses += 1
                if losses >= MAX_TOUR_LOSSES:
                    raise
            await asyncio.sleep(BACKOFF_S)

    async def info(self) -> dict:
        """The model's name and sizes (asked once: requests arriving together wait for the first one's answer)."""
        async with self._info_lock:
            if self._info is None:
                self._info = await self.ask(self.generator.info.remote())
        return self._info

    async def ask(self, response):
        """A model deployment's answer; overload and a lost replica become 503 with Retry-After (the client's input
        was fine), a ValueError is the caller's to map."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        try:
            return await response
        except BackPressureError:
            raise HTTPException(503, detail="overloaded: too many requests queued; retry", headers=retry) from None
        except ValueError:
            raise
        except Exception as err:  # a replica that died mid-request (cancellation is no Exception: it passes)
            raise HTTPException(503, detail=f"model replica unavailable ({type(err).__name__}); retry later",
                                headers=retry) from None

    async def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Validated (height, width): W = 2H, multiples of the model's factor, H <= max_height."""
        info = await self.info()
        h = height or (width // 2 if width else info["default_size"][0])
        w = width or 2 * h
        m = info["size_multiple"]
        if w != 2 * h:
            raise unprocessable("width", f"must be twice the height (equirectangular), got {h}x{w}")
        if h % m or h > self.settings.max_height:
            raise unprocessable("height", f"must be a multiple of {m} and at most {self.settings.max_height}, got {h}")
        return h, w

    async def job(self, req: Sampling, prompts: list[str], poses: np.ndarray, tour_id: str,
                  store_root: str | None) -> GenerationJob:
        """The model's job for a validated request: seed and size resolved, the server's defaults applied."""
        h, w = await self.size(req.height, req.width)
        s = self.settings
        walked = getattr(req, "has_geometry", lambda: False)() and req.poses is None and req.trajectory is None
        return GenerationJob(  # a tour on a geometry with no poses walks over its floor: the replica draws the walk
            tour_id=tour_id, prompts=prompts, poses=None if walked else [p.reshape(16).tolist() for p in poses],
            seed=req.seed if req.seed is not None else random_seed(), height=h, width=w,
            num_inference_steps=req.num_inference_steps or s.default_steps,
            guidance_scale=s.default_guidance if req.guidance_scale is None else req.guidance_scale,
            scheduler=req.scheduler or s.default_scheduler, store_root=store_root, images=getattr(req, "images", None),
            lora=req.lora, mesh_uri=getattr(req, "mesh_uri", None), layout=getattr(req, "layout", False),
            strength=getattr(req, "strength", None),
        )

    async def charge(self, request: Request, images: int) -> None:
        """Reserve a request's images on its key's quota: 429 with Retry-After when the minute's quota is spent,
        422 when the request alone is more than a minute's quota."""
        key_name = request.state.key_name
        limit = self.quotas.limit(key_name)
        if limit is None:
            return
        if images > limit:
            raise unprocessable("num_views", f"{images} images in one request exceed this key's quota of {limit} "
                                             "a minute")
        with storage_errors():
            state = await asyncio.to_thread(self.quotas.take, key_name, images)
        request.state.quota = state
        if not state.allowed:
            raise HTTPException(429, headers=state.headers(), detail=(
                f"quota: {images} images asked for, {state.remaining} of this key's {state.limit} a minute left; "
                f"retry after {state.headers()['Retry-After']} s"))

    async def refund(self, request: Request) -> None:
        """Give the request's images back to its quota: it was charged, then refused (4xx or 503)."""
        state = getattr(request.state, "quota", None)
        if state is not None and state.reservation is not None:
            with storage.wait_at_most(0.0), contextlib.suppress(OSError):  # the refusal stands whatever storage does
                await asyncio.to_thread(self.quotas.refund, state)
                request.state.quota = await asyncio.to_thread(self.quotas.peek, request.state.key_name)

    async def answer(self, request: Request, req: PanoramaRequest | TourRequest, prompts: list[str],
                     poses) -> GenerationResult | StreamingResponse:
        """A generating request once validated: its job (sizes checked), its quota charged, then the tour, streamed
        or whole; a request refused after its charge gets its images back."""
        job = await self.request_job(req, prompts, poses)
        await self.charge(request, len(prompts))
        try:
            if req.stream:
                return await self.stream(job, prompts, poses)
            return await self.generate(job)
        except HTTPException:
            await self.refund(request)
            raise

    async def check_lora(self, name: str | None, field: str = "lora") -> None:
        """422 naming the field unless the server has a LoRA of this name (found ones are remembered)."""
        if name is None or name in self.loras_seen:
            return
        root = self.settings.lora_root
        if root is None:
            raise unprocessable(field, "this server has no lora_root: it serves no LoRAs")
        with storage_errors():
            found = await asyncio.to_thread(storage.exists, storage.join(storage.absolute(root), name, LORA_FILE))
        if not found:
            raise unprocessable(field, f"no LoRA named {name!r} on this server")
        self.loras_seen.add(name)

    def model_for(self, job: GenerationJob) -> DeploymentHandle:
        """The model deployment's handle for a job: routed to replicas holding its LoRA (model multiplexing)."""
        return self.generator.options(multiplexed_model_id=job.lora) if job.lora else self.generator

    async def request_job(self, req: PanoramaRequest | TourRequest, prompts: list[str], poses) -> GenerationJob:
        """The model's job for an HTTP request: a fresh tour id, stored under the output root when asked."""
        root = storage.absolute(self.settings.output_root) if req.output == "store" else None
        return await self.job(req, prompts, poses, f"tour-{uuid.uuid4().hex[:16]}", root)

    async def stream(self, job: GenerationJob, prompts: list[str], poses) -> StreamingResponse:
        """A tour as server-sent events: progress at every step, then the tour (or an error). Overload is still a
        503 before the stream starts; a client that disconnects stops the tour at its next step."""
        events = self.model_for(job).options(stream=True).generate_stream.remote(job)
        try:
            first = await self.ask(events.__anext__())
        except ValueError as err:
            raise replica_error(err) from None

        async def body() -> AsyncIterator[str]:
            item = first
            try:
                while True:
                    if isinstance(item, GenerationResult):
                        yield sse("tour", tour_response(item, prompts, poses).model_dump())
                        return
                    yield sse("progress", progress_data(item))
                    item = await events.__anext__()
            except StopAsyncIteration:
                return
            except Exception as err:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                yield error_event(err)
            finally:
                events.cancel()  # the client went away (or the tour ended): nothing more is generated for it

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """One tour from the model deployment; overload answers 503 with Retry-After."""
        try:
            return await self.ask(self.model_for(job).generate.remote(job))
        except ValueError as err:
            raise replica_error(err) from None


def service(request: Request) -> DiffPanoAPI:
    """The ingress replica that built this app (a FastAPI dependency)."""
    return request.app.state.service


Service = Annotated[Any, Depends(service)]  # the DiffPanoAPI replica (the name is bound to its Deployment)
router = APIRouter()


STREAMED = {"content": {"text/event-stream": {}}, "description": "with stream: progress events, then the tour"}


@router.post("/v1/tours", response_model=TourResponse, response_model_exclude_none=False,
             responses={200: STREAMED})
async def tours(req: TourRequest, svc: Service, request: Request) -> TourResponse | StreamingResponse:
    """Generate a multi-view tour: N consistent panoramas along poses or a named trajectory."""
    prompts, poses = req.prompt_list(), req.pose_array()
    await check_given(req.images)
    await svc.check_lora(req.lora)
    check_mesh(req.mesh_uri, svc.settings.mesh_roots)
    answer = await svc.answer(request, req, prompts, poses)
    return answer if isinstance(answer, StreamingResponse) else tour_response(answer, prompts, poses)


def check_mesh(uri: str | None, roots: list[str], field: str = "mesh_uri") -> None:
    """422 naming the field unless the mesh lies under one of the roots the server allows (mesh_roots)."""
    if uri is None:
        return
    if not roots:
        raise unprocessable(field, "this server allows no meshes: set mesh_roots")
    path = uri if storage.is_remote(uri) else os.path.normpath(uri)
    if ".." in uri.split("/") or not any(path.startswith(root.rstrip("/") + "/") for root in roots):
        raise unprocessable(field, "not under one of the server's mesh_roots")


async def check_given(images: dict[int, str] | None) -> None:
    """422 naming images.INDEX unless every given panorama is inline and decodes as a 2:1 image."""
    if bad := inline_only(images):
        raise unprocessable(*bad)
    for index, value in sorted((images or {}).items()):
        field = f"images.{index}"
        try:
            await asyncio.to_thread(decode_panorama, given_bytes(value, field), field)
        except ValueError as err:
            raise unprocessable(field, str(err)) from None


@router.post("/v1/panoramas", response_model=None,
             responses={200: {"content": {"image/png": {}, **STREAMED["content"]},
                              "description": "the panorama (inline), or with stream: progress events, then the tour"}})
async def panoramas(req: PanoramaRequest, svc: Service, request: Request) -> Response:
    """Generate one panorama: image/png, or (output="store") the stored tour's JSON."""
    poses = np.eye(4)[None]
    await svc.check_lora(req.lora)
    result = await svc.answer(request, req, [req.prompt], poses)
    if isinstance(result, StreamingResponse):
        return result
    if req.output == "store":
        return JSONResponse(tour_response(result, [req.prompt], poses).model_dump())
    return Response(content=result.pngs[0], media_type="image/png")


@router.get("/v1/tours/{tour_id}", response_model=TourResponse)
async def stored_tour(tour_id: ResourceId, svc: Service) -> TourResponse:
    """A tour stored under the server's output root or by an online job, images inline (what the viewer loads)."""
    with storage_errors():
        return await asyncio.to_thread(find_stored_tour, svc.jobs.root, svc.jobs.store, tour_id)


@router.post("/v1/jobs", status_code=202, response_model=JobStatus)
async def submit_job(req: JobRequest, svc: Service) -> JobStatus:
    """Start a bulk job (docs/bulk-specs.md) whose tours are stored under output (a prefix of the server's root)."""
    webhook = job_webhook(req, svc.webhook_key, svc.webhook_hosts)
    try:
        specs = await asyncio.to_thread(svc.jobs.specs_of, req)
    except (ValueError, OSError) as err:
        raise unprocessable("specs", str(err)) from None
    for n, spec in enumerate(specs, 1):
        await svc.check_lora(spec.lora, f"specs line {n}: lora")
        check_mesh(spec.mesh_uri, svc.settings.mesh_roots, f"specs line {n}: mesh_uri")
    with storage_errors():
        return await svc.jobs.start_job(specs, req.output, webhook)


def job_webhook(req: JobRequest, key: bytes | None, hosts: list[str]) -> dict | None:
    """The job's webhook as job.json records it, or 422 naming webhook when the server will not call it."""
    if req.webhook is None:
        if req.webhook_events is not None:
            raise unprocessable("webhook_events", "given without a webhook")
        return None
    if problem := url_problem(req.webhook, hosts):
        raise unprocessable("webhook", problem)
    if key is None:
        raise unprocessable("webhook", "the server has no webhook_secret (or DIFFPANO_WEBHOOK_SECRET) to sign with")
    return {"url": req.webhook, "events": list(dict.fromkeys(req.webhook_events or EVENTS))}


@router.get("/v1/jobs/{job_id}", response_model=JobStatus)
async def job_status(job_id: ResourceId, svc: Service) -> JobStatus:
    """A job's state and counts, from its record: any replica answers for any job."""
    with storage_errors():
        return known_job(await svc.jobs.status(job_id), job_id)


@router.delete("/v1/jobs/{job_id}", response_model=JobStatus)
async def cancel_job(job_id: ResourceId, svc: Service) -> JobStatus:
    """Cancel a job: tours in flight finish, no new ones start; only complete tours stay visible."""
    with storage_errors():
        return known_job(await svc.jobs.cancel(job_id), job_id)


@router.get("/healthz")
async def healthz(svc: Service) -> JSONResponse:
    """200 when the model deployment answers."""
    try:
        info = await asyncio.wait_for(svc.generator.info.remote(), timeout=10)
    except Exception as err:  # noqa: BLE001 - any failure means not healthy
        return JSONResponse({"status": "unavailable", "detail": type(err).__name__}, status_code=503)
    return JSONResponse({"status": "ok", "model": info["model"], "default_size": info["default_size"]})


@router.get("/v1/stats")
async def stats(svc: Service) -> dict:
    """Recent batch sizes (in views) of the model replica that answers."""
    return await svc.ask(svc.generator.stats.remote())


@router.get("/viewer", response_class=HTMLResponse)
async def viewer() -> HTMLResponse:
    """The 360° tour viewer page (no external scripts)."""
    return HTMLResponse(viewer_asset("index.html"))


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    """No icon (answered, so browsers log no error)."""
    return Response(status_code=204)


@router.get("/viewer/viewer.js")
async def viewer_js() -> Response:
    """The viewer's script."""
    return Response(viewer_asset("viewer.js"), media_type="text/javascript")


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; the offending input is not echoed (NaN, Infinity or 1e400 have no JSON form)."""
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


def guard(settings: ServerSettings, api_keys: dict[str, str]):
    """Middleware enforcing the body size limit (413) and the API key (401) before any route runs; it names the
    caller's key for quotas (request.state.key_name)."""

    async def middleware(request: Request, call_next):
        length = request.headers.get("content-length")
        too_large = JSONResponse({"detail": f"body: larger than {settings.max_body_bytes} bytes"}, status_code=413)
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return too_large
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            if len(await request.body()) > settings.max_body_bytes:
                return too_large
        request.state.key_name = ANONYMOUS
        if api_keys and not request.url.path.startswith(OPEN_PATHS):
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix(
                "Bearer ")
            # every key compared, so the time taken does not tell which one nearly matched
            matched = [name for name, key in api_keys.items() if hmac.compare_digest(given.encode(), key.encode())]
            if not matched:
                return JSONResponse({"detail": "api key: missing or wrong (header X-API-Key)"}, status_code=401,
                                    headers={"WWW-Authenticate": "ApiKey"})
            request.state.key_name = matched[0]
        return await call_next(request)

    return middleware


def quota_headers(quotas: Quotas):
    """Middleware adding the caller's x-ratelimit-*-images headers to every /v1 answer when its key has a quota
    (the generating routes leave what they reserved in request.state.quota; others read the quota as it is)."""

    async def middleware(request: Request, call_next):
        response = await call_next(request)
        key_name = getattr(request.state, "key_name", None)
        if key_name is None or not request.url.path.startswith("/v1/") or quotas.limit(key_name) is None:
            return response
        state = getattr(request.state, "quota", None)
        if state is None:
            try:
                with storage.wait_at_most(0.0):
                    state = await asyncio.to_thread(quotas.peek, key_name)
            except OSError:
                return response  # the answer stands; only its quota headers are left out
        response.headers.update(state.headers())
        return response

    return middleware


def served_by(replica: str):
    """Middleware naming the answering replica in every response (REPLICA_HEADER)."""

    async def middleware(request: Request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    return middleware


def build_api(svc: DiffPanoAPI) -> FastAPI:
    """The FastAPI app of one ingress replica: the routes, the 422 handler and the guard middleware."""
    api = FastAPIOffline(title="DiffPano", version="0.1.0", static_url=DOCS_ASSETS,
                         description="Text and camera poses in, consistent multi-view 360° panoramas out "
                                     "(docs/http-api.md).")
    api.state.service = svc
    api.include_router(router)
    api.add_exception_handler(RequestValidationError, invalid_request)
    api.middleware("http")(quota_headers(svc.quotas))
    api.middleware("http")(guard(svc.settings, svc.api_keys))
    api.middleware("http")(served_by(svc.replica))  # added last: outermost, so refusals carry it too
    return api
