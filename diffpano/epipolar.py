"""The spherical epipolar-aware (EA) module and the adapter that inserts it after a UNet's up-block transformers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffpano.geometry import circular_grid_sample, epipolar_samples, nearest_views, validate_poses

MAX_REF_VIEWS = 16
MAX_SAMPLES = 64
GEOMETRY_FEATURES = 4  # inverse depth, parallax cosine, log distance, source latitude
EPIPOLAR_KWARG = "epipolar"  # key of the EpipolarContext in a UNet call's cross_attention_kwargs


def check_epipolar_settings(num_ref_views: int, num_samples: int, near: float, far: float) -> None:
    """Raise ValueError naming the setting when K, S or the depth range are out of range."""
    if not 1 <= num_ref_views <= MAX_REF_VIEWS:
        raise ValueError(f"num_ref_views: K must be in [1, {MAX_REF_VIEWS}], got {num_ref_views}")
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise ValueError(f"num_samples: S must be in [1, {MAX_SAMPLES}], got {num_samples}")
    if not (math.isfinite(near) and math.isfinite(far) and 0 < near < far):
        raise ValueError(f"near/far: need 0 < near < far, got near={near}, far={far}")


def fourier_features(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[x, sin(2^f pi x), cos(2^f pi x)] for f < num_freqs, concatenated over the last axis."""
    scaled = x.unsqueeze(-1) * (math.pi * 2.0 ** torch.arange(num_freqs, device=x.device, dtype=x.dtype))
    return torch.cat((x, scaled.sin().flatten(-2), scaled.cos().flatten(-2)), dim=-1)


