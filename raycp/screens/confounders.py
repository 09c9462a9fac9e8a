"""Confounders: the C node of the paper's causal graph (Fig. 1B), acting on every image.

Moshkov et al. 2024 ("Recovering features of treatment effects"; Fig. 1B): technical variation
"includes microscopes, date and time of acquisition, technician, plate-to-plate variation
(differences in assay preparation), well-position effects (differences in humidity and
temperature)" and is recorded "in images as hidden patterns that the human eye is invariant to".
Each function here is one such pattern, applied in the order an image is formed:

stain/seeding (plate density, plate gain/offset, well position) → optics (illumination field,
focus) → camera (shot noise, read noise, 12-bit range). All draws come from named RNG streams so
a screen is reproduced exactly from its seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

#: Stream ids of ``numpy.random.SeedSequence(seed, spawn_key=(stream, ...))``.
STREAM_TREATMENTS, STREAM_LAYOUT, STREAM_PLATE, STREAM_SITE = 1, 2, 3, 4


def rng_for(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, stream, keys): the same numbers on any worker."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(stream), *map(int, keys))))


@dataclass(frozen=True)
class PlateConfounders:
    """The technical state of one plate (drawn once, shared by all its sites)."""

    plate: str
    gain: tuple[float, ...]
    offset: tuple[float, ...]
    illum: tuple[tuple[float, float, float, float, float], ...]
    edge_gain: float
    edge_density: float
    density: float
    focus: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d["illum"] = [dict(zip(("cy", "cx", "vignette", "gy", "gx"), p)) for p in self.illum]
        return d


def draw_plate(seed: int, plate_index: int, plate: str, n_channels: int, cfg) -> PlateConfounders:
    """Plate-level confounders from ``cfg`` (a :class:`raycp.screens.config.ConfounderConfig`).

    - gain/offset per channel: plate-to-plate staining and exposure differences (log-normal gain,
      normal offset in ADU);
    - illumination field per channel: vignetting with an off-centre optical axis and a linear tilt
      (the paper corrects it with one function per plate × channel, Methods "Image preprocessing");
    - well-position strength of this plate (evaporation at the edge: brighter stain, fewer cells);
    - seeding density of this plate;
    - focus offset of this plate (plate flatness / autofocus calibration): scales the sites' blur.
    """
    rng = rng_for(seed, STREAM_PLATE, plate_index)
    gain = np.exp(rng.normal(0.0, cfg.plate_gain_sd, n_channels))
    offset = rng.normal(0.0, cfg.plate_offset_sd, n_channels)
    illum = []
    for _ in range(n_channels):
        cy, cx = rng.normal(0.0, 0.25, 2)
        vignette = cfg.illumination * rng.uniform(0.5, 1.0)
        gy, gx = rng.normal(0.0, cfg.illumination / 3, 2)
        illum.append((float(cy), float(cx), float(vignette), float(gy), float(gx)))
    return PlateConfounders(
        plate=plate,
        gain=tuple(float(g) for g in gain),
        offset=tuple(float(o) for o in offset),
        illum=tuple(illum),
        edge_gain=float(cfg.edge_gain * rng.uniform(0.5, 1.0)),
        edge_density=float(cfg.edge_density * rng.uniform(0.5, 1.0)),
        density=float(np.exp(rng.normal(0.0, cfg.plate_density_sd))),
        focus=float(np.exp(rng.normal(0.0, cfg.plate_focus_sd))),
    )


def illumination_field(params: tuple[float, float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative field (≤ ~1, brightest near the optical axis) of one plate × channel."""
    cy, cx, vignette, gy, gx = params
    y = np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, shape[1], dtype=np.float32)[None, :]
    r2 = (y - cy) ** 2 + (x - cx) ** 2
    field = 1.0 - vignette * r2 / 2.0 + gy * y + gx * x
    return np.clip(field, 0.2, None).astype(np.float32)


def well_edge(row: int, col: int, n_rows: int, n_cols: int) -> float:
    """1 for the outer ring of wells, 0.5 for the next ring, 0 inside (well-position effects)."""
    d = min(row, col, n_rows - 1 - row, n_cols - 1 - col)
    return {0: 1.0, 1: 0.5}.get(d, 0.0)


