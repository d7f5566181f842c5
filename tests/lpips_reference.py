"""Seeded LPIPS inputs (backbone weights by torchvision key, image pairs) and their values in two reference LPIPS.

The tests compute diffpano's LPIPS on these inputs and compare it with REFERENCE. Run as a script where torchvision,
torchmetrics and lpips are installed (there is no torchvision for the CPU build of torch 2.13 that the project uses;
`pip install torch==2.14.1 torchvision==0.29.1 torchmetrics==1.9.0 lpips` in a separate venv works), it loads the
same weights into torchmetrics' LPIPS and into the original `lpips` package and prints both, to paste below.
"""

from __future__ import annotations

import os
import zlib

import torch

SEED = 2018
SIZE = (66, 130)  # odd enough that SqueezeNet's ceil_mode pooling matters
NOISE = (0.05, 0.2, 0.6)  # one image pair per noise level

# Printed by `python tests/lpips_reference.py` (torch 2.14.1, torchvision 0.29.1, torchmetrics 1.9.0, lpips 0.1.4).
REFERENCE: dict[str, dict[str, list[float]]] = {
    "alex": {
        "torchmetrics": [0.003963551018387079, 0.03338179364800453, 0.07372742146253586],
        "lpips": [0.003963551018387079, 0.03338179364800453, 0.07372742146253586],
    },
    "vgg": {
        "torchmetrics": [0.00607218686491251, 0.04986279457807541, 0.12025458365678787],
        "lpips": [0.00607218686491251, 0.04986279457807541, 0.12025458365678787],
    },
    "squeeze": {
        "torchmetrics": [0.004876675084233284, 0.039781615138053894, 0.09562773257493973],
        "lpips": [0.004876675084233284, 0.039781615138053894, 0.09562773257493973],
    },
}


def seeded_state(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Weights He-scaled and biases small, each tensor seeded by its key, so neither order nor extra keys matter."""
    state = {}
    for key, shape in shapes.items():
        gen = torch.Generator().manual_seed(SEED + zlib.crc32(key.encode()))
        values = torch.randn(shape, generator=gen, dtype=torch.float32)
        fan_in = shape[1:].numel() if len(shape) > 1 else 0
        state[key] = values * (2 / fan_in) ** 0.5 if fan_in else values * 0.01
    return state


def write_seeded_backbone(net: str, path: str | os.PathLike) -> str:
    """A torchvision-format file of diffpano's backbone `net`, seeded, with a classifier key LPIPS must ignore."""
    from diffpano.metrics.lpips import Lpips

    shapes = {f"features.{k}": v.shape for k, v in Lpips(net).features.state_dict().items()}
    shapes["classifier.1.weight"] = torch.Size([4, 8])
    torch.save(seeded_state(shapes), path)
    return str(path)


def image_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (len(NOISE), 3, *SIZE) and the same images with more and more noise."""
    gen = torch.Generator().manual_seed(SEED)
    a = torch.rand(len(NOISE), 3, *SIZE, generator=gen)
    noise = torch.randn(a.shape, generator=gen) * torch.tensor(NOISE).view(-1, 1, 1, 1)
    return a, (a + noise).clamp(0, 1)


def _load_sliced(net_module: torch.nn.Module, features: dict[str, torch.Tensor]) -> None:
    """Load torchvision feature weights into a reference's sliced backbone (slice1.0.weight or slices.0.0.weight)."""
    state = {}
    for key in net_module.state_dict():
        parts = key.split(".")
        state[key] = next(features[".".join(parts[s:])] for s in (1, 2) if ".".join(parts[s:]) in features)
    net_module.load_state_dict(state)


def main() -> None:
    """Print REFERENCE from torchmetrics' LPIPS and the original lpips package on the seeded inputs."""
    import lpips as original
    import torchvision
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    # diffpano.metrics.lpips.BACKBONES' torchvision names, restated: importing diffpano needs diffusers, absent here
    names = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
    a, b = image_pairs()
    out: dict[str, dict[str, list[float]]] = {}
    for net, name in names.items():
        shapes = {k: v.shape for k, v in getattr(torchvision.models, name)().state_dict().items()}
        state = seeded_state(shapes)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        metrics_model = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
        _load_sliced(metrics_model.net, features)
        original_model = original.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
        _load_sliced(original_model.net, features)
        with torch.no_grad():
            out[net] = {
                "torchmetrics": metrics_model(a, b, normalize=True).flatten().tolist(),
                "lpips": original_model(a, b, normalize=True).flatten().tolist(),
            }
    print("REFERENCE: dict[str, dict[str, list[float]]] = {")
    for net, values in out.items():
        print(f'    "{net}": {{')
        print("".join(f'        "{name}": {v!r},\n' for name, v in values.items()), end="")
        print("    },")
    print("}")


if __name__ == "__main__":
    main()