@dataclass
class EpipolarContext:
    """Camera layout of one UNet call: G groups of N views, with sampling grids cached per feature-map size."""

    poses: torch.Tensor  # (G, N, 4, 4)
    ref_index: torch.Tensor  # (G, N, K)
    ref_valid: torch.Tensor  # (G, N, K)
    num_samples: int
    near: float
    far: float
    pe_freqs: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_views(self) -> int:
        """Views per group (N)."""
        return self.poses.shape[1]

    def sampling(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grid (G*N*K, hw, S, 2), mask (G*N, K, hw, S) and geometry encoding (G*N*K, P, hw, S) at one size."""
        key = (height, width)
        if key not in self._cache:
            s = epipolar_samples(
                self.poses, self.ref_index, self.ref_valid, height, width, self.num_samples, self.near, self.far
            )
            g, n, k, hw, ns = s.mask.shape
            inv = (1 / s.depth - 1 / self.far) / (1 / self.near - 1 / self.far)
            feats = torch.stack(
                (
                    inv.expand_as(s.distance),
                    (s.source_dirs * s.ray_dirs.unsqueeze(-2)).sum(-1),
                    s.distance.clamp_min(1e-3).log() / math.log(self.far),
                    -s.source_dirs[..., 1],
                ),
                dim=-1,
            )
            pe = fourier_features(feats, self.pe_freqs).reshape(g * n * k, hw, ns, -1).permute(0, 3, 1, 2)
            self._cache[key] = (
                s.grid.reshape(g * n * k, hw, ns, 2),
                s.mask.reshape(g * n, k, hw, ns),
                pe.contiguous(),
            )
        return self._cache[key]


class EpipolarAttention(nn.Module):
    """One EA module: each target pixel attends over S epipolar samples in K reference views, added residually."""

    def __init__(self, channels: int, num_heads: int, head_dim: int, pe_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)
        self.to_q = nn.Conv2d(channels, inner, 1)
        self.to_kv = nn.Conv2d(channels, 2 * inner, 1)
        self.geometry = nn.Sequential(nn.Conv2d(pe_dim, inner, 1), nn.SiLU(), nn.Conv2d(inner, 2 * inner, 1))
        self.null_key = nn.Parameter(torch.zeros(num_heads, head_dim))  # lets a pixel with no usable sample attend
        self.to_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.to_out.weight)  # zero-initialised: a fresh module leaves the single-view UNet unchanged
        nn.init.zeros_(self.to_out.bias)

    def _encode_geometry(self, pe: torch.Tensor, ctx: EpipolarContext) -> torch.Tensor:
        """Key/value offsets of the sample geometry; fixed over a sampling run, so memoised there (not in training)."""
        if torch.is_grad_enabled():
            return self.geometry(pe)
        key = (id(self), pe.shape, pe.dtype)
        if key not in ctx._cache:
            ctx._cache[key] = self.geometry(pe)
        return ctx._cache[key]

    def forward(self, x: torch.Tensor, ctx: EpipolarContext) -> torch.Tensor:
        """x (c*G*N, C, h, w): c stacked copies of the context's views (c = 2 under CFG), plus epipolar attention."""
        b, _, h, w = x.shape
        gn = ctx.poses.shape[0] * ctx.num_views
        if b % gn:
            raise ValueError(f"batch: {b} feature maps are not a whole number of copies of {gn} views")
        copies, hw = b // gn, h * w
        grid, mask, pe = ctx.sampling(h, w)
        k, s = ctx.ref_index.shape[-1], grid.shape[2]
        heads, hd = self.num_heads, self.head_dim
        xn = self.norm(x)
        q = self.to_q(xn).view(copies, gn, heads, hd, hw) * hd**-0.5
        kv = self.to_kv(xn).view(copies, gn, -1, h, w).transpose(0, 1)
        groups = torch.arange(ctx.poses.shape[0], device=x.device).view(-1, 1, 1) * ctx.num_views
        kv_ref = kv[(groups + ctx.ref_index).reshape(-1)].flatten(1, 2)  # (G*N*K, copies*2I, h, w)
        # Projections commute with bilinear sampling, so keys/values are sampled after projecting; the copies ride
        # along as channels so the grids (the same for every copy) are used once.
        kv_s = circular_grid_sample(kv_ref, grid).view(gn, k, copies, 2, heads, hd, hw, s)
        kv_s = kv_s.add_(self._encode_geometry(pe.to(x.dtype), ctx).view(gn, k, 1, 2, heads, hd, hw, s))
        key, value = kv_s.unbind(3)  # (G*N, K, copies, heads, hd, hw, S)
        q = q.transpose(0, 1)  # (G*N, copies, heads, hd, hw)
        logits = (q[:, None, ..., None] * key).sum(4)  # (G*N, K, copies, heads, hw, S)
        logits = logits.masked_fill_(~mask[:, :, None, None], float("-inf"))
        null = torch.einsum("gchdp,hd->gchp", q, self.null_key.to(x.dtype))  # the null token's logit; its value is 0
        # softmax over the K*S samples and the null token, written out because K and S are not adjacent dims
        top = torch.maximum(logits.amax(dim=(1, 5)), null)
        weights = (logits - top[:, None, ..., None]).exp()
        weights = weights / (weights.sum((1, 5)) + (null - top).exp())[:, None, ..., None]
        out = (weights.unsqueeze(4) * value).sum((1, 6))  # (G*N, copies, heads, hd, hw)
        return x + self.to_out(out.transpose(0, 1).reshape(b, heads * hd, h, w))


class EpipolarAdapter(ModelMixin, ConfigMixin):
    """The EA modules of a multi-view UNet, saved as their own model component ('epipolar/')."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        targets: list[str],
        channels: list[int],
        num_ref_views: int = 2,
        num_samples: int = 8,
        near: float = 0.3,
        far: float = 15.0,
        head_dim: int = 32,
        max_heads: int = 8,
        pe_freqs: int = 4,
    ):
        super().__init__()
        if len(targets) != len(channels):
            raise ValueError("targets/channels: need one channel count per target block")
        check_epipolar_settings(num_ref_views, num_samples, near, far)
        pe_dim = GEOMETRY_FEATURES * (1 + 2 * pe_freqs)
        self.blocks = nn.ModuleDict(
            {
                _key(t): EpipolarAttention(c, max(1, min(max_heads, c // head_dim)), min(head_dim, c), pe_dim)
                for t, c in zip(targets, channels, strict=True)
            }
        )

    @classmethod
    def for_unet(cls, unet: nn.Module, up_blocks: list[int] | None = None, **kwargs) -> EpipolarAdapter:
        """An adapter with one EA module after each transformer of the chosen up blocks (default: the last two)."""
        with_attn = [i for i, blk in enumerate(unet.up_blocks) if getattr(blk, "attentions", None)]
        chosen = with_attn[-2:] if up_blocks is None else list(up_blocks)
        bad = [i for i in chosen if i not in with_attn]
        if bad:
            raise ValueError(f"up_blocks: blocks {bad} have no transformer; choose from {with_attn}")
        targets, channels = [], []
        for i in chosen:
            for j, attn in enumerate(unet.up_blocks[i].attentions):
                targets.append(f"up_blocks.{i}.attentions.{j}")
                channels.append(int(attn.config.in_channels))
        return cls(targets=targets, channels=channels, **kwargs)

    def attach(self, unet: nn.Module) -> None:
        """Hook the EA modules in after their UNet transformers (re-attaching replaces earlier hooks).

        A UNet call applies them when given `cross_attention_kwargs=epipolar_kwargs(ctx)`, and not otherwise.
        """
        for handle in getattr(unet, "_diffpano_epipolar_hooks", []):
            handle.remove()
        handles = [
            unet.get_submodule(t).register_forward_hook(self._hook_for(_key(t)), with_kwargs=True)
            for t in self.config.targets
        ]
        # diffusers' attention processors warn about cross_attention_kwargs they do not take, so the context is
        # dropped before it reaches them
        handles += [
            m.register_forward_pre_hook(_drop_epipolar_kwarg, with_kwargs=True)
            for m in unet.modules()
            if isinstance(m, Attention)
        ]
        unet._diffpano_epipolar_hooks = handles

    def _hook_for(self, key: str):
        """A forward hook applying the EA module `key` to a transformer's output with the call's EpipolarContext."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            ctx = (kwargs.get("cross_attention_kwargs") or {}).get(EPIPOLAR_KWARG)
            if ctx is None:
                return None
            if isinstance(output, tuple):
                return (self.blocks[key](output[0], ctx),) + output[1:]
            output.sample = self.blocks[key](output.sample, ctx)
            return output

        return hook

    def context(
        self,
        poses: torch.Tensor,
        num_ref_views: int | None = None,
        num_samples: int | None = None,
        near: float | None = None,
        far: float | None = None,
    ) -> EpipolarContext:
        """Validated camera layout for poses (G, N, 4, 4); K, S, near and far default to the model's config."""
        cfg = self.config
        k = cfg.num_ref_views if num_ref_views is None else num_ref_views
        s = cfg.num_samples if num_samples is None else num_samples
        near = cfg.near if near is None else near
        far = cfg.far if far is None else far
        check_epipolar_settings(k, s, near, far)
        poses = validate_poses(poses).to(device=self.device, dtype=torch.float32)
        if poses.ndim != 4:
            raise ValueError(f"poses: expected shape (tours, views, 4, 4), got {tuple(poses.shape)}")
        ref_index, ref_valid = nearest_views(poses, k)
        return EpipolarContext(poses, ref_index, ref_valid, s, near, far, cfg.pe_freqs)


def epipolar_kwargs(ctx: EpipolarContext | None) -> dict | None:
    """`cross_attention_kwargs` of a UNet call whose attached EA modules use ctx (None: they add nothing)."""
    return None if ctx is None else {EPIPOLAR_KWARG: ctx}


def _drop_epipolar_kwarg(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of an attention layer: its call without the EA context."""
    if EPIPOLAR_KWARG not in kwargs:
        return None
    return args, {k: v for k, v in kwargs.items() if k != EPIPOLAR_KWARG}


def _key(target: str) -> str:
    """ModuleDict key for a dotted submodule path."""
    return target.replace(".", "_")
