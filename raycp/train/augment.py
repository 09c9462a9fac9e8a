"""Training augmentations of the Cell Painting CNN (torch, on the training device).

**Augmentations** (paper Methods, "Data augmentation"; DeepProfiler ``imaging/augmentations.py``),
applied to the normalised batch on the training device, in this order: with probability 0.5 a
random square crop of side U{⌈0.8·S⌉..S} at a random position, resized back to S×S (bilinear,
half-pixel centres, as TF's ``random_crop`` + ``resize``); a horizontal flip with p 0.5 and a
rotation by k·90°, k ~ U{0..3}; per channel ``x + Δ`` with Δ ~ U(−0.1, 0.1), then a contrast
factor f ~ U(0.8, 1.2) about the channel mean (TF's ``adjust_brightness``/``adjust_contrast``).
There is no renormalisation afterwards: it would undo the brightness and contrast changes.
Random numbers come from a CPU ``torch.Generator`` seeded by ``(seed, epoch, rank, step)``, so
they do not depend on the device or on where a run was restarted.

The crops reach them normalised per crop and channel (:func:`raycp.models.normalize.normalize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raycp.train.sampling import STREAM_AUGMENT, derive_seed


@dataclass
class AugmentParams:
    """Per-sample random draws of one batch (CPU tensors)."""

    crop: object  # bool N
    boxes: object  # float N×4 (x0, y0, x1, y1) in pixels
    flip: object  # bool N
    rot: object  # int N in 0..3
    brightness: object  # float N×C
    contrast: object  # float N×C


def draw_augment(n: int, channels: int, size: int, cfg, generator) -> AugmentParams:
    """Draw a batch's augmentation parameters from ``generator`` (always in the same order)."""
    import torch

    g = generator
    crop = torch.rand(n, generator=g) < cfg.crop_prob
    lo = min(size, max(1, math.ceil(cfg.crop_min * size)))
    side = torch.randint(lo, size + 1, (n,), generator=g)
    fx, fy = torch.rand(n, generator=g), torch.rand(n, generator=g)
    x0 = torch.floor(fx * (size - side + 1)).clamp(max=size - side)
    y0 = torch.floor(fy * (size - side + 1)).clamp(max=size - side)
    boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1).to(torch.float32)
    flip = torch.rand(n, generator=g) < 0.5
    rot = torch.randint(0, 4, (n,), generator=g)
    b = cfg.brightness
    brightness = (torch.rand(n, channels, generator=g) * 2 - 1) * b
    c_lo, c_hi = cfg.contrast
    contrast = c_lo + torch.rand(n, channels, generator=g) * (c_hi - c_lo)
    if not cfg.flip:
        flip = torch.zeros_like(flip)
    if not cfg.rot90:
        rot = torch.zeros_like(rot)
    return AugmentParams(crop=crop, boxes=boxes, flip=flip, rot=rot, brightness=brightness, contrast=contrast)


def apply_augment(x, p: AugmentParams):
    """Apply :class:`AugmentParams` to a normalised float batch N×C×S×S (any device)."""
    import torch
    import torch.nn.functional as F

    dev = x.device
    n, _, h, w = x.shape
    x = x.clone()
    if bool(p.crop.any()):
        idx = torch.nonzero(p.crop, as_tuple=False).flatten()
        x[idx.to(dev)] = F.grid_sample(x[idx.to(dev)], _crop_grid(p.boxes[idx], h, w).to(dev, x.dtype),
                                       mode="bilinear", padding_mode="border", align_corners=False)
    if bool(p.flip.any()):
        f = p.flip.to(dev)
        x[f] = x[f].flip(-1)
    for k in (1, 2, 3):
        sel = p.rot == k
        if bool(sel.any()):
            s = sel.to(dev)
            x[s] = torch.rot90(x[s], k, dims=(2, 3))
    x = x + p.brightness.to(dev, x.dtype)[:, :, None, None]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * p.contrast.to(dev, x.dtype)[:, :, None, None] + mean


def _crop_grid(boxes, h: int, w: int):
    """``grid_sample`` grid resizing each box ``(x0, y0, x1, y1)`` to ``h×w``: bilinear with
    half-pixel centres, source coordinates clamped inside the box (= cropping the window, then
    ``F.interpolate(..., align_corners=False)``, i.e. TF's ``random_crop`` + ``resize``)."""
    import torch

    def axis(lo, hi, n, size):
        j = torch.arange(n, dtype=torch.float64)
        src = lo[:, None] + (j[None] + 0.5) * ((hi - lo)[:, None] / n) - 0.5
        src = torch.maximum(torch.minimum(src, hi[:, None] - 1), lo[:, None])
        return (2 * src + 1) / size - 1

    b = boxes.to(torch.float64)
    gx, gy = axis(b[:, 0], b[:, 2], w, w), axis(b[:, 1], b[:, 3], h, h)
    return torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], dim=-1).to(torch.float32)


def augment_generator(seed: int, epoch: int, rank: int, step: int):
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, STREAM_AUGMENT, epoch, rank, step))


