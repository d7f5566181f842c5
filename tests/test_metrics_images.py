"""The metrics' one image normaliser: layouts, value ranges, resizing and the errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpano.metrics.images import channels_first, float_images, resize_uint8, scale_values, to_uint8


@pytest.fixture
def hwc() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 8, 16, 3), dtype=np.uint8)


def test_arrays_and_tensors_either_layout_give_the_same_unit_and_signed_images(hwc):
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    unit = float_images(hwc)
    assert unit.shape == (2, 3, 8, 16) and unit.dtype == torch.float32
    torch.testing.assert_close(unit, chw.float() / 255, rtol=0, atol=0)
    torch.testing.assert_close(float_images(chw), unit, rtol=0, atol=0)
    torch.testing.assert_close(float_images(unit), unit, rtol=0, atol=0)  # float input is taken to be in [0, 1]
    signed = float_images(hwc, "signed", dtype=torch.float64)
    assert signed.dtype == torch.float64 and signed.min() >= -1 and signed.max() <= 1
    torch.testing.assert_close(signed, float_images(unit, "signed", dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(to_uint8(unit), chw, rtol=0, atol=0)


def test_resizing_and_single_images(hwc):
    assert float_images(hwc, size=(4, 8)).shape == (2, 3, 4, 8)
    assert float_images(hwc, size=(4, 8), resize_mode="bilinear").shape == (2, 3, 4, 8)
    assert float_images(hwc[0], single=True).shape == (1, 3, 8, 16)
    small = resize_uint8(hwc, (4, 8))
    assert small.dtype == torch.uint8 and small.shape == (2, 3, 4, 8)
    assert torch.equal(resize_uint8(hwc, (8, 16)), channels_first(hwc))
    # Area averaging of 2x2 blocks, rounded back to 0..255.
    blocks = float_images(hwc).unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)) * 255
    assert (small.float() - blocks).abs().max() <= 0.5 + 1e-3


def test_bad_images_raise_naming_the_argument(hwc):
    with pytest.raises(ValueError, match="pred"):
        float_images(hwc[0], name="pred")  # a lone image only with single=True
    with pytest.raises(ValueError, match="panoramas"):
        float_images(hwc[..., :2], name="panoramas")  # no 3-channel axis
    with pytest.raises(ValueError, match="target.*\\(N, C, H, W\\)"):
        float_images(hwc, name="target", layout="nchw")  # nchw takes tensors only
    with pytest.raises(ValueError, match="images.*uint8 or float"):
        scale_values(torch.zeros(2, 3, 4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="x.*\\[0, 1\\]"):
        float_images(torch.rand(1, 3, 4, 8) * 2 - 1, name="x", check_range=True)
    with pytest.raises(ValueError, match="value_range"):
        float_images(hwc, "centred")
