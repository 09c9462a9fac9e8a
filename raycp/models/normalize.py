"""Crop normalisation of the Cell Painting CNN (paper Methods, "Training cell painting models"):
per crop and per channel, as DeepProfiler's TF2 crop generator does. Training, extraction and an
imported model use this one function."""

from __future__ import annotations

NORM_EPS = 1e-6
NORMALIZATION = {
    "name": "per_crop_channel_zscore",
    "formula": "x = pixel/255; x = (x - mean_c) / max(std_c, eps), mean/std (population) over each crop's channel",
    "scale": 1 / 255,
    "eps": NORM_EPS,
    "source": "DeepProfiler 2024 TF2 crop generator (fold_channels)",
}


def normalize(x, eps: float = NORM_EPS):
    """uint8 (or float 0..255) N×C×H×W -> float32, per crop and channel ``(x/255 − mean)/std``."""
    import torch

    x = x.to(torch.float32) / 255.0
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False).clamp_min(eps)
    return (x - mean) / std
