"""PanoPipeline: text to one seamless panorama (Pano-SD); the denoising loop and conventions every pipeline shares."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from PIL import Image

from diffpano.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_SEED, MAX_STEPS, random_seed
from diffpano.geometry.spherical import check_panorama_size
from diffpano.models.epipolar import EpipolarContext, epipolar_kwargs
from diffpano.models.seamless import make_seamless
from diffpano.models.text import encode_prompts
from diffpano.pipelines.compiling import mark_step
from diffpano.pipelines.schedulers import (
    check_samplable,
    fresh_scheduler,
    make_scheduler,
    scheduler_label,
    takes_eta,
    unet_calls,
)

log = logging.getLogger(__name__)
DECODE_CHUNK = 8
OUTPUT_TYPES = ("np", "pil", "latent")

Prompts = str | Sequence[str] | Sequence[Sequence[str]]
Generators = torch.Generator | Sequence[torch.Generator]


@dataclass
class PanoramaOutput(BaseOutput):
    """Generated panoramas: uint8 (B, H, W, 3) ("np"), a list of PIL images ("pil") or (B, c, h, w) ("latent")."""

    images: np.ndarray | list[Image.Image] | torch.Tensor


@dataclass
class TourOutput(BaseOutput):
    """Generated tours: images (B, N, H, W, 3) uint8 (or as output_type), poses (B, N, 4, 4), prompts, seeds, and
    the sampler that made them (a seed reproduces a tour only with the same one)."""

    images: np.ndarray | list[list[Image.Image]] | torch.Tensor
    poses: np.ndarray
    prompts: list[list[str]]
    seeds: list[int]
    scheduler: str | None = None


@dataclass
class Sampling:
    """How a call samples: steps, CFG scale, eta, and the scheduler each denoising run copies afresh."""

    steps: int
    guidance: float
    scheduler: SchedulerMixin
    eta: float = 0.0
    strength: float = 1.0  # img2img: how much of the noise schedule runs from the initial images (1: all of it)

    @property
    def first(self) -> int:
        """Index of the first timestep run: with strength < 1 the noisiest ones are skipped (diffusers' img2img)."""
        return (self.steps - min(int(self.steps * self.strength), self.steps)) * self.scheduler.order

    @property
    def unet_calls(self) -> int:
        """UNet calls (progress updates) of one denoising run."""
        return max(0, unet_calls(self.scheduler, self.steps) - self.first)


def to_pil(image: np.ndarray) -> Image.Image:
    """A PIL image from an (H, W, 3) uint8 array."""
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def resolve_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """One seed per tour: a list as given, consecutive seeds from an int, or random ones."""
    if seed is None:
        base = random_seed() % (MAX_SEED - count + 1)  # room for the consecutive seeds after it
        return [base + i for i in range(count)]
    seeds = [seed + i for i in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"seed: got {len(seeds)} seeds for {count} tours")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seed: seeds must be in [0, 2^63 - 1], got {seeds}")
    return seeds


def resolve_generators(
    generator: Generators | None, seed: int | Sequence[int] | None, count: int
) -> tuple[list[torch.Generator], list[int]]:
    """One generator per tour (given, or a CPU generator per seed) and the seeds (a generator's initial_seed)."""
    if generator is not None and seed is not None:
        raise ValueError("seed/generator: give one of seed and generator, not both")
    if generator is None:
        seeds = resolve_seeds(seed, count)
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds
    # one generator for several tours draws them in turn (diffusers' convention); a list gives each its own
    gens = [generator] * count if isinstance(generator, torch.Generator) else list(generator)
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError("generator: expected a torch.Generator or a list of them, one per tour")
    if len(gens) != count:
        raise ValueError(f"generator: got {len(gens)} generators for {count} tours")
    return gens, [g.initial_seed() for g in gens]


def step_kwargs(scheduler: SchedulerMixin, generator, eta: float) -> dict:
    """The optional arguments scheduler.step accepts (diffusers' prepare_extra_step_kwargs)."""
    extra = {"eta": eta} if takes_eta(scheduler) else {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = generator
    return extra


def view_generators(step_seeds: list[list[int]], views: torch.Tensor) -> list[torch.Generator]:
    """CPU generators for a run's (tour, view) samples, in batch order, each seeded by its tour and view alone."""
    return [
        torch.Generator("cpu").manual_seed(step_seeds[i][j]) for i, row in enumerate(views.tolist()) for j in row
    ]


class StepEnd:
    """What runs after every UNet call of a pipeline call: the progress bar moves, and the caller's
    callback_on_step_end (diffusers' convention: callback(pipe, step, timestep, {"latents": ...}) -> dict) sees the
    current latents (B, V, c, h, w) and may return replacements. `step` counts UNet calls over the whole call."""

    def __init__(self, pipe, bar, callback: Callable | None = None, tensor_inputs: Sequence[str] = ("latents",)):
        self.pipe, self.bar, self.callback, self.tensor_inputs, self.step = pipe, bar, callback, tensor_inputs, 0
        pipe._num_timesteps = bar.total  # what diffusers' num_timesteps reports to callbacks

    def __call__(self, t: torch.Tensor, x: torch.Tensor, shape: tuple[int, ...],
                 x0: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """x (B*V, c, h, w) after a scheduler step, as the callback left it; x0 computes the step's estimate of the
        clean latents, asked only when the callback names "pred_original_sample"."""
        self.bar.update()
        if self.callback is not None:
            given = {"latents": x.view(shape)} if "latents" in self.tensor_inputs else {}
            if "pred_original_sample" in self.tensor_inputs and x0 is not None:
                given["pred_original_sample"] = x0().view(shape)
            latents = (self.callback(self.pipe, self.step, t, given) or {}).get("latents")
            if latents is not None:
                if tuple(latents.shape) != tuple(shape):
                    raise ValueError(f"callback_on_step_end: returned latents of shape {tuple(latents.shape)}, "
                                     f"expected {tuple(shape)}")
                x = latents.reshape(x.shape).to(x.device, x.dtype)
        self.step += 1
        return x


def predicted_x0(sched: SchedulerMixin, out, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latents a step estimates: the scheduler's own pred_original_sample where its output has one (DDIM,
    Euler, Heun, LMS), else from the noise prediction on the pre-step latents x_t = sqrt(a) x0 + sqrt(1 - a) eps
    (the variance-preserving schedulers: DPM-Solver, UniPC, PNDM), a = alphas_cumprod[t]."""
    x0 = getattr(out, "pred_original_sample", None)
    if x0 is not None:
        return x0
    a = sched.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
    kind = sched.config.prediction_type
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * eps
    if kind == "sample":
        return eps
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def check_callback(callback: Callable | None, tensor_inputs: Sequence[str]) -> Sequence[str]:
    """The tensor inputs a step-end callback gets (a diffusers PipelineCallback names its own); ValueError naming
    callback_on_step_end_tensor_inputs for any other than "latents" and "pred_original_sample"."""
    names = getattr(callback, "tensor_inputs", None) or tensor_inputs
    if callback is not None and not callable(callback):
        raise ValueError(f"callback_on_step_end: expected a callable, got {type(callback).__name__}")
    if not set(names) <= {"latents", "pred_original_sample"}:
        raise ValueError("callback_on_step_end_tensor_inputs: only 'latents' and 'pred_original_sample' are "
                         f"available, got {list(names)}")
    return names


def vae_factor(vae_config) -> int:
    """Pixels per latent cell of a VAE config (1 in pixel space: no VAE)."""
    return 1 if vae_config is None else 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_multiple(unet_config, vae_config) -> int:
    """What panorama heights and widths must be multiples of for these UNet and VAE configs."""
    return vae_factor(vae_config) * 2 ** (len(unet_config["down_block_types"]) - 1)


def trained_size(unet_config, vae_config) -> tuple[int, int]:
    """(height, width) of the panoramas a model was configured (trained) for: the UNet's sample_size in pixels."""
    size = unet_config["sample_size"]
    h = (size[0] if isinstance(size, (list, tuple)) else size) * vae_factor(vae_config)
    return h, 2 * h


class PanoPipeline(DiffusionPipeline):
    """Prompt -> equirectangular panorama with a seamless (longitude-circular) UNet, in latent or pixel space."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        make_seamless(unet)
        if vae is not None:
            make_seamless(vae)
        self.model_name = "unnamed"
        self._sizes_warned: set[tuple[int, int]] = set()

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (1 in pixel space)."""
        return vae_factor(self.vae.config if self.vae is not None else None)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return size_multiple(self.unet.config, self.vae.config if self.vae is not None else None)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was configured (trained) for."""
        return trained_size(self.unet.config, self.vae.config if self.vae is not None else None)

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Validated (height, width), defaulting to the model's size; ValueError names the rule broken, and a size
        the model was not trained for is warned about once."""
        dh, dw = self.default_size
        height = dh if height is None else int(height)
        width = 2 * height if width is None else int(width)
        check_panorama_size(height, width, self.size_multiple, field="height/width")
        if (height, width) != (dh, dw) and (height, width) not in self._sizes_warned:
            self._sizes_warned.add((height, width))
            log.warning("size: %dx%d is not the size model %s was trained for (%dx%d, from its unet/ config); its "
                        "panoramas at other sizes repeat or lose their layout", height, width, self.model_name, dh, dw)
        return height, width

    def _initial_noise(
        self, generators: list[torch.Generator], views: int, height: int, width: int
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """x_T (B, N, c, h, w), each tour's drawn from its own generator (on its device: the CPU for seeds), so
        batching changes nothing; then one seed per view for the scheduler's own noise, drawn from the same one."""
        f = self.vae_factor
        shape = (views, self.unet.config.in_channels, height // f, width // f)
        noise, step_seeds = [], []
        for g in generators:
            noise.append(torch.randn(shape, generator=g, device=g.device).cpu())
            step_seeds.append(torch.randint(0, MAX_SEED, (views,), generator=g, device=g.device).tolist())
        return torch.stack(noise).to(self.device, self.unet.dtype), step_seeds

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Model-space tensors (B, c, h, w) of uint8 images (B, H, W, 3)."""
        x = images.to(self.device, torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0
        if self.vae is None:
            return x.to(self.unet.dtype)
        latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    @property
    def num_timesteps(self) -> int | None:
        """UNet calls of the pipeline call running (or last run): the total a step-end callback counts up to."""
        return getattr(self, "_num_timesteps", None)

    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 image (H, W, 3) of one view's model-space latents (c, h, w), e.g. a step's pred_original_sample."""
        return self._decode(latents[None])[0]

    def _decode(self, x: torch.Tensor) -> np.ndarray:
        """uint8 images (B, H, W, 3) of model-space tensors (B, c, h, w)."""
        out = []
        for chunk in x.split(DECODE_CHUNK):
            if self.vae is not None:
                chunk = self.vae.decode(chunk.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            img = ((chunk.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    def _postprocess(self, x: torch.Tensor, output_type: str, given: tuple[list[int], np.ndarray] | None = None):
        """x (B, N, c, h, w) as output_type: the tensor itself, uint8 (B, N, H, W, 3) or lists (tours) of PIL lists;
        given (view indices, images (B, K, H, W, 3)) replace their views' decoding: returned exactly as given."""
        if output_type == "latent":
            return x
        flat = self._decode(x.flatten(0, 1))
        images = flat.reshape(*x.shape[:2], *flat.shape[1:])
        if given is not None:
            images[:, given[0]] = given[1]
        if output_type == "pil":
            return [[to_pil(view) for view in tour] for tour in images]
        return images

    def _given_latents(self, latents, shape: torch.Size) -> torch.Tensor:
        """A caller's initial latents in place of the seeded noise; ValueError naming latents unless finite and of
        the shape the call needs."""
        if not torch.is_tensor(latents) or tuple(latents.shape) != tuple(shape):
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents: expected a tensor of shape {tuple(shape)}, got {got}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents: must be finite")
        return latents.to(self.device, self.unet.dtype)

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings (P, L, D) in the UNet's dtype."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts).to(self.unet.dtype)

    def _denoise(
        self,
        x_t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        sampling: Sampling,
        ctx: EpipolarContext | None = None,
        known: torch.Tensor | None = None,
        clean: torch.Tensor | None = None,
        generators: list[torch.Generator] | None = None,
        step_end: StepEnd | None = None,
        init: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise x_T (B, V, c, h, w) jointly; views where `known` (B, V) is True follow `clean`, noised to each t;
        with `init` (B, V, c, h, w), the run starts from it noised to sampling's first timestep (img2img).

        `generators` (one per view, B*V) drive a stochastic scheduler's noise; the EA modules see ctx (None: off);
        step_end runs after every UNet call.
        """
        b, v = x_t.shape[:2]
        sched = fresh_scheduler(sampling.scheduler)  # multistep and ancestral schedulers keep state while sampling
        sched.set_timesteps(sampling.steps, device=self.device)
        timesteps = sched.timesteps[sampling.first:]
        if init is not None and not len(timesteps):
            return init  # strength 0: nothing to denoise
        if sampling.first and hasattr(sched, "set_begin_index"):
            sched.set_begin_index(sampling.first)
        extra = step_kwargs(sched, generators, sampling.eta)
        guidance = sampling.guidance
        cfg = guidance > 1.0
        emb = cond.flatten(0, 1)
        if cfg:
            emb = torch.cat((uncond.expand(b * v, *uncond.shape[-2:]), emb))  # the EA modules see 2 copies of ctx
        if init is None:
            x = (x_t * sched.init_noise_sigma).flatten(0, 1)
        else:  # img2img: the initial images noised to the first timestep run, x_t being the noise
            x = sched.add_noise(init.flatten(0, 1), x_t.flatten(0, 1), timesteps[:1].repeat(b * v)).to(x_t.dtype)
        keep = None if known is None else known.flatten().view(-1, 1, 1, 1)
        attention_kwargs = epipolar_kwargs(ctx)
        if ctx is not None:
            self.epipolar.prepare(ctx, self.unet, *x.shape[-2:], emb.dtype)
        for t in timesteps:
            if keep is not None:
                noised = sched.add_noise(clean.flatten(0, 1), x_t.flatten(0, 1), t.repeat(b * v))
                x = torch.where(keep, noised.to(x.dtype), x)
            inp = torch.cat((x, x)) if cfg else x
            inp = sched.scale_model_input(inp, t)
            mark_step()
            eps = self.unet(inp, t, encoder_hidden_states=emb, cross_attention_kwargs=attention_kwargs).sample
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            before = x
            out = sched.step(eps, t, x, **extra)
            x = out.prev_sample
            if step_end is not None:
                x = step_end(t, x, tuple(x_t.shape), partial(predicted_x0, sched, out, eps, before, t))
        if keep is not None:
            x = torch.where(keep, clean.flatten(0, 1), x)
        return x.view_as(x_t)

    @staticmethod
    def check_sampling(num_inference_steps: int, guidance_scale: float, eta: float = 0.0) -> None:
        """ValueError naming the field when steps, guidance or eta are out of range."""
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps: must be an integer in [1, {MAX_STEPS}], "
                             f"got {num_inference_steps!r}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale: must be a finite number >= 0, got {guidance_scale!r}")
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta: must be a finite number >= 0, got {eta!r}")

    @staticmethod
    def check_output(output_type: str) -> None:
        """ValueError naming output_type unless it is one of OUTPUT_TYPES."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")

    def _sampling(
        self, steps: int, guidance: float, eta: float, scheduler: str | None, output_type: str, strength: float = 1.0
    ) -> Sampling:
        """Validated sampling settings; scheduler None is the pipeline's own, a name one of SCHEDULER_NAMES."""
        self.check_sampling(steps, guidance, eta)
        if not isinstance(strength, int | float) or not math.isfinite(strength) or not 0 <= strength <= 1:
            raise ValueError(f"strength: must be a number in [0, 1] (1: pure generation, 0: the images as they are), "
                             f"got {strength!r}")
        self.check_output(output_type)
        if scheduler is not None and not isinstance(scheduler, str):
            raise ValueError(f"scheduler: expected a scheduler name, got {type(scheduler).__name__}")
        template = self.scheduler if scheduler is None else make_scheduler(scheduler, self.scheduler.config)
        check_samplable(template)
        if eta and not takes_eta(template):
            raise ValueError(f"eta: {scheduler_label(template)} takes no eta (DDIM-style samplers do); leave it at 0")
        return Sampling(steps, float(guidance), template, float(eta), float(strength))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int | Sequence[int] | None = None,
        generator: Generators | None = None,
        eta: float = 0.0,
        scheduler: str | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> PanoramaOutput | tuple:
        """One panorama per prompt.

        seed (one per prompt) or generator (one, or a list with one per prompt) make it reproducible. scheduler names
        a sampler (diffpano.pipelines.schedulers.SCHEDULER_NAMES; None: the model's own); eta is DDIM's. latents
        (B, c, h, w)
        replace the initial noise; callback_on_step_end runs after every UNet call (StepEnd; its latents are
        (B, 1, c, h, w)). output_type "np" gives uint8 arrays (B, H, W, 3) (diffusers' "np" is float; this
        project's callers take uint8), "pil" a list of PIL images, "latent" the model-space tensor (B, c, h, w).
        return_dict=False returns a tuple.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: expected a string or a non-empty list of strings")
        height, width = self.check_size(height, width)
        sampling = self._sampling(num_inference_steps, guidance_scale, eta, scheduler, output_type)
        names = check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        generators, _ = resolve_generators(generator, seed, len(prompts))
        x_t, step_seeds = self._initial_noise(generators, 1, height, width)
        if latents is not None:
            x_t = self._given_latents(latents.unsqueeze(1) if torch.is_tensor(latents) else latents, x_t.shape)
        cond = self._embed(prompts).unsqueeze(1)
        view_gens = view_generators(step_seeds, torch.zeros(len(prompts), 1, dtype=torch.long))
        with self.progress_bar(total=sampling.unet_calls) as bar:
            step_end = StepEnd(self, bar, callback_on_step_end, names)
            x = self._denoise(x_t, cond, self._embed([""]), sampling, generators=view_gens, step_end=step_end)
        images = self._postprocess(x, output_type)
        images = images[:, 0] if output_type != "pil" else [tour[0] for tour in images]
        return PanoramaOutput(images=images) if return_dict else (images,)