def site_focus(rng: np.random.Generator, mean_sigma: float) -> float:
    """Per-site defocus as a Gaussian blur sigma (px): gamma-distributed, mean ``mean_sigma``."""
    if mean_sigma <= 0:
        return 0.0
    return float(rng.gamma(2.0, mean_sigma / 2.0))


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Defocus every channel of a C×H×W site by the same Gaussian (the whole field is out of focus)."""
    if sigma < 0.05:
        return image
    return ndi.gaussian_filter(image, sigma=(0, sigma, sigma), mode="reflect")


def camera(image: np.ndarray, rng: np.random.Generator, *, adu_per_electron: float, read_noise: float,
           bit_depth: int) -> np.ndarray:
    """Shot noise, read noise, rounding and the camera's bit range; uint16 holding ``bit_depth`` bits.

    Shot noise is Poisson in electrons (variance = signal × ``adu_per_electron`` in ADU²), drawn
    with its Gaussian approximation together with the read noise (one normal draw per pixel;
    exact enough above ~20 electrons, i.e. everywhere above the background level).
    """
    img = np.clip(image, 0.0, None).astype(np.float32, copy=False)
    var = img * np.float32(adu_per_electron) + np.float32(read_noise) ** 2
    noisy = img + np.sqrt(var) * rng.standard_normal(img.shape, dtype=np.float32)
    top = 2 ** int(bit_depth) - 1
    return np.clip(np.rint(noisy), 0, top).astype(np.uint16)


def describe(cfg) -> list[dict]:
    """Every confounder, what it does, why it is there and the paper section it mirrors."""
    causal = "Fig. 1B / 'Recovering features of treatment effects' (batch effects C)"
    return [
        {"name": "plate_gain_offset", "params": {"plate_gain_sd": cfg.plate_gain_sd, "plate_offset_sd": cfg.plate_offset_sd},
         "what": "per plate × channel: signal × exp(N(0, plate_gain_sd)) + N(0, plate_offset_sd) ADU",
         "why": "plate-to-plate staining/exposure variation: makes plate dominate raw profiles, "
                "the variation sphering on controls must remove",
         "paper": f"{causal}; Methods 'Batch correction with the sphering transform'"},
        {"name": "illumination_field", "params": {"illumination": cfg.illumination},
         "what": "per plate × channel multiplicative field: 1 − v·r²/2 + tilt (off-centre axis), v ~ U(0.5, 1)·illumination",
         "why": "uneven illumination, the reason for one illumination function per plate × channel",
         "paper": "Methods 'Image preprocessing' (illumination correction per channel-plate)"},
        {"name": "well_position", "params": {"edge_gain": cfg.edge_gain, "edge_density": cfg.edge_density},
         "what": "outer ring of wells (half on the second ring): signal × (1 + edge_gain·u), cells × (1 − edge_density·u), u ~ U(0.5, 1) per plate",
         "why": "well-position (humidity/temperature) effects, not fully modelled by controls",
         "paper": f"{causal} (well-position effects); Methods sphering ('control wells may not represent plate layout effects')"},
        {"name": "plate_density", "params": {"plate_density_sd": cfg.plate_density_sd},
         "what": "cells per site × exp(N(0, plate_density_sd)) per plate",
         "why": "seeding differences between plates confound the density readout (cytotoxic MoA)",
         "paper": causal},
        {"name": "focus", "params": {"focus_sigma": cfg.focus_sigma, "plate_focus_sd": cfg.plate_focus_sd},
         "what": "per-site Gaussian blur, sigma ~ Gamma(2, focus_sigma·f/2) px with a plate factor f ~ exp(N(0, plate_focus_sd))",
         "why": "autofocus variation changes texture features; the plate factor survives per-image intensity "
                "stretching, so plates stay distinguishable after compression",
         "paper": f"{causal} (acquisition)"},
        {"name": "camera", "params": {"adu_per_electron": cfg.adu_per_electron, "read_noise": cfg.read_noise,
                                       "bit_depth": cfg.bit_depth},
         "what": "shot noise (Poisson in electrons, Gaussian approximation) + Gaussian read noise, rounding, clipping to the bit range, uint16 TIFF",
         "why": "real sensors; the 12-bit range inside 16-bit files is what the paper's compression stretches",
         "paper": "Methods 'Image preprocessing' (16-bit TIFF, 0.05/99.95 percentile stretch)"},
    ]
