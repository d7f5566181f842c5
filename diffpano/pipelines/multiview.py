"""MultiViewPanoPipeline: text and camera poses to tours of consistent panoramas, views denoised jointly with EA."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffpano.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, WINDOW_VIEWS
from diffpano.geometry.spherical import validate_poses
from diffpano.models.epipolar import EpipolarAdapter
from diffpano.pipelines.pano import (
    DECODE_CHUNK,
    Generators,
    PanoPipeline,
    Prompts,
    StepEnd,
    TourOutput,
    check_callback,
    resolve_generators,
    view_generators,
)
from diffpano.pipelines.schedulers import scheduler_label


class MultiViewPanoPipeline(PanoPipeline):
    """N prompts + N poses -> N consistent panoramas, denoised jointly; each view attends to its K nearest views."""

    _optional_components = ["vae", "epipolar"]

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None, epipolar: EpipolarAdapter | None = None):
        super().__init__(unet, scheduler, text_encoder, tokenizer, vae)
        if epipolar is None:
            epipolar = EpipolarAdapter.for_unet(unet).to(unet.device, unet.dtype)
        self.register_modules(epipolar=epipolar)
        epipolar.attach(unet)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompts,
        poses,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int | Sequence[int] | None = None,
        num_ref_views: int | None = None,
        num_samples: int | None = None,
        use_epipolar: bool = True,
        known_views: dict | Sequence[dict] | None = None,
        window_views: int | None = None,
        window_context: int | None = None,
        generator: Generators | None = None,
        eta: float = 0.0,
        scheduler: str | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        image: np.ndarray | None = None,
        strength: float = 1.0,
    ) -> TourOutput | tuple:
        """Generate B tours of N views from poses (N, 4, 4) or (B, N, 4, 4) and prompts (one, per view, per tour).

        known_views maps view indices to given images (H, W, 3) that are kept fixed while the other views are generated
        consistent with them (one dict, or one per tour with the same keys); they are returned exactly as given.
        Tours longer than window_views are generated in windows in which new views attend to up to window_context
        already generated nearby views.
        seed (one per tour) or generator (one, or a list with one per tour) make a tour reproducible, alone or in a
        batch, with any scheduler. scheduler names a sampler (diffpano.pipelines.schedulers.SCHEDULER_NAMES; None: the
        model's
        own); eta is DDIM's. output_type "np" gives uint8 arrays (B, N, H, W, 3) (diffusers' "np" is float; this
        project's callers and manifests take uint8), "pil" lists (tours) of lists (views) of PIL images, "latent" the
        model-space tensor (B, N, c, h, w). return_dict=False returns the tuple (images, poses, prompts, seeds).
        latents (B, N, c, h, w), or (N, c, h, w) for one tour, replace the initial noise the seeds would draw (a
        stochastic sampler's noise still comes from the seeds). callback_on_step_end(pipe, step, timestep,
        {"latents": (B, V, c, h, w) of the window being denoised}) runs after every UNet call, step counting the
        calls of the whole tour, and may return replacement latents (diffusers' convention).
        image (N, H, W, 3) or (B, N, H, W, 3) uint8 starts every view from an image (img2img, diffusers' convention):
        each is noised to the step that strength names and denoised from there (1: pure generation, 0: the images
        as they are), the views attending to each other as usual.
        """
        prompts, poses_t, height, width, window, context_n = self.check_inputs(
            prompt, poses, height, width, window_views, window_context, num_ref_views, num_samples)
        b, n = poses_t.shape[:2]
        sampling = self._sampling(num_inference_steps, guidance_scale, eta, scheduler, output_type, strength)
        names = check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        generators, seeds = resolve_generators(generator, seed, b)
        x_t, step_seeds = self._initial_noise(generators, n, height, width)
        if latents is not None:
            x_t = self._given_latents(latents.unsqueeze(0) if torch.is_tensor(latents) and latents.ndim == 4
                                      else latents, x_t.shape)
        known, clean, given = self._known(known_views, b, n, height, width)
        init = self._init_latents(image, b, n, height, width)
        cond = self._embed([p for tour in prompts for p in tour]).unflatten(0, (b, n))
        uncond = self._embed([""])
        result = clean if clean is not None else torch.zeros_like(x_t)
        done = known.clone() if known is not None else torch.zeros(n, dtype=torch.bool)
        plan = self._plan_windows(poses_t, done, window, context_n)
        with self.progress_bar(total=len(plan) * sampling.unet_calls) as bar:
            step_end = StepEnd(self, bar, callback_on_step_end, names)
            for idx, _ in plan:
                sel = (torch.arange(b).view(-1, 1), idx)  # each tour's views of this window
                fixed = done[idx[0]]  # context views and user-given views stay as they are
                ctx = self.epipolar.context(poses_t[sel], num_ref_views, num_samples) if use_epipolar else None
                x = self._denoise(
                    x_t[sel], cond[sel], uncond, sampling, ctx,
                    fixed.to(self.device).expand(b, -1) if fixed.any() else None, result[sel],
                    view_generators(step_seeds, idx), step_end, None if init is None else init[sel],
                )
                result[sel] = x
                done[idx[0]] = True
        images = self._postprocess(result, output_type, given)
        out = TourOutput(images=images, poses=poses_t.cpu().numpy(), prompts=prompts, seeds=seeds,
                         scheduler=scheduler_label(sampling.scheduler))
        return out if return_dict else (out.images, out.poses, out.prompts, out.seeds)

    def check_inputs(self, prompt: Prompts, poses, height: int | None, width: int | None, window_views: int | None,
                     window_context: int | None, num_ref_views: int | None, num_samples: int | None) -> tuple:
        """Everything about a tour call that needs no model work, checked (ValueError naming the field) and
        normalised: (prompts per tour and view, poses (B, N, 4, 4) float64, height, width, window, context)."""
        poses_t = validate_poses(poses, field="poses").double()
        if poses_t.ndim == 3:
            poses_t = poses_t.unsqueeze(0)
        if poses_t.ndim != 4:
            raise ValueError(f"poses: expected (views, 4, 4) or (tours, views, 4, 4), got {tuple(poses_t.shape)}")
        prompts = self._per_view_prompts(prompt, poses_t.shape[1], poses_t.shape[0])
        b, n = len(prompts), poses_t.shape[1]
        poses_t = poses_t.expand(b, n, 4, 4)
        height, width = self.check_size(height, width)
        window = int(window_views or WINDOW_VIEWS)  # views denoised jointly per window of a long tour
        context_n = window // 2 if window_context is None else int(window_context)
        if window < 1 or not 0 <= context_n < window:
            raise ValueError(
                "window_views/window_context: need window_views >= 1 and 0 <= window_context < window_views, "
                f"got {window}/{context_n}"
            )
        self.epipolar.context(poses_t[:1, :1], num_ref_views, num_samples)  # validates K and S
        return prompts, poses_t, height, width, window, context_n

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
        """Mask (N,) of given views, their model-space tensors (B, N, c, h, w) and (view indices, the images
        (B, K, H, W, 3) uint8), or Nones."""
        if not known_views:
            return None, None, None
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
        return mask, clean, (keys, torch.stack(images).unflatten(0, (b, len(keys))).numpy())

    def _init_latents(self, image, b: int, n: int, height: int, width: int) -> torch.Tensor | None:
        """Model-space tensors (B, N, c, h, w) of img2img's initial images (one tour's for all, or one per tour)."""
        if image is None:
            return None
        x = np.asarray(image)
        if x.ndim == 4:
            x = np.broadcast_to(x, (b, *x.shape))
        if x.shape != (b, n, height, width, 3) or x.dtype != np.uint8:
            raise ValueError(f"image: expected uint8 images of shape {(n, height, width, 3)} or "
                             f"{(b, n, height, width, 3)}, got {x.dtype} {x.shape}")
        flat = torch.from_numpy(np.array(x.reshape(-1, height, width, 3)))  # a copy: x may be a broadcast view
        return torch.cat([self._encode_images(chunk) for chunk in flat.split(DECODE_CHUNK)]).unflatten(0, (b, n))

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
