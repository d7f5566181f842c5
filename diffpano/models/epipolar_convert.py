"""EA modules saved before the rank-R geometry code (a full-rank geometry MLP) converted to the current form."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffpano.geometry.trajectories import walk
from diffpano.models.epipolar import EpipolarAdapter
from diffpano.ops.layout import fourier_features

log = logging.getLogger(__name__)
WEIGHTS = "diffusion_pytorch_model.safetensors"
LAYOUT_SPACINGS = (0.5, 1.0, 2.0)  # metres between views of the walks whose sample geometry the conversion fits


def is_full_rank(directory: Path) -> bool:
    """Whether an epipolar/ directory was saved with the full-rank geometry MLP (no geometry_rank in its config)."""
    return "geometry_rank" not in json.loads((directory / "config.json").read_text())


def load_adapter(directory: str | Path) -> EpipolarAdapter:
    """The EA modules of an epipolar/ directory, converting a full-rank one on the fly (and saying so)."""
    directory = Path(directory)
    if not is_full_rank(directory):
        return EpipolarAdapter.from_pretrained(directory)
    log.warning("epipolar: %s has a full-rank geometry MLP; converting it to rank-16 codes (save to keep)", directory)
    config = json.loads((directory / "config.json").read_text())
    adapter = EpipolarAdapter.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    adapter.load_state_dict(factorize(load_file(str(directory / WEIGHTS)), adapter))
    return adapter


def sample_features(adapter: EpipolarAdapter, height: int = 16, width: int = 32) -> torch.Tensor:
    """Raw geometry features (n, 4) of the usable samples of walks at LAYOUT_SPACINGS."""
    out = []
    for spacing in LAYOUT_SPACINGS:
        ctx = adapter.context(walk(8, spacing=spacing).unsqueeze(0))
        s = ctx.samples(height, width)
        out.append(ctx.geometry_features(s)[s.mask])
    return torch.cat(out)


@torch.no_grad()
def factorize(state: dict[str, torch.Tensor], adapter: EpipolarAdapter) -> dict[str, torch.Tensor]:
    """The adapter's state from a full-rank one: each geometry MLP's output layer split at rank R by PCA.

    The old offsets o = W2 h + b2 (2I values per sample) are approximated by mu + U c with c = U^T (o - mu), U the top
    R principal directions of o over typical sample geometry: geometry.2 becomes (U^T W2, U^T (b2 - mu)) and
    geometry_kv (U, mu). Every other weight is copied.
    """
    features = sample_features(adapter)
    new = {k: v for k, v in state.items() if ".geometry." not in k}
    for key, block in adapter.blocks.items():
        prefix = f"blocks.{key}.geometry."
        w1, b1 = state[prefix + "0.weight"].flatten(1), state[prefix + "0.bias"]
        w2, b2 = state[prefix + "2.weight"].flatten(1), state[prefix + "2.bias"]
        hidden = torch.nn.functional.silu(fourier_features(features, adapter.config.pe_freqs) @ w1.T + b1)
        offsets = hidden @ w2.T + b2
        mu = offsets.mean(0)
        centred = (offsets - mu).double()
        values, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending
        u = vectors[:, -block.rank :].flip(-1).float()  # (2I, R): the top R principal directions
        explained = (values[-block.rank :].sum() / values.sum()).item()
        log.info("epipolar: %s geometry at rank %d keeps %.1f%% of its offsets' variance", key, block.rank,
                 100 * explained)
        new.update({
            prefix + "0.weight": w1, prefix + "0.bias": b1,
            prefix + "2.weight": u.T @ w2, prefix + "2.bias": u.T @ (b2 - mu),
            f"blocks.{key}.geometry_kv.weight": u, f"blocks.{key}.geometry_kv.bias": mu,
        })
    return new
