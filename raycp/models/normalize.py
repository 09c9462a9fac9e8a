"""Crop normalisation of the Cell Painting CNN (paper Methods, "Training cell painting models"):
per crop and per channel, over uint8 crops (0..255). Training, extraction and an imported model
use these functions; a model's ``model.json`` names its preset and extraction applies that one.

Presets (``PRESETS``): the ways DeepProfiler has normalised crops over time (``crop_graph`` in
``deepprofiler/imaging/cropping.py``, commit in brackets), plus raycp's training default:

==================================  =====================================================  =============================
name                                formula, per crop and channel                          DeepProfiler
==================================  =====================================================  =============================
``per_crop_channel_max``            ``x / (max + 1e-6)``                                   to 2020-05 (beae57c)
``per_crop_channel_zscore``         ``(x/255 − mean) / max(std, 1e-6)`` (raycp training)   2020-05 .. 2021-09 (ccfc54a)
``per_crop_channel_min_over_max``   ``(x − min) / max``                                    2021-09 .. 2024-08 (66f2037):
                                                                                           Cell Painting CNN v1's era
``per_crop_channel_min_max``        ``(x − min) / (max − min + 1e-7)``                     from 2024-08 (08aa86a)
==================================  =====================================================  =============================

``x`` is the crop's pixel on 0..255, as DeepProfiler reads 8-bit images. One deviation: where
DeepProfiler divides 0 by 0 (``min_over_max`` on an all-black channel) and gives NaN, raycp gives 0.
"""

from __future__ import annotations

NORM_EPS = 1e-6
#: raycp's training normalisation, as written into every model.json it exports (kept byte for byte:
#: it enters extraction fingerprints)
NORMALIZATION = {
    "name": "per_crop_channel_zscore",
    "formula": "x = pixel/255; x = (x - mean_c) / max(std_c, eps), mean/std (population) over each crop's channel",
    "scale": 1 / 255,
    "eps": NORM_EPS,
    "source": "DeepProfiler 2024 TF2 crop generator (fold_channels)",
}
PRESETS = {
    "per_crop_channel_zscore": NORMALIZATION,
    "per_crop_channel_max": {
        "name": "per_crop_channel_max", "formula": "x / (max_c + 1e-6), x in 0..255", "eps": 1e-6,
        "source": "DeepProfiler crop_graph to 2020-05 (beae57c)"},
    "per_crop_channel_min_over_max": {
        "name": "per_crop_channel_min_over_max", "formula": "(x - min_c) / max_c, x in 0..255 (0 where max_c = 0)",
        "source": "DeepProfiler crop_graph 2021-09 (66f2037) to 2024-08: Cell Painting CNN v1 (Zenodo 7114558)"},
    "per_crop_channel_min_max": {
        "name": "per_crop_channel_min_max", "formula": "(x - min_c) / (max_c - min_c + 1e-7), x in 0..255",
        "eps": 1e-7, "source": "DeepProfiler crop_graph from 2024-08 (08aa86a)"},
}


def normalize(x, eps: float = NORM_EPS):
    """uint8 (or float 0..255) N×C×H×W -> float32, per crop and channel ``(x/255 − mean)/std``."""
    import torch

    x = x.to(torch.float32) / 255.0
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False).clamp_min(eps)
    return (x - mean) / std


def _max(x):
    import torch

    x = x.to(torch.float32)
    return x / (x.amax(dim=(2, 3), keepdim=True) + 1e-6)


def _min_over_max(x):
    import torch

    x = x.to(torch.float32)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / torch.where(hi > 0, hi, 1.0)  # max 0: the channel is all 0, and so is x - min


def _min_max(x):
    import torch

    x = x.to(torch.float32)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo + 1e-7)


_FUNCTIONS = {"per_crop_channel_zscore": normalize, "per_crop_channel_max": _max,
              "per_crop_channel_min_over_max": _min_over_max, "per_crop_channel_min_max": _min_max}


def preset_name(spec) -> str:
    """The preset of a ``model.json`` ``normalization`` entry (a dict with ``name``, a name, or
    nothing: raycp's z-score, which every model exported before presets existed used)."""
    name = spec.get("name") if isinstance(spec, dict) else spec
    return name or NORMALIZATION["name"]


def normalizer(spec):
    """The function ``uint8 N×C×H×W -> float32`` of a preset (see :func:`preset_name`).

    Raises :class:`~raycp.errors.InputError` for an unknown preset."""
    name = preset_name(spec)
    if name not in _FUNCTIONS:
        from raycp.errors import InputError

        raise InputError(f"crop normalization {name!r} unknown", fix=f"use one of {', '.join(PRESETS)}")
    return _FUNCTIONS[name]
