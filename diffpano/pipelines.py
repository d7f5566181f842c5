"""Text-to-panorama pipelines: PanoPipeline (one view, Pano-SD) and MultiViewPanoPipeline (tours with EA modules)."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from diffpano.epipolar import EpipolarAdapter, EpipolarContext
from diffpano.geometry import check_panorama_size, validate_poses
from diffpano.seamless import make_seamless
from diffpano.text import encode_prompts

MAX_SEED = 2**63 - 1
DECODE_CHUNK = 8
DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's; also the bundled model's best measured (MODEL.md)
DEFAULT_WINDOW_VIEWS = 8  # views denoised jointly per window of a long tour

Prompts = str | Sequence[str] | Sequence[Sequence[str]]


@dataclass
class PanoramaOutput(BaseOutput):
    """Generated panoramas as uint8 arrays (B, H, W, 3)."""

    images: np.ndarray


@dataclass
class TourOutput(BaseOutput):
    """Generated tours: images (B, N, H, W, 3) uint8, poses (B, N, 4, 4), prompts and seeds per tour."""

    images: np.ndarray
    poses: np.ndarray
    prompts: list[list[str]]
    seeds: list[int]


def to_pil(image: np.ndarray) -> Image.Image:
    """A PIL image from an (H, W, 3) uint8 array."""
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def resolve_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """One seed per tour: a list as given, consecutive seeds from an int, or random ones."""
    if seed is None:
        base = random.SystemRandom().randrange(0, MAX_SEED - count)
        return [base + i for i in range(count)]
    seeds = [seed + i for i in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"seed: got {len(seeds)} seeds for {count} tours")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seed: seeds must be in [0, 2^63 - 1], got {seeds}")
    return seeds


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

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return self.vae_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was configured for."""
        size = self.unet.config.sample_size
        h = (size[0] if isinstance(size, (list, tuple)) else size) * self.vae_factor
        return h, 2 * h

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Validated (height, width), defaulting to the model's size; ValueError names the rule broken."""
        dh, dw = self.default_size
        height = dh if height is None else int(height)
        width = 2 * height if width is None else int(width)
        check_panorama_size(height, width, self.size_multiple, field="height/width")
        return height, width

    def _epipolar_scope(self, ctx: EpipolarContext | None):
        """Context in which UNet calls see the multi-view layout (none for a single-view model)."""
        return contextlib.nullcontext()

    def _initial_noise(self, seeds: list[int], views: int, height: int, width: int) -> torch.Tensor:
        """x_T (B, N, c, h, w): each tour's noise drawn from its own seed on the CPU, so batching changes nothing."""
        f = self.vae_factor
        shape = (views, self.unet.config.in_channels, height // f, width // f)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device, self.unet.dtype)

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Model-space tensors (B, c, h, w) of uint8 images (B, H, W, 3)."""
        x = images.to(self.device, torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0
        if self.vae is None:
            return x.to(self.unet.dtype)
        latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    def _decode(self, x: torch.Tensor) -> np.ndarray:
        """uint8 images (B, H, W, 3) of model-space tensors (B, c, h, w)."""
        out = []
        for chunk in x.split(DECODE_CHUNK):
            if self.vae is not None:
                chunk = self.vae.decode(chunk.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            img = ((chunk.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings (P, L, D) in the UNet's dtype."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts).to(self.unet.dtype)

    def _denoise(
        self,
        x_t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        steps: int,
        guidance: float,
        ctx: EpipolarContext | None = None,
        known: torch.Tensor | None = None,
        clean: torch.Tensor | None = None,
        progress=None,
    ) -> torch.Tensor:
        """Denoise x_T (B, V, c, h, w) jointly; views where `known` (B, V) is True follow `clean`, noised to each t."""
        b, v = x_t.shape[:2]
        sched = self.scheduler
        sched.set_timesteps(steps, device=self.device)
        cfg = guidance > 1.0
        emb = cond.flatten(0, 1)
        if cfg:
            emb = torch.cat((uncond.expand(b * v, *uncond.shape[-2:]), emb))  # the EA modules see 2 copies of ctx
        x = (x_t * sched.init_noise_sigma).flatten(0, 1)
        keep = None if known is None else known.flatten().view(-1, 1, 1, 1)
        for t in sched.timesteps:
            if keep is not None:
                noised = sched.add_noise(clean.flatten(0, 1), x_t.flatten(0, 1), t.repeat(b * v))
                x = torch.where(keep, noised, x)
            inp = torch.cat((x, x)) if cfg else x
            inp = sched.scale_model_input(inp, t)
            with self._epipolar_scope(ctx):
                eps = self.unet(inp, t, encoder_hidden_states=emb).sample
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x).prev_sample
            if progress is not None:
                progress.update()
        if keep is not None:
            x = torch.where(keep, clean.flatten(0, 1), x)
        return x.view_as(x_t)

    @staticmethod
    def check_sampling(num_inference_steps: int, guidance_scale: float) -> None:
        """ValueError naming the field when steps or guidance are out of range."""
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= 1000:
            raise ValueError(f"num_inference_steps: must be an integer in [1, 1000], got {num_inference_steps!r}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale: must be a finite number >= 0, got {guidance_scale!r}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int | Sequence[int] | None = None,
    ) -> PanoramaOutput:
        """One panorama per prompt."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: expected a string or a non-empty list of strings")
        height, width = self.check_size(height, width)
        self.check_sampling(num_inference_steps, guidance_scale)
        seeds = resolve_seeds(seed, len(prompts))
        x_t = self._initial_noise(seeds, 1, height, width)
        cond = self._embed(prompts).unsqueeze(1)
        with self.progress_bar(total=num_inference_steps) as bar:
            x = self._denoise(x_t, cond, self._embed([""]), num_inference_steps, guidance_scale, progress=bar)
        return PanoramaOutput(images=self._decode(x.flatten(0, 1)))


