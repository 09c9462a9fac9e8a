"""Treatment programs: T → Y of the paper's causal graph, as morphological transforms of real cells.

Each mechanism of action (MoA) is one program acting on the pixels of real cells (never drawing a
new shape), graded by a strength ``s`` in [0, 1] (0 = no effect). Only a fraction of the cells of a
treated well respond, and responders vary (``s_cell = s · lognormal(0, 0.3)``): the paper's
assumption 3 of weak supervision (Methods, "Weakly supervised learning": "cells might not respond
uniformly to particular treatments ... treatment labels do not have single-cell resolution").

The programs move the feature groups CellProfiler measures (paper Methods, "CellProfiler features",
Table 4: intensity, texture, shape/size, granularity, context/density), so that the paper's
treatment-effect estimate (Methods, "Measuring treatment effect") recovers their strengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from raycp.errors import ConfigError
from raycp.screens.cells import Cell

#: Spread of a responding cell's own strength around the treatment's strength (log-normal sigma).
CELL_STRENGTH_SIGMA = 0.3

ProgramFn = Callable[[Cell, float, dict, np.random.Generator, tuple[str, ...]], Cell]


@dataclass(frozen=True)
class Program:
    """A documented morphological program (the phenotype Y of one MoA)."""

    moa: str
    channels: tuple[str, ...]
    what: str
    why: str
    paper: str
    params: dict
    fn: ProgramFn = field(repr=False)
    #: probability that a responding cell at strength 1 is lost (cell death / arrest), site level.
    loss: float = 0.0

    def apply(self, cell: Cell, strength: float, rng: np.random.Generator, channels: tuple[str, ...]) -> Cell:
        if strength <= 0:
            return cell
        return self.fn(cell, float(strength), self.params, rng, channels)

    def describe(self) -> dict:
        return {"moa": self.moa, "channels": list(self.channels), "what": self.what, "why": self.why,
                "paper": self.paper, "params_at_strength_1": dict(self.params),
                "cell_loss_at_strength_1": self.loss}


# --------------------------------------------------------------------------- geometry helpers


def _pad(cell: Cell, p: int) -> Cell:
    if p <= 0:
        return cell
    return Cell(signal=np.pad(cell.signal, ((0, 0), (p, p), (p, p))),
                cell=np.pad(cell.cell, p), nucleus=np.pad(cell.nucleus, p), source=cell.source)


def _crop(cell: Cell, margin: int = 2) -> Cell:
    ys, xs = np.nonzero(cell.cell)
    y0, y1 = max(0, ys.min() - margin), min(cell.cell.shape[0], ys.max() + 1 + margin)
    x0, x1 = max(0, xs.min() - margin), min(cell.cell.shape[1], xs.max() + 1 + margin)
    return Cell(signal=np.ascontiguousarray(cell.signal[:, y0:y1, x0:x1]), cell=cell.cell[y0:y1, x0:x1].copy(),
                nucleus=cell.nucleus[y0:y1, x0:x1].copy(), source=cell.source)


def _warp_plane(plane: np.ndarray, A: np.ndarray, centre: np.ndarray, order: int) -> np.ndarray:
    """Output pixel o takes input A⁻¹(o − centre) + centre (A maps input offsets to output offsets)."""
    Ainv = np.linalg.inv(A)
    offset = centre - Ainv @ centre
    return ndi.affine_transform(plane, Ainv, offset=offset, order=order, mode="constant", cval=0.0)


def warp(cell: Cell, A: np.ndarray, centre: tuple[float, float], *, channels: list[int] | None = None,
         masks: tuple[str, ...] = ("cell", "nucleus")) -> Cell:
    """Apply the 2×2 linear map ``A`` about ``centre`` (y, x) to some channels and masks of a cell.

    The patch is padded first so that a growing cell is not cut; the result is re-cropped.
    """
    grow = float(np.linalg.svd(A, compute_uv=False).max())
    p = int(np.ceil(max(cell.shape) * max(grow - 1.0, 0.0) / 2)) + 2
    cell = _pad(cell, p)
    c = np.asarray(centre, np.float64) + p
    signal = cell.signal.copy()
    for i in (range(signal.shape[0]) if channels is None else channels):
        signal[i] = _warp_plane(cell.signal[i], A, c, order=1)
    cmask, nmask = cell.cell, cell.nucleus
    if "cell" in masks:
        cmask = _warp_plane(cell.cell.astype(np.float32), A, c, order=1) >= 0.5
    if "nucleus" in masks:
        nmask = _warp_plane(cell.nucleus.astype(np.float32), A, c, order=1) >= 0.5
    return _crop(Cell(signal=signal, cell=cmask | nmask, nucleus=nmask & (cmask | nmask), source=cell.source))


def _idx(channels: tuple[str, ...], name: str) -> int:
    try:
        return channels.index(name)
    except ValueError:
        raise ConfigError(f"a treatment program needs the {name} channel but the screen has {list(channels)}",
                          fix="build screens with the paper's channels DNA, ER, RNA, AGP, Mito") from None


def _scale_nucleus(cell: Cell, k: float, dna: int, gain: float = 0.0) -> Cell:
    out = warp(cell, np.eye(2) * k, cell.nucleus_centre, channels=[dna], masks=("nucleus",))
    if gain:
        sig = out.signal.copy()
        sig[dna] = np.where(out.nucleus, sig[dna] * (1.0 + gain), sig[dna])
        out = Cell(signal=sig, cell=out.cell, nucleus=out.nucleus, source=out.source)
    if out.nucleus.sum() < 4:  # a nucleus never vanishes: keep the original one
        return cell
    grown = out.cell | ndi.binary_dilation(out.nucleus, iterations=2)
    return Cell(signal=out.signal, cell=grown, nucleus=out.nucleus, source=out.source)


# --------------------------------------------------------------------------- the programs


def _nuclear_size(cell: Cell, s: float, p: dict, rng: np.random.Generator, ch: tuple[str, ...]) -> Cell:
    return _scale_nucleus(cell, 1.0 + (p["scale"] - 1.0) * s, _idx(ch, "DNA"))


def _mito_texture(cell: Cell, s: float, p: dict, rng: np.random.Generator, ch: tuple[str, ...]) -> Cell:
    m = _idx(ch, "Mito")
    sig = cell.signal.copy()
    plane = sig[m]
    detail = plane - ndi.gaussian_filter(plane, p["texture_sigma"])
    sig[m] = plane * (1.0 + p["gain"] * s) + p["texture"] * s * detail
    return Cell(signal=sig, cell=cell.cell, nucleus=cell.nucleus, source=cell.source)


def _er_spread(cell: Cell, s: float, p: dict, rng: np.random.Generator, ch: tuple[str, ...]) -> Cell:
    e = _idx(ch, "ER")
    k = 1.0 + (p["spread"] - 1.0) * s
    out = warp(cell, np.eye(2) * k, cell.nucleus_centre, channels=[e], masks=())
    sig = out.signal.copy()
    sig[e] *= 1.0 + p["gain"] * s
    return Cell(signal=sig, cell=out.cell, nucleus=out.nucleus, source=out.source)


def _actin_elongation(cell: Cell, s: float, p: dict, rng: np.random.Generator, ch: tuple[str, ...]) -> Cell:
    a = _idx(ch, "AGP")
    along = 1.0 + (p["elongation"] - 1.0) * s
    theta = rng.uniform(0, np.pi)
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    A = R @ np.diag([along, 1.0 / np.sqrt(along)]) @ R.T
    ys, xs = np.nonzero(cell.cell)
    out = warp(cell, A, (float(ys.mean()), float(xs.mean())))
    if out.nucleus.sum() < 4:
        return cell
    sig = out.signal.copy()
    sig[a] *= 1.0 + p["gain"] * s
    return Cell(signal=sig, cell=out.cell, nucleus=out.nucleus, source=out.source)


def _rna_puncta(cell: Cell, s: float, p: dict, rng: np.random.Generator, ch: tuple[str, ...]) -> Cell:
    r = _idx(ch, "RNA")
    sig = cell.signal.copy()
    plane = sig[r]
    spots = ndi.white_tophat(plane, size=p["spot_size"])
    sig[r] = plane + p["gain"] * s * spots
    return Cell(signal=sig, cell=cell.cell, nucleus=cell.nucleus, source=cell.source)


def _cytotoxic(cell: Cell, s: float, p: dict, rng: np.random.Generator, ch: tuple[str, ...]) -> Cell:
    return _scale_nucleus(cell, 1.0 - (1.0 - p["condense"]) * s, _idx(ch, "DNA"), gain=p["dna_gain"] * s)


_TABLE4 = "Methods, 'CellProfiler features' (Table 4 feature groups)"

PROGRAMS: dict[str, Program] = {
    "nuclear_enlargement": Program(
        moa="nuclear_enlargement", channels=("DNA",),
        what="the nucleus (DNA signal and nucleus mask) is scaled about its centre by 1 + (scale − 1)·s",
        why="nuclear size/shape is the classic readout of cell-cycle arrest and polyploidy; a shape program",
        paper=f"{_TABLE4}: Nuclei AreaShape; Methods 'Training cell painting models' (treatments that impact size)",
        params={"scale": 1.45}, fn=_nuclear_size),
    "mitochondrial_stress": Program(
        moa="mitochondrial_stress", channels=("Mito",),
        what="Mito signal × (1 + gain·s) plus texture·s × its own high-pass detail (sharper, more punctate network)",
        why="an intensity + texture program on one organelle channel, invisible to nucleus-only readouts",
        paper=f"{_TABLE4}: Intensity and Texture of the Mito channel",
        params={"gain": 0.7, "texture": 1.5, "texture_sigma": 1.5}, fn=_mito_texture),
    "er_stress": Program(
        moa="er_stress", channels=("ER",),
        what="the ER signal is stretched radially from the nucleus centre by 1 + (spread − 1)·s and × (1 + gain·s)",
        why="a spatial-distribution program: perinuclear ER spreads towards the cell periphery",
        paper=f"{_TABLE4}: RadialDistribution and Intensity of the ER channel",
        params={"spread": 1.6, "gain": 0.25}, fn=_er_spread),
    "actin_remodeling": Program(
        moa="actin_remodeling", channels=("AGP", "DNA", "ER", "RNA", "Mito"),
        what="the whole cell is stretched along a random axis by 1 + (elongation − 1)·s (1/√ across) and AGP × (1 + gain·s)",
        why="a cell-shape program (cytoskeleton) that moves every channel together",
        paper=f"{_TABLE4}: Cells AreaShape (eccentricity) and AGP Intensity",
        params={"elongation": 1.7, "gain": 0.35}, fn=_actin_elongation),
    "rna_granules": Program(
        moa="rna_granules", channels=("RNA",),
        what="the RNA signal's own bright spots (white top-hat, size spot_size) are amplified by 1 + gain·s",
        why="a granularity program acting on real nucleoli/granules, not on cell shape",
        paper=f"{_TABLE4}: Granularity and Texture of the RNA channel",
        params={"gain": 6.0, "spot_size": 5}, fn=_rna_puncta),
    "cytotoxic": Program(
        moa="cytotoxic", channels=("DNA",),
        what="a responding cell is lost with probability loss·s; survivors condense their nucleus "
             "(scale 1 − (1 − condense)·s, DNA × (1 + dna_gain·s))",
        why="a population program: cell density (context) falls, as with toxic compounds",
        paper=f"{_TABLE4}: Neighbors/Count (context); Nuclei Intensity and AreaShape",
        params={"condense": 0.7, "dna_gain": 0.8}, fn=_cytotoxic, loss=0.7),
}

MOAS: tuple[str, ...] = tuple(PROGRAMS)


def check_moas(moas: list[str] | tuple[str, ...]) -> list[str]:
    unknown = [m for m in moas if m not in PROGRAMS]
    if unknown:
        raise ConfigError(f"unknown MoA program(s) {', '.join(unknown)}",
                          fix=f"choose from {', '.join(MOAS)}")
    return list(moas)


def cell_strength(strength: float, rng: np.random.Generator) -> float:
    """A responding cell's own strength: the treatment's, spread log-normally (heterogeneity)."""
    if strength <= 0:
        return 0.0
    return float(strength * rng.lognormal(0.0, CELL_STRENGTH_SIGMA))


def apply_treatment(cell: Cell, moas: list[str] | tuple[str, ...], strength: float, rng: np.random.Generator,
                    channels: tuple[str, ...]) -> Cell:
    """Every program of a treatment's MoAs, in order, at one cell's strength."""
    for moa in moas:
        cell = PROGRAMS[moa].apply(cell, strength, rng, channels)
    return cell


def loss_probability(moas: list[str] | tuple[str, ...], strength: float) -> float:
    """Probability that a responding cell is lost (the density programs), capped at 0.95."""
    keep = 1.0
    for moa in moas:
        keep *= 1.0 - min(PROGRAMS[moa].loss * strength, 0.95)
    return 1.0 - keep
