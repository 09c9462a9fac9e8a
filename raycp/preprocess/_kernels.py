"""Fused per-pixel loops of the 16 → 8-bit conversion (numba), private to :mod:`compress`.

The numpy path of :func:`raycp.preprocess.compress.compress_plane` walks a 1080×1080 plane about
ten times (divide, a sample sort, two tail selections, six in-place passes for the stretch); after
numpy's ``plane / function`` (float32) these loops walk it three times and give the same numbers:
the limits are ``np.percentile``'s (linear interpolation) exactly, and the stretch repeats
:func:`compress.to_uint8`'s float32 operations in the same order. Tests check both paths against
each other on the real site. Numba does not check bounds, so :func:`count_bins` counts the values
outside the bins (NaN, inf, a function below 1) and the caller falls back to numpy when any are.

Compiled on first use (about 3 s) and cached beside this file when the package folder is
writable (a source checkout, a venv); when it is not, each process compiles its own, since numba's
other cache location is under ``$HOME``.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit

_CACHE = os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)

#: Integer bins of the corrected values: 0 ≤ plane / function ≤ 65535 (function ≥ 1).
N_BINS = 65536


@njit(nogil=True, cache=_CACHE)
def count_bins(values, hist):  # pragma: no cover - compiled
    """Histogram of ``floor(values)`` (1-D) in 65536 integer bins; returns how many values fall
    outside ``[0, 65536)`` (not counted)."""
    top = np.float32(N_BINS)
    zero = np.float32(0.0)
    outside = 0
    for i in range(values.size):
        v = values[i]
        if v >= zero and v < top:
            hist[int(v)] += 1
        else:
            outside += 1
    return outside


@njit(nogil=True, cache=_CACHE)
def gather_bins(values, slot, sizes):  # pragma: no cover - compiled
    """The values whose integer bin has a ``slot`` ≥ 0, grouped by slot (``sizes[k]`` values each)."""
    starts = np.zeros(sizes.size + 1, dtype=np.int64)
    for k in range(sizes.size):
        starts[k + 1] = starts[k] + sizes[k]
    out = np.empty(starts[-1], dtype=np.float32)
    fill = starts[:-1].copy()
    flat = values.ravel()
    for i in range(flat.size):
        k = slot[int(flat[i])]
        if k >= 0:
            out[fill[k]] = flat[i]
            fill[k] += 1
    return out, starts


@njit(nogil=True, cache=_CACHE)
def stretch_to_uint8(values, lo, scale, out):  # pragma: no cover - compiled
    """``compress.to_uint8`` in one pass: ((v - lo) · scale) clipped to [0, 255], + 0.5, truncated."""
    flat = values.ravel()
    flat_out = out.ravel()
    zero = np.float32(0.0)
    top = np.float32(255.0)
    half = np.float32(0.5)
    for i in range(flat.size):
        w = (flat[i] - lo) * scale
        if w < zero:
            w = zero
        if w > top:
            w = top
        flat_out[i] = np.uint8(w + half)