class MultiViewPanoPipeline(PanoPipeline):
    """N prompts + N poses -> N consistent panoramas, denoised jointly; each view attends to its K nearest views."""

    _optional_components = ["vae", "epipolar"]

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None, epipolar: EpipolarAdapter | None = None):
        super().__init__(unet, scheduler, text_encoder, tokenizer, vae)
        if epipolar is None:
            epipolar = EpipolarAdapter.for_unet(unet).to(unet.device, unet.dtype)
        self.register_modules(epipolar=epipolar)
        epipolar.attach(unet)

    def _epipolar_scope(self, ctx: EpipolarContext | None):
        """UNet calls inside see the tour layout through the EA modules."""
        return self.epipolar.use(ctx)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompts,
        poses,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int | Sequence[int] | None = None,
        num_ref_views: int | None = None,
        num_samples: int | None = None,
        use_epipolar: bool = True,
        known_views: dict | Sequence[dict] | None = None,
        window_views: int | None = None,
        window_context: int | None = None,
    ) -> TourOutput:
        """Generate B tours of N views from poses (N, 4, 4) or (B, N, 4, 4) and prompts (one, per view, per tour).

        known_views maps view indices to given images (H, W, 3) that are kept fixed while the other views are generated
        consistent with them (one dict, or one per tour with the same keys). Tours longer than window_views are
        generated in windows in which new views attend to up to window_context already generated nearby views.
        """
        poses_t = validate_poses(poses, field="poses").double()
        if poses_t.ndim == 3:
            poses_t = poses_t.unsqueeze(0)
        if poses_t.ndim != 4:
            raise ValueError(f"poses: expected (views, 4, 4) or (tours, views, 4, 4), got {tuple(poses_t.shape)}")
        prompts = self._per_view_prompts(prompt, poses_t.shape[1], poses_t.shape[0])
        b, n = len(prompts), poses_t.shape[1]
        poses_t = poses_t.expand(b, n, 4, 4)
        height, width = self.check_size(height, width)
        self.check_sampling(num_inference_steps, guidance_scale)
        seeds = resolve_seeds(seed, b)
        window = int(window_views or DEFAULT_WINDOW_VIEWS)
        context_n = window // 2 if window_context is None else int(window_context)
        if window < 1 or not 0 <= context_n < window:
            raise ValueError(
                "window_views/window_context: need window_views >= 1 and 0 <= window_context < window_views, "
                f"got {window}/{context_n}"
            )
        self.epipolar.context(poses_t[:1, :1], num_ref_views, num_samples)  # validates K and S early
        known, clean = self._known(known_views, b, n, height, width)

        x_t = self._initial_noise(seeds, n, height, width)
        cond = self._embed([p for tour in prompts for p in tour]).unflatten(0, (b, n))
        uncond = self._embed([""])
        result = clean if clean is not None else torch.zeros_like(x_t)
        done = known.clone() if known is not None else torch.zeros(n, dtype=torch.bool)
        plan = self._plan_windows(poses_t, done, window, context_n)
        with self.progress_bar(total=len(plan) * num_inference_steps) as bar:
            for idx, _ in plan:
                sel = (torch.arange(b).view(-1, 1), idx)  # each tour's views of this window
                fixed = done[idx[0]]  # context views and user-given views stay as they are
                ctx = self.epipolar.context(poses_t[sel], num_ref_views, num_samples) if use_epipolar else None
                x = self._denoise(
                    x_t[sel], cond[sel], uncond, num_inference_steps, guidance_scale, ctx,
                    fixed.to(self.device).expand(b, -1) if fixed.any() else None, result[sel], bar,
                )
                result[sel] = x
                done[idx[0]] = True
        images = self._decode(result.flatten(0, 1)).reshape(b, n, height, width, 3)
        return TourOutput(images=images, poses=poses_t.cpu().numpy(), prompts=prompts, seeds=seeds)

    @staticmethod
    def _per_view_prompts(prompt: Prompts, views: int, tours: int) -> list[list[str]]:
        """Prompts as (tours, views): one for all, one per view (shared by tours) or one per tour and view."""
        if isinstance(prompt, str):
            return [[prompt] * views for _ in range(tours)]
        items = list(prompt)
        if items and all(isinstance(p, str) for p in items):
            if len(items) != views:
                raise ValueError(f"prompt: got {len(items)} prompts for {views} views")
            return [list(items) for _ in range(tours)]
        if items and all(isinstance(p, (list, tuple)) for p in items):
            if tours not in (1, len(items)):
                raise ValueError(f"prompt: got prompts for {len(items)} tours but poses for {tours}")
            for i, tour in enumerate(items):
                if len(tour) != views or not all(isinstance(p, str) for p in tour):
                    raise ValueError(f"prompt[{i}]: expected {views} strings, one per view")
            return [list(t) for t in items]
        raise ValueError("prompt: expected a string, a list of strings or a list of lists of strings")

    def _known(self, known_views, b: int, n: int, height: int, width: int):
        """Mask (N,) of given views and their model-space tensors (B, N, c, h, w), or (None, None)."""
        if not known_views:
            return None, None
        per_tour = [known_views] * b if isinstance(known_views, dict) else list(known_views)
        if len(per_tour) != b or any(set(d) != set(per_tour[0]) for d in per_tour):
            raise ValueError("known_views: need one dict per tour, all with the same view indices")
        keys = sorted(per_tour[0])
        if any(not isinstance(i, int) or not 0 <= i < n for i in keys):
            raise ValueError(f"known_views: view indices must be integers in [0, {n}), got {keys}")
        images = []
        for tour in per_tour:
            for i in keys:
                img = np.asarray(tour[i])
                if img.shape != (height, width, 3):
                    raise ValueError(f"known_views[{i}]: expected an image of shape {(height, width, 3)}, "
                                     f"got {img.shape}")
                images.append(torch.from_numpy(img.astype(np.uint8)))
        enc = self._encode_images(torch.stack(images)).unflatten(0, (b, len(keys)))
        f = self.vae_factor
        clean = torch.zeros(b, n, self.unet.config.in_channels, height // f, width // f,
                            device=self.device, dtype=self.unet.dtype)
        clean[:, keys] = enc
        mask = torch.zeros(n, dtype=torch.bool)
        mask[keys] = True
        return mask, clean

    @staticmethod
    def _plan_windows(poses: torch.Tensor, done: torch.Tensor, window: int, context_n: int):
        """Windows as (view indices (B, V), number of leading context views) in generation order."""
        b, n = poses.shape[:2]
        pending = [i for i in range(n) if not done[i]]
        if n <= window:
            return [(torch.arange(n).expand(b, n), 0)] if pending else []
        generated = [i for i in range(n) if done[i]]
        centres = poses[..., :3, 3]
        plan = []
        while pending:
            n_ctx = min(len(generated), context_n)
            new, pending = pending[: window - n_ctx], pending[window - n_ctx :]
            if n_ctx:
                gen = torch.tensor(generated)
                dist = torch.cdist(centres[:, gen], centres[:, new]).amin(-1)  # (B, generated)
                ctx_idx = gen[dist.topk(n_ctx, largest=False).indices]
            else:
                ctx_idx = torch.empty(b, 0, dtype=torch.long)
            plan.append((torch.cat((ctx_idx, torch.tensor(new).expand(b, -1)), 1), n_ctx))
            generated += new
        return plan
