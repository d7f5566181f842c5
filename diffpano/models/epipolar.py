"""The spherical epipolar-aware (EA) module and the adapter that inserts it after a UNet's up-block transformers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from diffpano.defaults import MAX_REF_VIEWS, MAX_SAMPLES
from diffpano.geometry.spherical import EpipolarSamples, epipolar_samples, nearest_views, validate_poses
from diffpano.ops.layout import SampleTable, fourier_features, sample_table
from diffpano.ops.op import epipolar_attention

GEOMETRY_FEATURES = 4  # inverse depth, parallax cosine, log distance, source latitude
CODE_BLOCK_SAMPLES = 1 << 14  # samples per block of the geometry MLP
EPIPOLAR_KWARG = "epipolar"  # key of the EpipolarContext in a UNet call's cross_attention_kwargs


def check_epipolar_settings(num_ref_views: int, num_samples: int, near: float, far: float) -> None:
    """Raise ValueError naming the setting when K, S or the depth range are out of range."""
    if not 1 <= num_ref_views <= MAX_REF_VIEWS:
        raise ValueError(f"num_ref_views: K must be in [1, {MAX_REF_VIEWS}], got {num_ref_views}")
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise ValueError(f"num_samples: S must be in [1, {MAX_SAMPLES}], got {num_samples}")
    if not (math.isfinite(near) and math.isfinite(far) and 0 < near < far):
        raise ValueError(f"near/far: need 0 < near < far, got near={near}, far={far}")


@dataclass
class EpipolarContext:
    """Camera layout of one UNet call: G groups of N views, with sample tables cached per feature-map size."""

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

    def samples(self, height: int, width: int) -> EpipolarSamples:
        """Epipolar samples of every view at one feature-map size (not cached: the tables below are)."""
        return epipolar_samples(
            self.poses, self.ref_index, self.ref_valid, height, width, self.num_samples, self.near, self.far
        )

    def geometry_features(self, s: EpipolarSamples) -> torch.Tensor:
        """The GEOMETRY_FEATURES raw features (..., N, K, hw, S, 4) of each sample."""
        inv = (1 / s.depth - 1 / self.far) / (1 / self.near - 1 / self.far)
        return torch.stack(
            (
                inv.expand_as(s.distance),
                (s.source_dirs * s.ray_dirs.unsqueeze(-2)).sum(-1),
                s.distance.clamp_min(1e-3).log() / math.log(self.far),
                -s.source_dirs[..., 1],
            ),
            dim=-1,
        )

    def table(self, height: int, width: int) -> tuple[SampleTable, torch.Tensor]:
        """The operator's sample table and raw geometry features (rows, K*S, 4) at one size, cached."""
        key = ("table", height, width)
        if key not in self._cache:
            s = self.samples(height, width)
            g, n, k, hw, ns = s.mask.shape
            rows = lambda t: t.movedim(2, 3).reshape(g * n * hw, k * ns, *t.shape[5:])  # noqa: E731
            source = (torch.arange(g, device=self.poses.device).view(g, 1, 1) * n + self.ref_index).view(g, n, k, 1, 1)
            table = sample_table(
                rows(s.grid), rows(s.mask), rows(source.expand(g, n, k, hw, ns)), height, width, g * n
            )
            self._cache[key] = (table, rows(self.geometry_features(s)).contiguous())
        return self._cache[key]

    def held_bytes(self) -> int:
        """Bytes of the tables and memoised geometry codes kept between denoising steps."""
        items = [t for v in self._cache.values() for t in (v if isinstance(v, tuple) else (v,))]
        return sum(t.nbytes() if isinstance(t, SampleTable) else t.numel() * t.element_size() for t in items)


