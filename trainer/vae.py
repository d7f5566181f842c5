"""Stage 0 for the training skeleton (trainer.skeleton): the VAE of a fresh latent model on the panoramas, or the
decoder of a base model's VAE."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffpano.pipelines.loading import save_model
from trainer import skeleton
from trainer.diffusion import make_dataset
from trainer.skeleton import Loss, Stage, Worker

SCALE_SAMPLES = 64  # panoramas whose latents set the VAE's scaling_factor (unit variance for the UNet)


class Reconstruct(nn.Module):
    """The VAE as one module for DDP: reconstruction and KL of a batch."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, mean KL per latent element) of images in [-1, 1]."""
        posterior = self.vae.encode(x).latent_dist  # no graph through an encoder frozen by decoder_only
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=x.device)
        return self.vae.decode(z).sample, posterior.kl().mean() / posterior.mean[0].numel()


def strips(x: torch.Tensor, rows: int | None, generator: torch.Generator) -> torch.Tensor:
    """Random full-width strips of `rows` rows (the longitude stays a whole circle), or x when rows is None."""
    if rows is None or rows >= x.shape[-2]:
        return x
    b, c, _, w = x.shape
    top = torch.randint(0, x.shape[-2] - rows + 1, (b,), generator=generator, device=x.device)
    index = (top[:, None] + torch.arange(rows, device=x.device)).view(b, 1, rows, 1)
    return x.gather(2, index.expand(b, c, rows, w))  # on the device, without reading `top` back


def train_vae(config: dict) -> None:
    """train_loop_per_worker of stage 0: L1 reconstruction + KL, then the scaling factor, then the export."""
    skeleton.run(config, VaeStage)


class VaeStage(Stage):
    """Stage 0: the whole VAE of a fresh latent model, or only the decoder of a base model's VAE."""

    def __init__(self, w: Worker) -> None:
        super().__init__(w)
        self.number, self.settings = 0, w.cfg.vae
        pipe = w.pipe
        for module in (pipe.unet, pipe.text_encoder, pipe.epipolar):
            module.requires_grad_(False)
        if self.settings.decoder_only:
            for module in (pipe.vae.encoder, pipe.vae.quant_conv):
                if module is not None:
                    module.requires_grad_(False)
        self.params = [p for p in pipe.vae.parameters() if p.requires_grad]
        self.model = Reconstruct(pipe.vae).train()
        self.dataset = make_dataset(w.cfg, 0, None, 1)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> Loss:
        """L1 reconstruction of random strips plus kl_weight x KL."""
        x = strips(skeleton.to_device(batch["image"], self.w), self.settings.strip_rows, generator)
        recon, kl = model(x, generator)
        l1 = F.l1_loss(recon, x)
        return Loss(l1 + self.settings.kl_weight * kl, x.shape[0], {"l1": l1.detach(), "kl": kl.detach()})

    def export(self, step: int) -> None:
        """The model directory with the trained VAE and (a whole VAE trained) its measured scaling factor."""
        pipe, export = self.w.pipe, self.w.config["export"]
        pipe.vae.eval()
        if not self.settings.decoder_only:  # an unchanged encoder keeps the scaling_factor the UNet was trained with
            pipe.vae.register_to_config(scaling_factor=latent_scale(pipe, self.dataset))
        pipe.model_name = f"{Path(self.w.config['run_root']).name}-vae@{step}"
        save_model(pipe, export)
        print(f"vae: exported {export} (scaling_factor {pipe.vae.config.scaling_factor:.4f})", flush=True)


@torch.no_grad()
def latent_scale(pipe, dataset) -> float:
    """1 / std of the latent means of up to SCALE_SAMPLES panoramas (Stable Diffusion's 0.18215, measured)."""
    images = torch.stack([dataset[i]["image"] for i in range(min(len(dataset), SCALE_SAMPLES))])
    means = torch.cat([pipe.vae.encode(chunk.to(pipe.device)).latent_dist.mean for chunk in images.split(8)])
    return float(1.0 / means.std().clamp_min(1e-6))
