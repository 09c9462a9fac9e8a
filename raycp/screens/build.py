"""Compose the screen's sites (pure numpy), run that on Ray tasks, and write every output.

Image formation of one site, in order (the O node of the paper's Fig. 1B):

1. real background patches of the source site, tiled with random rotations/flips;
2. real cells (random rotation/flip), each responding to its well's treatment with the treatment's
   responding fraction and its own strength (:mod:`raycp.screens.programs`), placed without
   overlap with their nucleus inside the field; cytotoxic programs remove responders;
3. stain: signal × plate gain × well-position gain, + the background level;
4. optics: × the plate's illumination field of the channel, then the site's defocus blur;
5. camera: + plate offset, shot noise, read noise, 12-bit range, uint16
   (:mod:`raycp.screens.confounders`).

Every random draw comes from ``SeedSequence(seed, spawn_key=(stream, plate, row, col, site))``, so
any site is reproduced bit for bit on any worker, alone or in any batch.

Outputs (``<out>`` is any fsspec URL)::

    <out>/images/<plate>/<well>_s<site>_<channel>.tiff   16-bit TIFF holding 12-bit data
    <out>/index/sites.parquet                            the raycp index (+ Metadata_MoA, _Strength ...)
    <out>/truth/treatments.parquet                       treatment → MoA, strength, class, responding fraction
    <out>/truth/nuclei.parquet                           true nucleus centres (Nuclei_Location_Center_X/Y) per site
    <out>/truth/sites.parquet                            per-site cells placed/lost, focus, well position
    <out>/truth/plates.parquet                           per-plate confounder draws
    <out>/manifest.json                                  every program and confounder, why, paper section
    <out>/ledger.parquet, ledger.json, _SUCCESS
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from raycp.errors import ConfigError, RaycpError
from raycp.io import urls
from raycp.io.index import IS_CONTROL, PLATE, SITE, TREATMENT, WELL, ScreenIndex, url_col, validate, write_index
from raycp.ledger import Ledger
from raycp.screens import confounders as conf
from raycp.screens import layout as lay
from raycp.screens import programs as prog
from raycp.screens.cells import Cell, CellLibrary, dihedral, load_library
from raycp.screens.config import ScreenConfig

NUCLEUS_X, NUCLEUS_Y = "Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"
INDEX_EXTRA = (lay.MOA, lay.STRENGTH, lay.STRENGTH_CLASS)
#: Placement attempts per cell before it is counted as not placed (crowded field).
PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class ScreenPlan:
    """Everything decided before any pixel: treatments, plate maps, sites, plate confounders."""

    config: ScreenConfig
    treatments: pd.DataFrame
    plate_map: pd.DataFrame
    sites: pd.DataFrame
    plates: dict[str, conf.PlateConfounders]


def plan_screen(cfg: ScreenConfig, *, source: str = "config") -> ScreenPlan:
    treatments = lay.design_treatments(cfg.treatments, perturbation=cfg.layout.perturbation, seed=cfg.seed)
    plate_map = lay.design_plates(treatments, cfg.layout, seed=cfg.seed, source=source)
    sites = lay.sites_table(plate_map, cfg.layout.sites_per_well)
    names = lay.plate_names(cfg.layout.plate_prefix, cfg.layout.plates)
    plates = {p: conf.draw_plate(cfg.seed, i, p, len(cfg.channels), cfg.confounders) for i, p in enumerate(names)}
    sites["plate_index"] = sites[PLATE].map({p: i for i, p in enumerate(names)})
    return ScreenPlan(cfg, treatments, plate_map, sites, plates)


# --------------------------------------------------------------------------- pure composition


@functools.lru_cache(maxsize=64)
def _field(params: tuple, size: int) -> np.ndarray:
    f = conf.illumination_field(params, (size, size))
    f.setflags(write=False)
    return f


def tile_background(patches: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A C×size×size canvas of real background patches, each randomly rotated/flipped."""
    n, C, p, _ = patches.shape
    k = -(-size // p)
    out = np.empty((C, k * p, k * p), np.float32)
    idx = rng.integers(n, size=(k, k))
    rot = rng.integers(8, size=(k, k))
    for i in range(k):
        for j in range(k):
            tile = np.rot90(patches[idx[i, j]], rot[i, j] % 4, axes=(1, 2))
            if rot[i, j] >= 4:
                tile = tile[:, :, ::-1]
            out[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = tile
    return out[:, :size, :size]


def _place(cell: Cell, occupancy: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """Top-left (y, x) where the cell overlaps no placed cell and its nucleus lies inside the field."""
    H, W = occupancy.shape
    h, w = cell.shape
    ny, nx = np.nonzero(cell.nucleus)
    ylo, yhi = 2 - int(ny.min()), H - 2 - int(ny.max()) - 1
    xlo, xhi = 2 - int(nx.min()), W - 2 - int(nx.max()) - 1
    if yhi < ylo or xhi < xlo:
        return None
    for _ in range(PLACEMENT_TRIES):
        y0 = int(rng.integers(ylo, yhi + 1))
        x0 = int(rng.integers(xlo, xhi + 1))
        sy0, sx0 = max(0, y0), max(0, x0)
        sy1, sx1 = min(H, y0 + h), min(W, x0 + w)
        part = cell.cell[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
        if not (occupancy[sy0:sy1, sx0:sx1] & part).any():
            return y0, x0
    return None


def _paste(canvas: np.ndarray, occupancy: np.ndarray, cell: Cell, y0: int, x0: int) -> None:
    """Composite the real cell pixels over the canvas; the 1-px ring outside the mask is blended 50 %."""
    H, W = occupancy.shape
    h, w = cell.shape
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(H, y0 + h), min(W, x0 + w)
    py, px = slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0)
    ring = ndi.binary_dilation(cell.cell) & ~cell.cell
    alpha = (cell.cell.astype(np.float32) + 0.5 * ring)[py, px]
    region = canvas[:, sy0:sy1, sx0:sx1]
    region *= 1.0 - alpha
    region += alpha * cell.signal[:, py, px]
    occupancy[sy0:sy1, sx0:sx1] |= cell.cell[py, px]


@dataclass(frozen=True)
class SiteResult:
    image: np.ndarray        # C×H×W uint16
    nuclei: list[dict]       # true nucleus centres and per-cell truth
    info: dict               # per-site truth (cells placed/lost, focus ...)


def compose_site(spec: dict, library: CellLibrary, plate: conf.PlateConfounders, cfg: ScreenConfig) -> SiteResult:
    """Make one site's pixels and truth (pure numpy; depends only on the seed and ``spec``).

    ``spec``: a row of :attr:`ScreenPlan.sites` (plate, plate_index, well, row, col, site,
    treatment, MoA, strength, responding fraction, edge).
    """
    size, C = cfg.image.size, len(cfg.channels)
    channels = tuple(cfg.channels)
    rng = conf.rng_for(cfg.seed, conf.STREAM_SITE, spec["plate_index"], spec["row"], spec["col"], spec[SITE])
    canvas = tile_background(library.background, rng, size)
    occupancy = np.zeros((size, size), bool)
    moa = spec.get(lay.MOA)
    moas = tuple(m for m in moa.split("|") if m) if isinstance(moa, str) else ()
    strength = float(spec.get(lay.STRENGTH) or 0.0) if moas else 0.0
    fraction = float(spec.get(lay.RESPONDING) or 0.0)
    edge = float(spec["edge"])
    mean_cells = cfg.image.cells_per_site * plate.density * (1 - plate.edge_density * edge)
    n_try = int(rng.poisson(mean_cells))
    nuclei, lost, unplaced = [], 0, 0
    for _ in range(n_try):
        src = int(rng.integers(len(library.cells)))
        turn = int(rng.integers(8))
        cell = dihedral(library.cells[src], turn)
        responder = strength > 0 and bool(rng.random() < fraction)
        s_cell = prog.cell_strength(strength, rng) if responder else 0.0
        if responder:
            if rng.random() < prog.loss_probability(moas, s_cell):
                lost += 1
                continue
            cell = prog.apply_treatment(cell, moas, s_cell, rng, channels)
        where = _place(cell, occupancy, rng)
        if where is None:
            unplaced += 1
            continue
        y0, x0 = where
        _paste(canvas, occupancy, cell, y0, x0)
        cy, cx = cell.nucleus_centre
        nuclei.append({NUCLEUS_X: round(x0 + cx, 3), NUCLEUS_Y: round(y0 + cy, 3),
                       "nucleus_area": int(cell.nucleus.sum()), "cell_area": int(cell.cell.sum()),
                       "responder": responder, "cell_strength": round(s_cell, 4),
                       "source_cell": cell.source, "orientation": turn})
    # stain: plate gain × well position, on the signal; + background level
    gain = np.asarray(plate.gain, np.float32) * (1.0 + plate.edge_gain * edge)
    img = canvas * gain[:, None, None] + library.base[:, None, None]
    # optics: illumination field per plate × channel, then defocus
    for c in range(C):
        img[c] *= _field(plate.illum[c], size)
    sigma = conf.site_focus(rng, cfg.confounders.focus_sigma * plate.focus)
    img = conf.blur(img, sigma)
    # camera: offset, shot + read noise, bit range
    img += np.asarray(plate.offset, np.float32)[:, None, None]
    cc = cfg.confounders
    image = conf.camera(img, rng, adu_per_electron=cc.adu_per_electron, read_noise=cc.read_noise,
                        bit_depth=cc.bit_depth)
    info = {"n_cells": len(nuclei), "n_lost": lost, "n_unplaced": unplaced,
            "n_responders": int(sum(n["responder"] for n in nuclei)),
            "focus_sigma": round(sigma, 4),
            "saturated_fraction": round(float((image >= 2 ** cc.bit_depth - 1).mean()), 6)}
    return SiteResult(image=image, nuclei=nuclei, info=info)


def encode_tiff(plane: np.ndarray, compression: str = "zlib") -> bytes:
    """One 16-bit grey TIFF page (deterministic bytes: no timestamp, no description)."""
    import tifffile

    buf = io.BytesIO()
    kwargs: dict = {"compression": None}
    if compression == "zlib":  # Deflate level 1: 3× faster than the default level, ~same size on noisy data
        kwargs = {"compression": "zlib", "compressionargs": {"level": 1}}
    elif compression == "lzw":
        kwargs = {"compression": "lzw"}
    tifffile.imwrite(buf, plane, photometric="minisblack", metadata=None, software=False, **kwargs)
    return buf.getvalue()


def image_url(output: str, plate: str, well: str, site: int, channel: str) -> str:
    return urls.join(output, "images", plate, f"{well}_s{int(site)}_{channel}.tiff")


NUCLEUS_COLUMNS = ("cell", NUCLEUS_X, NUCLEUS_Y, "nucleus_area", "cell_area", "responder", "cell_strength",
                   "source_cell", "orientation")


def render_sites(specs: list[dict], library: CellLibrary, plates: dict[str, conf.PlateConfounders],
                 cfg: ScreenConfig, output: str) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Compose and write a batch of sites; return only small columnar tables (sites, nuclei) and
    the CPU seconds the batch took."""
    cpu = time.process_time()
    site_rows, nucleus_rows = [], []
    for spec in specs:
        res = compose_site(spec, library, plates[spec[PLATE]], cfg)
        key = {PLATE: spec[PLATE], WELL: spec[WELL], SITE: int(spec[SITE])}
        row = dict(key)
        for c, ch in enumerate(cfg.channels):
            url = image_url(output, spec[PLATE], spec[WELL], spec[SITE], ch)
            urls.atomic_write_bytes(url, encode_tiff(res.image[c], cfg.image.compression))
            row[url_col(ch)] = url
        row.update(res.info)
        site_rows.append(row)
        for k, n in enumerate(res.nuclei):
            nucleus_rows.append({**key, "cell": k + 1, **n})
    nuclei = pd.DataFrame(nucleus_rows, columns=[PLATE, WELL, SITE, *NUCLEUS_COLUMNS])
    return pd.DataFrame(site_rows), nuclei, time.process_time() - cpu


# --------------------------------------------------------------------------- the Ray adapter


def _render_task(specs, library, plates, cfg, output):  # runs in a Ray worker
    return render_sites(specs, library, plates, cfg, output)


def _run_ray(batches: list[list[dict]], library: CellLibrary, plan: ScreenPlan, output: str,
             progress: Callable[[int], None] | None) -> list[tuple[pd.DataFrame, pd.DataFrame, float]]:
    """One Ray task per batch of sites; at most 2 × CPUs tasks in flight (flat driver memory)."""
    from raycp import runtime

    ray = runtime.connection()
    remote = ray.remote(num_cpus=1, max_retries=2)(_render_task)
    lib_ref = ray.put(library)
    plates_ref = ray.put(plan.plates)
    cfg = plan.config
    max_in_flight = max(2, int(2 * runtime.cluster_cpus()))
    results: dict[int, tuple[pd.DataFrame, pd.DataFrame, float]] = {}
    pending: dict = {}

    def collect(done) -> None:
        for ref in done:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # show the user's one-line error, not Ray's
                if isinstance(exc.cause, RaycpError):
                    raise exc.cause from None
                raise
            if progress:
                progress(len(batches[i]))

    for i, batch in enumerate(batches):
        while len(pending) >= max_in_flight:
            done, _ = ray.wait(list(pending), num_returns=1)
            collect(done)
        pending[remote.remote(batch, lib_ref, plates_ref, cfg, output)] = i
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        collect(done)
    return [results[i] for i in range(len(batches))]


# --------------------------------------------------------------------------- the whole build


@dataclass(frozen=True)
class BuildResult:
    output: str
    index: ScreenIndex
    treatments: pd.DataFrame
    nuclei: pd.DataFrame
    sites: pd.DataFrame
    manifest: dict
    seconds: float            # wall time of the whole build
    task_cpu_seconds: float   # CPU time spent composing and writing sites, summed over tasks


def _parquet(frame: pd.DataFrame, url: str) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    urls.atomic_write_bytes(url, buf.getvalue())


def _absolute(output: str) -> str:
    if urls.protocol_of(output) == "file" and "://" not in output:
        return os.path.abspath(output)
    return output.rstrip("/")


def build_screen(cfg: ScreenConfig, output: str, *, engine: str = "ray", source: str = "config",
                 progress: Callable[[int], None] | None = None,
                 on_plan: Callable[[ScreenPlan], None] | None = None) -> BuildResult:
    """Build a labelled screen into ``output`` (any fsspec URL).

    Checks cheap things first (plate map fits, output writable, source has usable cells), then
    renders sites in batches of ``cfg.batch_sites``: on Ray tasks (``engine="ray"``) or in this
    process (``engine="local"``, for debugging and tiny screens).
    """
    if engine not in ("ray", "local"):
        raise ConfigError(f"engine {engine!r} is unknown", fix="use ray or local")
    start = time.perf_counter()
    output = _absolute(output)
    plan = plan_screen(cfg, source=source)
    urls.ensure_writable(output)
    library = load_library(cfg.source.folders, cfg.source.channel_map, tuple(cfg.channels),
                           binning=cfg.source.binning, segmentation=cfg.source.segmentation,
                           cell_p99_adu=cfg.source.cell_p99_adu)
    if on_plan:
        on_plan(plan)
    spec_cols = [PLATE, "plate_index", WELL, "row", "col", SITE, TREATMENT, lay.MOA, lay.STRENGTH,
                 lay.RESPONDING, "edge"]
    specs = plan.sites[spec_cols].to_dict("records")
    batches = [specs[i:i + cfg.batch_sites] for i in range(0, len(specs), cfg.batch_sites)]
    if engine == "ray":
        parts = _run_ray(batches, library, plan, output, progress)
    else:
        parts = []
        for batch in batches:
            parts.append(render_sites(batch, library, plan.plates, cfg, output))
            if progress:
                progress(len(batch))
    rendered = pd.concat([p[0] for p in parts], ignore_index=True)
    nuclei = pd.concat([p[1] for p in parts], ignore_index=True)
    return _write_outputs(plan, library, output, rendered, nuclei, start, sum(p[2] for p in parts))


def _write_outputs(plan: ScreenPlan, library: CellLibrary, output: str, rendered: pd.DataFrame,
                   nuclei: pd.DataFrame, start: float, task_cpu: float) -> BuildResult:
    cfg = plan.config
    key = [PLATE, WELL, SITE]
    sites = plan.sites.merge(rendered, on=key, how="left", validate="one_to_one")
    index_cols = [*key, *[url_col(c) for c in cfg.channels], TREATMENT, IS_CONTROL, *INDEX_EXTRA]
    index = validate(sites[index_cols], cfg.channels, source=urls.join(output, "index", "sites.parquet"))
    write_index(index, urls.join(output, "index", "sites.parquet"))
    truth_sites = sites[[*key, TREATMENT, "row", "col", "edge", "n_cells", "n_lost", "n_unplaced",
                         "n_responders", "focus_sigma", "saturated_fraction"]]
    _parquet(truth_sites, urls.join(output, "truth", "sites.parquet"))
    _parquet(nuclei, urls.join(output, "truth", "nuclei.parquet"))
    n_wells = plan.plate_map.groupby(TREATMENT).size().rename("n_wells")
    treatments = plan.treatments.merge(n_wells, left_on=TREATMENT, right_index=True, how="left")
    _parquet(treatments, urls.join(output, "truth", "treatments.parquet"))
    _parquet(pd.DataFrame([p.as_dict() for p in plan.plates.values()]).assign(
        gain=lambda d: d["gain"].map(list), offset=lambda d: d["offset"].map(list),
        illum=lambda d: d["illum"].map(json.dumps)), urls.join(output, "truth", "plates.parquet"))
    manifest = make_manifest(plan, library, index, nuclei)
    urls.atomic_write_text(urls.join(output, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=False))
    ledger = Ledger("screen")
    for r in rendered[key].to_dict("records"):
        ledger.processed(r)
    ledger.write(output)
    urls.atomic_write_text(urls.join(output, "_SUCCESS"), "")
    return BuildResult(output=output, index=index, treatments=treatments, nuclei=nuclei, sites=truth_sites,
                       manifest=manifest, seconds=time.perf_counter() - start, task_cpu_seconds=task_cpu)


# --------------------------------------------------------------------------- the manifest


def make_manifest(plan: ScreenPlan, library: CellLibrary, index: ScreenIndex, nuclei: pd.DataFrame) -> dict:
    """The JSON manifest: what was built, every program and confounder, why, and the paper section."""
    from raycp import __version__

    cfg = plan.config
    t = plan.treatments
    treated = t[~t[IS_CONTROL]]
    used_moas = sorted({m for v in treated[lay.MOA] for m in v.split("|")})
    tr = cfg.treatments
    return {
        "name": cfg.name,
        "built_by": f"raycp {__version__} `raycp screen build`",
        "seed": cfg.seed,
        "causal_graph": "treatment T → phenotype Y → image O ← confounders C "
                        "(Moshkov et al. 2024, Fig. 1B, 'Recovering features of treatment effects')",
        "channels": list(cfg.channels),
        "outputs": {
            "images": "images/<plate>/<well>_s<site>_<channel>.tiff (16-bit TIFF holding "
                      f"{cfg.confounders.bit_depth}-bit data)",
            "index": "index/sites.parquet (raycp index + Metadata_MoA ('|'-separated), Metadata_Strength, "
                     "Metadata_StrengthClass)",
            "treatments": "truth/treatments.parquet (treatment → MoA, strength, class, responding fraction, wells)",
            "nuclei": "truth/nuclei.parquet (true nucleus centres Nuclei_Location_Center_X/Y per site, "
                      "responder flag, source cell)",
            "sites": "truth/sites.parquet (cells placed/lost/unplaced, focus sigma, well position per site)",
            "plates": "truth/plates.parquet (confounder draws per plate)",
        },
        "counts": {
            "plates": len(plan.plates), "wells": int(len(plan.plate_map)), "sites": int(len(index)),
            "treatments": int(len(treated)), "control": str(t.loc[t[IS_CONTROL], TREATMENT].iloc[0]),
            "control_wells": int(plan.plate_map[IS_CONTROL].sum()),
            "nuclei": int(len(nuclei)),
            "strength_classes": {k: int(v) for k, v in treated[lay.STRENGTH_CLASS].value_counts().sort_index().items()},
            "moas": {m: int(sum(m in v.split("|") for v in treated[lay.MOA])) for m in used_moas},
            "multi_moa_treatments": int(treated[lay.MOA].str.contains("|", regex=False).sum()),
        },
        "cells": {
            **library.summary(),
            "rule": "real cells only: every cell is a real cell of a real 5-channel site, cut with the shipped "
                    "CellProfiler outlines (or Otsu + watershed when a site has none), binned, rotated/flipped "
                    "(8 ways) when placed. 3-channel sources (JUMP, NF1, BBBC022) are not used: two of five "
                    "channels would have to be invented.",
            "background": "real cell-free background patches of the same sites, tiled with rotations/flips",
            "density": f"Poisson(cells_per_site = {cfg.image.cells_per_site}) per control site, no overlap, "
                       "nuclei fully inside the field",
            "paper": "Methods 'Training cell painting models' (128-px crops centred on nuclei, flips and "
                     "90-degree rotations keep biology)",
        },
        "treatments": {
            "programs": {m: prog.PROGRAMS[m].describe() for m in used_moas},
            "strength_classes": {
                c: {"range": list(tr.strength_ranges[c]), "why": why}
                for c, why in (
                    ("strong", "~20% with a phenotype visible by eye: the paper's strongest subset"),
                    ("median", "clear effects on average, diluted by non-responders"),
                    ("weak", "near the detection limit after batch correction"),
                    ("null", "annotated with an MoA but no phenotype: the paper's weakest subset, "
                             "WSL assumption 2"))},
            "responding_fraction": {"range": list(tr.responding_fraction),
                                    "cell_strength": f"s · lognormal(0, {prog.CELL_STRENGTH_SIGMA})",
                                    "paper": "Methods 'Weakly supervised learning', assumption 3 (cells do not "
                                             "respond uniformly; labels lack single-cell resolution)"},
            "multi_moa": f"{tr.multi_moa_fraction:.0%} of treatments act through two MoAs ('|'-separated, as in "
                         "the paper's MoA tables); both programs act at the treatment's strength",
            "paper": "Fig. 3 / Methods 'Measuring treatment effect' (weak/median/strong 20% subsets)",
        },
        "confounders": {
            "list": conf.describe(cfg.confounders),
            "per_plate": [p.as_dict() for p in plan.plates.values()],
            "strength_rationale": "plate gain differences (~exp(N(0, 0.2)) per channel) exceed most treatment "
                                  "effects, so plate dominates raw profiles; they are shared by all wells of a "
                                  "plate and are linear per channel, so normalising/sphering on the plate's "
                                  "controls removes most of them (Methods 'Batch correction with the sphering "
                                  "transform')",
        },
        "layout": {
            "plate_format": cfg.layout.wells, "plates": list(plan.plates), "replicates": cfg.layout.replicates,
            "controls_per_plate": cfg.layout.controls_per_plate, "sites_per_well": cfg.layout.sites_per_well,
            "rule": "replicate r of treatment i on plate (i + r) mod plates; well positions shuffled per plate "
                    "from the seed; controls on every plate",
            "paper": "Methods 'Datasets' (5 replicate wells per compound in BBBC022/BBBC036; DMSO/EMPTY controls "
                     "on every plate)",
        },
        "image_formation": [
            "real background patches tiled", "real cells placed (programs on responders; cytotoxic loss)",
            "× plate gain × well-position gain, + background level", "× illumination field (plate × channel)",
            "defocus blur (site)", "+ plate offset, shot noise, read noise, round, clip to bit range → uint16",
        ],
        "config": json.loads(cfg.model_dump_json()),
    }