class EpipolarAttention(nn.Module):
    """One EA module: each target pixel attends over S epipolar samples in K reference views, added residually.

    Each sample's geometry (depth, parallax, distance, latitude) is encoded by an MLP into a rank-R code that enters
    the sample's key and value linearly (`geometry_kv`). By that linearity the fused operator never forms per-sample
    keys or values: the code's contribution to a logit is (A_k^T q) . code, and to the output A_v (sum_j a_j code_j).
    """

    def __init__(self, channels: int, num_heads: int, head_dim: int, pe_dim: int, rank: int = 16):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.rank = num_heads, head_dim, rank
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)
        self.to_q = nn.Conv2d(channels, inner, 1)
        self.to_kv = nn.Conv2d(channels, 2 * inner, 1)
        self.geometry = nn.Sequential(nn.Linear(pe_dim, inner), nn.SiLU(), nn.Linear(inner, rank))
        self.geometry_kv = nn.Linear(rank, 2 * inner)  # code -> key and value offsets
        self.null_key = nn.Parameter(torch.zeros(num_heads, head_dim))  # lets a pixel with no usable sample attend
        self.to_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.to_out.weight)  # zero-initialised: a fresh module leaves the single-view UNet unchanged
        nn.init.zeros_(self.to_out.bias)

    def geometry_code(self, features: torch.Tensor, pe_freqs: int, dtype: torch.dtype) -> torch.Tensor:
        """Codes (rows, J, rank + 1) of raw sample features (rows, J, 4); the last channel is 1 and carries the biases.

        Rows go through the MLP a block at a time, so its hidden layer never exists for all samples at once.
        """
        step = max(1, CODE_BLOCK_SAMPLES // max(1, features.shape[1]))
        parts = [self.geometry(fourier_features(f, pe_freqs).to(dtype)) for f in features.split(step)]
        code = torch.cat(parts)
        return torch.cat((code, torch.ones_like(code[..., :1])), dim=-1)

    def _code(self, ctx: EpipolarContext, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """This module's sample codes (rows, K*S, rank + 1); fixed over a sampling run, so memoised there."""
        features = ctx.table(height, width)[1]
        if torch.is_grad_enabled():  # recomputed in backward: the MLP's hidden layer is as wide as keys and values
            return checkpoint(self.geometry_code, features, ctx.pe_freqs, dtype, use_reentrant=False)
        key = (id(self), height, width, dtype)
        if key not in ctx._cache:
            ctx._cache[key] = self.geometry_code(features, ctx.pe_freqs, dtype).contiguous()
        return ctx._cache[key]

    def forward(self, x: torch.Tensor, ctx: EpipolarContext, backend: str | None = None) -> torch.Tensor:
        """x (c*G*N, C, h, w): c stacked copies of the context's views (c = 2 under CFG), plus epipolar attention."""
        b, channels, h, w = x.shape
        gn = ctx.poses.shape[0] * ctx.num_views
        if b % gn:
            raise ValueError(f"batch: {b} feature maps are not a whole number of copies of {gn} views")
        copies, heads, hd, inner = b // gn, self.num_heads, self.head_dim, self.num_heads * self.head_dim
        table = ctx.table(h, w)[0]
        code = self._code(ctx, h, w, x.dtype)
        xn = self.norm(x).permute(0, 2, 3, 1).reshape(copies, gn * h * w, channels)  # rows: view-major pixels
        q = F.linear(xn, self.to_q.weight.flatten(1), self.to_q.bias).mul_(hd**-0.5)
        kv = F.linear(xn, self.to_kv.weight.flatten(1), self.to_kv.bias)
        del xn
        # the key and value biases ride on the code's constant last channel
        geo = torch.cat((self.geometry_kv.weight, self.geometry_kv.bias[:, None]), dim=1).to(x.dtype)
        geo_k, geo_v = geo.view(2, heads, hd, self.rank + 1).unbind(0)
        out = epipolar_attention(
            q.view(copies, -1, heads, hd), kv.view(copies, -1, 2, heads, hd), code, geo_k, geo_v,
            self.null_key.to(x.dtype), table, backend,
        )
        del q, kv
        weight = self.to_out.weight.flatten(1)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():  # NHWC: rows are pixels
            rows = x.permute(0, 2, 3, 1).reshape(-1, channels) + self.to_out.bias
            return torch.addmm(rows, out.view(-1, inner), weight.t()).view(b, h, w, channels).permute(0, 3, 1, 2)
        residual = (x + self.to_out.bias.view(1, -1, 1, 1)).view(b, channels, h * w)
        out = out.view(b, h * w, inner).transpose(1, 2)  # (b, inner, hw): BLAS takes it transposed, no copy
        return torch.baddbmm(residual, weight.expand(b, -1, -1), out).view_as(x)


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
        geometry_rank: int = 16,
    ):
        super().__init__()
        if len(targets) != len(channels):
            raise ValueError("targets/channels: need one channel count per target block")
        check_epipolar_settings(num_ref_views, num_samples, near, far)
        if geometry_rank < 1:
            raise ValueError(f"geometry_rank: must be >= 1, got {geometry_rank}")
        pe_dim = GEOMETRY_FEATURES * (1 + 2 * pe_freqs)
        self.blocks = nn.ModuleDict(
            {
                _key(t): EpipolarAttention(
                    c, max(1, min(max_heads, c // head_dim)), min(head_dim, c), pe_dim, geometry_rank
                )
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

    def prepare(self, ctx: EpipolarContext, unet: nn.Module, height: int, width: int, dtype: torch.dtype) -> None:
        """Fill ctx's caches before a UNet call on (height, width) inputs: every sample table, and without grad
        every module's codes, so a compiled UNet finds them ready instead of tracing their construction."""
        levels = len(unet.up_blocks)
        for target in self.config.targets:
            shift = levels - 1 - int(target.split(".")[1])  # up block i works at 1/2^(levels-1-i) of the input
            h, w = -(-height // 2**shift), -(-width // 2**shift)
            ctx.table(h, w)
            if not torch.is_grad_enabled():
                self.blocks[_key(target)]._code(ctx, h, w, dtype)

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
        # checked where they are (a training batch: on the host), then copied without waiting for the device
        poses = validate_poses(poses).to(device=self.device, dtype=torch.float32, non_blocking=True)
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
