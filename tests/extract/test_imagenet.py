"""The paper's ImageNet baseline: each channel alone through an ImageNet EfficientNet -> 5 × 672."""

from __future__ import annotations

import numpy as np
import tifffile
import torch

from raycp.extract.imagenet import ImageNetBaseline, imagenet_input


def real_crops(site_5ch, n=4) -> torch.Tensor:
    """n 128×128 windows of the real 5-channel site, stretched to uint8."""
    chans = [tifffile.imread(site_5ch / "images" / "orig" / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff") for c in (5, 2, 6, 3, 4)]
    site = np.stack(chans).astype(np.float32)
    lo, hi = np.percentile(site, [0.05, 99.95], axis=(1, 2), keepdims=True)
    site = (np.clip((site - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return torch.from_numpy(np.stack([site[:, 300 + 128 * i: 428 + 128 * i, 400:528] for i in range(n)]))


def test_imagenet_input_is_minus_one_to_one_rgb_at_224():
    x = imagenet_input(torch.tensor([[[0, 10], [20, 255]]], dtype=torch.uint8))
    assert x.shape == (1, 3, 224, 224)
    assert x.min() == -1.0 and x.max() == 1.0 and torch.equal(x[:, 0], x[:, 2])


def test_baseline_gives_3360_features_per_cell(site_5ch, lite0_weights):
    model = ImageNetBaseline.from_weights(lite0_weights, arch="efficientnet_lite0")
    crops = real_crops(site_5ch)
    with torch.inference_mode():
        feats = model(crops)
    assert feats.shape == (4, 3360) and torch.isfinite(feats).all()
    # channel blocks are the single-channel passes, in channel order
    with torch.inference_mode():
        mito = model.features(imagenet_input(crops[:, 4]))
    torch.testing.assert_close(feats[:, 4 * 672:], mito)
