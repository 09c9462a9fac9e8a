"""Illumination correction (paper Methods, compression step 1; Singh et al. 2014 via DeepProfiler).

One function per plate × channel:

1. every site's image downscaled to 25 % (anti-aliased) and averaged over the plate's sites;
2. the mean smoothed by a median filter with a disk of radius 12 (at that scale);
3. robust minimum = 2nd percentile of the smoothed mean; values below it clipped to it;
4. function = smoothed / robust minimum (so ≥ 1), resized back to the full image size.

Correction = image / function. The plate mean is a reduction: :class:`PlateSum` adds thumbnails
(float64, they are small) and merges partial sums computed elsewhere; images are never gathered.
Image math is float32.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from raycp.errors import InputError
from raycp.io import urls


def thumbnail_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of the downscaled image (at least 1×1)."""
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def thumbnail(plane: np.ndarray, scale: float) -> np.ndarray:
    """One channel downscaled by ``scale`` with anti-aliasing (float32)."""
    from skimage.transform import resize

    return resize(plane.astype(np.float32, copy=False), thumbnail_shape(plane.shape, scale), order=1,
                  mode="reflect", anti_aliasing=True, preserve_range=True).astype(np.float32, copy=False)


def site_thumbnails(site, scale: float) -> np.ndarray:
    """``C×h×w`` float32 thumbnails of a ``C×H×W`` site (an array or a list of planes)."""
    return np.stack([thumbnail(plane, scale) for plane in site])


@dataclass
class PlateSum:
    """Running sum of thumbnails of one plate (one image size): the distributed reduction's state."""

    plate: str
    shape: tuple[int, int]
    total: np.ndarray | None = None
    count: int = 0
    sites: list[dict] = field(default_factory=list)

    def add(self, thumbs: np.ndarray, site_key: dict | None = None) -> None:
        if self.total is None:
            self.total = np.zeros(thumbs.shape, dtype=np.float64)
        self.total += thumbs
        self.count += 1
        if site_key is not None:
            self.sites.append(site_key)

    def merge(self, other: PlateSum) -> None:
        if other.count == 0:
            return
        if self.total is None:
            self.total = np.zeros_like(other.total)
        self.total += other.total
        self.count += other.count
        self.sites.extend(other.sites)

    def mean(self) -> np.ndarray:
        if not self.count:
            raise InputError(f"plate {self.plate}: no readable site to average",
                             fix="check the plate's images; every site was quarantined")
        return (self.total / self.count).astype(np.float32)

    # Transport between Ray workers and the driver: .npy bytes (never pickle).
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.total, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, plate: str, shape: tuple[int, int], count: int, data: bytes,
                   sites: list[dict]) -> PlateSum:
        return cls(plate, tuple(shape), np.load(io.BytesIO(data), allow_pickle=False), int(count), list(sites))


def illumination_function(mean_thumb: np.ndarray, full_shape: tuple[int, int], *, median_radius: int = 12,
                          robust_percentile: float = 2.0) -> np.ndarray:
    """The correction function of one channel (float32, full size, ≥ 1) from its plate mean thumbnail."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk
    from skimage.transform import resize

    smooth = mean_thumb.astype(np.float32)
    if median_radius > 0:
        smooth = ndi.median_filter(smooth, footprint=disk(median_radius), mode="reflect")
    robust_min = float(np.percentile(smooth, robust_percentile))
    if not robust_min > 0:  # black borders / masked plates: the smallest positive value instead
        positive = smooth[smooth > 0]
        robust_min = float(positive.min()) if positive.size else 1.0
    smooth = np.maximum(smooth, np.float32(robust_min)) / np.float32(robust_min)
    full = resize(smooth, tuple(full_shape), order=1, mode="reflect", anti_aliasing=False, preserve_range=True)
    return np.maximum(full.astype(np.float32, copy=False), np.float32(1.0))


def plate_functions(plate_sum: PlateSum, full_shape: tuple[int, int], *, median_radius: int = 12,
                    robust_percentile: float = 2.0) -> np.ndarray:
    """``C×H×W`` float32 functions of every channel of a plate."""
    mean = plate_sum.mean()
    return np.stack([illumination_function(m, full_shape, median_radius=median_radius,
                                           robust_percentile=robust_percentile) for m in mean])


def check_function(plane: np.ndarray, function: np.ndarray) -> None:
    """The plate's function must have the image's shape (one image size per plate)."""
    if function.shape != plane.shape:
        raise InputError(f"image of shape {plane.shape} but the plate's illumination function is {function.shape}",
                         fix="all sites of a plate must have one image size")


def correct(plane: np.ndarray, function: np.ndarray | None) -> np.ndarray:
    """``image / function`` as float32 (a float32 copy when there is no function)."""
    if function is None:
        return plane.astype(np.float32)
    check_function(plane, function)
    return np.divide(plane, function, dtype=np.float32)


def smoothed_cv(image: np.ndarray, sigma: float = 16.0) -> float:
    """Coefficient of variation (std / mean) of a Gaussian-smoothed image: the size of a gradient."""
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(image.astype(np.float32), sigma, mode="reflect")
    return float(smooth.std(dtype=np.float64) / smooth.mean(dtype=np.float64))


# -- files: <run>/illum/<plate>/<channel>.npy + plate.json ------------------------------------------

def function_url(folder: str, plate: str, channel: str) -> str:
    return urls.join(folder, plate, f"{channel}.npy")


def plate_json_url(folder: str, plate: str) -> str:
    return urls.join(folder, plate, "plate.json")


def save_plate(folder: str, plate: str, channels: list[str] | tuple[str, ...], functions: np.ndarray,
               info: dict) -> None:
    """Write each channel's function (``.npy``, float32) then ``plate.json`` (the plate's receipt)."""
    for ch, func in zip(channels, functions, strict=True):
        buf = io.BytesIO()
        np.save(buf, func.astype(np.float32, copy=False), allow_pickle=False)
        urls.atomic_write_bytes(function_url(folder, plate, ch), buf.getvalue())
    urls.atomic_write_text(plate_json_url(folder, plate), json.dumps(info, sort_keys=True))


def load_plate(folder: str, plate: str, channels: list[str] | tuple[str, ...]) -> np.ndarray:
    """``C×H×W`` float32 functions of a plate; a missing plate is an :class:`InputError`."""
    planes = []
    for ch in channels:
        url = function_url(folder, plate, ch)
        try:
            data = urls.read_bytes(url)
        except FileNotFoundError:
            raise InputError(f"{url}: no illumination function for plate {plate} channel {ch} "
                             "(every site of the plate was quarantined by the illum stage, or it did not run)",
                             fix="see illum/ledger.parquet, then re-run `raycp preprocess illum`") from None
        planes.append(np.load(io.BytesIO(data), allow_pickle=False))
    return np.stack(planes).astype(np.float32, copy=False)


class PlateFunctions:
    """The illumination functions of one plate at a time, for a worker whose sites arrive sorted
    by plate; ``folder`` None means no correction (``get`` returns None)."""

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self._key: tuple | None = None
        self._functions: np.ndarray | None = None

    def get(self, plate: str, channels: list[str] | tuple[str, ...]) -> np.ndarray | None:
        if self.folder is None:
            return None
        key = (plate, tuple(channels))
        if key != self._key:
            self._functions, self._key = None, None  # free the previous plate's before loading
            self._functions, self._key = load_plate(self.folder, plate, channels), key
        return self._functions
