"""Real single cells and real background, cut out of real 5-channel Cell Painting sites.

No cell shape is invented: every cell placed in a built screen is a real cell of a real site
(by default the complete Opera Phenix site BR00143976 C03 s3 of ``../shared/data``), segmented
with the CellProfiler outlines shipped beside it (``*NucleiOutlines*``/``*CellsOutlines*``) or,
when a site has none, with a simple segmentation of our own (Otsu + watershed). Only 5-channel
sites are used (DNA, ER, RNA, AGP, Mito): 3-channel sources (JUMP, NF1, BBBC022) would need two
channels made up, so they are not used; diversity comes instead from the 8 rotations/flips of each
real cell, applied when a cell is placed (paper Methods, "Training cell painting models": random
flips and 90-degree rotations leave the biology unchanged).

Pixels are put on the scale of a 12-bit camera (paper Methods, "Image preprocessing": the
benchmarks' images are 16-bit TIFFs holding 12-bit data): per channel, the real background level
``bg`` is subtracted and the 99.5th percentile of cell pixels is mapped to ``cell_p99_adu``, so a
cell is stored as its *signal above background*; the background level itself is kept at its real
ratio to the signal (``base``). Sites are binned ``binning``×``binning`` first (a camera's pixel
binning: the mean of each block), which turns the 40× Phenix field into a 20×-like one with
BBBC022-sized nuclei.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from raycp.errors import InputError
from raycp.io import images, urls
from raycp.io.importers import parse_phenix_name

_IMAGE_EXT = (".tif", ".tiff", ".png")
#: The fix shown whenever a source yields nothing usable.
_SOURCE_FIX = ("point source.folders at a 5-channel Cell Painting site in Phenix naming "
               "(r03c03f03p01-ch5...tiff), e.g. ../shared/data/images/pediatric_5ch_BR00143976_C03_s3, "
               "and give source.channel_map for its channel numbers")


@dataclass(frozen=True)
class Cell:
    """One real cell: ``signal`` C×h×w float32 (ADU above the channel background), boolean
    ``cell`` and ``nucleus`` masks of the same h×w, and ``source`` (``<site>#<object>``)."""

    signal: np.ndarray
    cell: np.ndarray
    nucleus: np.ndarray
    source: str

    @property
    def nucleus_centre(self) -> tuple[float, float]:
        """(y, x) centroid of the nucleus mask, in patch coordinates."""
        ys, xs = np.nonzero(self.nucleus)
        return float(ys.mean()), float(xs.mean())

    @property
    def shape(self) -> tuple[int, int]:
        return self.cell.shape


@dataclass(frozen=True)
class SourceSite:
    """A 5-channel site found in a source folder: channel URLs in channel order, optional outlines."""

    id: str
    channel_urls: tuple[str, ...]
    nuclei_outlines: str | None = None
    cells_outlines: str | None = None


@dataclass(frozen=True)
class CellLibrary:
    """The real cells and real background patches every site of a screen is composed from.

    ``background``: N×C×p×p float32 patches of real cell-free background (ADU, each patch zero-mean
    per channel so tiles join without seams: the real noise texture, not the local level);
    ``base``: per-channel background level in ADU (the real background/signal ratio);
    ``sources``: one summary dict per source site (segmentation used, cells kept, intensity map).
    """

    channels: tuple[str, ...]
    cells: tuple[Cell, ...]
    background: np.ndarray
    base: np.ndarray
    binning: int
    sources: tuple[dict, ...] = field(default_factory=tuple)

    def summary(self) -> dict:
        areas = [int(c.cell.sum()) for c in self.cells]
        nuc = [int(c.nucleus.sum()) for c in self.cells]
        return {
            "channels": list(self.channels),
            "n_cells": len(self.cells),
            "n_background_patches": int(len(self.background)),
            "binning": self.binning,
            "base_adu": [round(float(b), 2) for b in self.base],
            "median_cell_area_px": float(np.median(areas)) if areas else 0.0,
            "median_nucleus_area_px": float(np.median(nuc)) if nuc else 0.0,
            "sources": list(self.sources),
        }


# --------------------------------------------------------------------------- finding source sites


def _listing(folder: str) -> list[str]:
    fs, path = urls.filesystem(folder)
    try:
        if not fs.isdir(path):
            raise InputError(f"{folder}: source folder not found", fix=_SOURCE_FIX)
        found = fs.find(path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any listing failure is a bad source
        raise InputError(f"{folder}: cannot list the source folder ({type(exc).__name__}: {exc})",
                         fix=_SOURCE_FIX) from None
    protocol = urls.protocol_of(folder)
    names = sorted(p for p in found if p.lower().endswith(_IMAGE_EXT))
    if protocol == "file" and "://" not in folder:
        return names
    return [f"{protocol}://{p}" for p in names]


def find_source_sites(folder: str, channel_map: dict[int, str], channels: tuple[str, ...]) -> list[SourceSite]:
    """Every complete site (all ``channel_map`` channels present) in a Phenix-named folder.

    Outlines are matched by CellProfiler's ``..._<well>_<site>.tiff`` naming
    (``NucleiOutlines_BR00143976_C03_3.tiff`` ↔ ``r03c03f03``); a folder with one site and one
    pair of outline images uses them whatever their suffix.
    """
    by_number = {v: k for k, v in channel_map.items()}
    missing = [c for c in channels if c not in by_number]
    if missing:
        raise InputError(f"{folder}: source.channel_map has no source channel for {', '.join(missing)}",
                         fix="map a Phenix channel number to each of " + ", ".join(channels))
    files = _listing(folder)
    groups: dict[tuple[str, int], dict[int, str]] = {}
    for url in files:
        parsed = parse_phenix_name(url.rsplit("/", 1)[-1])
        if parsed:
            groups.setdefault((parsed["well"], parsed["site"]), {})[parsed["channel"]] = url
    nuclei = [u for u in files if "nucleioutlines" in u.rsplit("/", 1)[-1].lower()]
    cellso = [u for u in files if "cellsoutlines" in u.rsplit("/", 1)[-1].lower()]
    sites = []
    for (well, fld), chans in sorted(groups.items()):
        if not all(by_number[c] in chans for c in channels):
            continue
        suffix = f"_{well}_{int(fld)}."
        n_out = [u for u in nuclei if suffix in u.rsplit("/", 1)[-1]]
        c_out = [u for u in cellso if suffix in u.rsplit("/", 1)[-1]]
        if not n_out and len(groups) == 1 and len(nuclei) == 1:
            n_out = nuclei
        if not c_out and len(groups) == 1 and len(cellso) == 1:
            c_out = cellso
        sites.append(SourceSite(
            id=f"{folder.rstrip('/').rsplit('/', 1)[-1]}:{well}s{int(fld)}",
            channel_urls=tuple(chans[by_number[c]] for c in channels),
            nuclei_outlines=n_out[0] if n_out else None,
            cells_outlines=c_out[0] if c_out else None,
        ))
    if not sites:
        nums = sorted({n for g in groups.values() for n in g})
        what = (f"Phenix channels {nums} found, but not all of {sorted(by_number[c] for c in channels)}"
                if nums else "no Phenix-named images (r..c..f..p..-chN.tiff)")
        raise InputError(f"{folder}: no usable cells: no 5-channel site ({what})", fix=_SOURCE_FIX)
    return sites


# --------------------------------------------------------------------------- segmentation


def labels_from_outlines(outline: np.ndarray) -> np.ndarray:
    """Object labels from a CellProfiler outline image (1-px object borders, any colour).

    Each region enclosed by outlines is one object; regions touching the image border (the
    background, objects CellProfiler cut off) are dropped; outline pixels go to the nearest object.
    """
    from skimage.segmentation import expand_labels

    line = (outline.max(axis=-1) if outline.ndim == 3 else outline) > 0
    regions, n = ndi.label(~line)  # 4-connected: a 1-px 8-connected outline closes a region
    if n == 0:
        return np.zeros(line.shape, np.int32)
    edge = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    keep = np.ones(n + 1, bool)
    keep[0] = False
    keep[edge] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    labels = lut[regions]
    grown = expand_labels(labels, distance=2)
    grown[~(line | (labels > 0))] = 0
    return grown.astype(np.int32)


def segment_site(pixels: np.ndarray, dna: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A simple segmentation for sites without outlines: (nuclei labels, cell labels).

    Nuclei: Otsu on the smoothed DNA channel, split by a distance-transform watershed. Cells: a
    watershed of the summed (per-channel normalised) stains from the nuclei, inside an Otsu mask.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    img = pixels.astype(np.float32)
    d = gaussian(img[dna], 2)
    if float(d.max()) <= float(d.min()):
        z = np.zeros(d.shape, np.int32)
        return z, z
    nuc = ndi.binary_fill_holes(d > threshold_otsu(d))
    nuc = remove_small_objects(nuc, max_size=80)
    if not nuc.any():
        z = np.zeros(d.shape, np.int32)
        return z, z
    dist = ndi.distance_transform_edt(nuc)
    radius = max(3, int(np.sqrt(np.median(np.bincount(ndi.label(nuc)[0].ravel())[1:]) / np.pi) * 0.6))
    peaks = peak_local_max(dist, min_distance=radius, labels=ndi.label(nuc)[0], exclude_border=False)
    markers = np.zeros(d.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    nuclei = watershed(-dist, markers, mask=nuc).astype(np.int32)
    cyto = np.zeros(d.shape, np.float32)
    for c in range(img.shape[0]):
        plane = gaussian(img[c], 2)
        lo, hi = np.percentile(plane, [5, 99.5])
        cyto += np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
    fg = cyto > threshold_otsu(cyto)
    cells = watershed(-cyto, nuclei, mask=fg | (nuclei > 0)).astype(np.int32)
    return nuclei, cells


def read_outline(url: str) -> np.ndarray:
    """A CellProfiler outline image (TIFF or PNG, grey or RGB) as one boolean plane."""
    import io

    try:
        data = urls.read_bytes(url)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                arr = np.asarray(img)
        else:
            import tifffile

            arr = tifffile.imread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any unreadable outline is a bad source
        raise InputError(f"{url}: unreadable outline image ({type(exc).__name__}: {exc})",
                         fix="re-export the CellProfiler outlines, or set source.segmentation=own") from None
    arr = np.squeeze(arr)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] in (3, 4) else arr.max(axis=0)
    return arr > 0


# --------------------------------------------------------------------------- the library


def _bin(a: np.ndarray, b: int) -> np.ndarray:
    """Mean of b×b blocks over the last two axes (sizes already multiples of b)."""
    if b == 1:
        return a.astype(np.float32)
    *lead, h, w = a.shape
    return a.reshape(*lead, h // b, b, w // b, b).mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


def _background_mask(pixels: np.ndarray, objects: np.ndarray, margin: int) -> np.ndarray:
    """Cell-free pixels: far from every labelled object and from any unlabelled bright structure
    (cells cut by the border, debris)."""
    bright = np.zeros(objects.shape, bool)
    outside = objects == 0
    for plane in pixels:
        smooth = ndi.uniform_filter(plane.astype(np.float32), 7)
        vals = smooth[outside]
        med = float(np.median(vals))
        mad = float(np.median(np.abs(vals - med))) * 1.4826 + 1e-6
        bright |= smooth > med + 4 * mad
    busy = (objects > 0) | bright
    return ~ndi.binary_dilation(busy, iterations=margin)


def cells_from_site(pixels: np.ndarray, nuclei_labels: np.ndarray, cell_labels: np.ndarray, *,
                    site_id: str, binning: int, cell_p99_adu: float, patch: int = 32,
                    max_patches: int = 64) -> tuple[list[Cell], np.ndarray, np.ndarray, dict]:
    """Cut the usable cells of one real site and its background patches (pure numpy).

    A cell is usable when it does not touch the image border, holds exactly one nucleus (≥ 60 %
    of that nucleus inside it) of plausible area (¼ to 4× the site's median) and is at least
    1.5× its nucleus. Returns ``(cells, background patches, base ADU per channel, summary)``.
    """
    C, H, W = pixels.shape
    b = int(binning)
    H2, W2 = (H // b) * b, (W // b) * b
    pixels, nuclei_labels, cell_labels = pixels[:, :H2, :W2], nuclei_labels[:H2, :W2], cell_labels[:H2, :W2]
    objects = (nuclei_labels > 0) | (cell_labels > 0)
    bg_mask = _background_mask(pixels, objects.astype(np.int32), margin=max(8, 6 * b))
    if bg_mask.sum() < 1000:
        bg_mask = ~ndi.binary_dilation(objects, iterations=4 * b)
    bg_level = np.array([np.median(p[bg_mask]) if bg_mask.any() else np.percentile(p, 5) for p in pixels],
                        np.float64)

    # cells: one nucleus each, not on the border, plausible sizes
    n_cells = int(cell_labels.max())
    slices = ndi.find_objects(cell_labels)
    nuc_area = np.bincount(nuclei_labels.ravel())
    med_nuc = float(np.median(nuc_area[1:][nuc_area[1:] > 0])) if (nuc_area[1:] > 0).any() else 0.0
    kept: list[tuple[int, int, tuple[slice, slice]]] = []
    reasons: dict[str, int] = {}

    def drop(why: str) -> None:
        reasons[why] = reasons.get(why, 0) + 1

    for lab in range(1, n_cells + 1):
        sl = slices[lab - 1]
        if sl is None:
            continue
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop >= H2 or sl[1].stop >= W2:
            drop("touches the border")
            continue
        mask = cell_labels[sl] == lab
        inside = nuclei_labels[sl][mask]
        ids, counts = np.unique(inside[inside > 0], return_counts=True)
        if len(ids) == 0:
            drop("no nucleus")
            continue
        main = ids[np.argmax(counts)]
        big = [i for i, n in zip(ids, counts) if n >= 0.6 * nuc_area[i]]
        if len(big) != 1 or big[0] != main:
            drop("not exactly one nucleus")
            continue
        a_nuc = int(counts.max())
        if not (0.25 * med_nuc <= a_nuc <= 4 * med_nuc) or mask.sum() < 1.5 * a_nuc:
            drop("implausible size")
            continue
        kept.append((lab, int(main), sl))

    sig_pixels = []
    raw: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
    pad = 2 * b
    for lab, nuc, sl in kept:
        y0 = max(0, (sl[0].start - pad) // b * b)
        x0 = max(0, (sl[1].start - pad) // b * b)
        y1 = min(H2, -(-(sl[0].stop + pad) // b) * b)
        x1 = min(W2, -(-(sl[1].stop + pad) // b) * b)
        cmask = cell_labels[y0:y1, x0:x1] == lab
        nmask = (nuclei_labels[y0:y1, x0:x1] == nuc) & cmask
        sub = pixels[:, y0:y1, x0:x1].astype(np.float64) - bg_level[:, None, None]
        sig_pixels.append(sub[:, cmask])
        raw.append((sub, cmask, nmask, f"{site_id}#{lab}"))
    if not raw:
        return [], np.zeros((0, C, patch, patch), np.float32), np.zeros(C, np.float32), {
            "site": site_id, "n_cells": 0, "dropped": reasons}

    allsig = np.concatenate(sig_pixels, axis=1)
    hi = np.array([np.percentile(s, 99.5) for s in allsig], np.float64)
    if (hi <= 0).any():
        bad = [i for i in range(C) if hi[i] <= 0]
        raise InputError(f"{site_id}: channel(s) {bad} have no signal above background in the cells",
                         fix=_SOURCE_FIX)
    scale = cell_p99_adu / hi

    cells = []
    for sub, cmask, nmask, sid in raw:
        sig = _bin(sub * scale[:, None, None], b)
        cm = _bin(cmask[None].astype(np.float32), b)[0] >= 0.5
        nm = _bin(nmask[None].astype(np.float32), b)[0] >= 0.5
        nm &= cm
        if nm.sum() < 4:
            drop("too small after binning")
            continue
        cells.append(Cell(signal=sig.astype(np.float32), cell=cm, nucleus=nm, source=sid))

    # background patches at the binned scale
    bgb = _bin(bg_mask[None].astype(np.float32), b)[0] >= 0.999
    full = ndi.minimum_filter(bgb.astype(np.uint8), size=patch, mode="constant", cval=0).astype(bool)
    half = patch // 2
    binned = None
    patches = []
    for cy in range(half, full.shape[0] - half + 1, half):
        for cx in range(half, full.shape[1] - half + 1, half):
            if not full[cy, cx] or len(patches) >= max_patches:
                continue
            if binned is None:
                binned = _bin((pixels.astype(np.float64) - bg_level[:, None, None]) * scale[:, None, None], b)
            tile = binned[:, cy - half:cy - half + patch, cx - half:cx - half + patch]
            patches.append(tile - tile.mean(axis=(1, 2), keepdims=True))  # real noise, no local level
    background = np.stack(patches).astype(np.float32) if patches else np.zeros((0, C, patch, patch), np.float32)
    base = (bg_level * scale).astype(np.float32)
    summary = {
        "site": site_id,
        "n_objects": n_cells,
        "n_cells": len(cells),
        "dropped": dict(sorted(reasons.items())),
        "background_level": [round(float(v), 2) for v in bg_level],
        "cell_p99_5": [round(float(v), 2) for v in hi],
        "adu_per_source_unit": [round(float(v), 6) for v in scale],
        "n_background_patches": len(patches),
    }
    return cells, background, base, summary


def load_library(folders: list[str], channel_map: dict[int, str], channels: tuple[str, ...], *,
                 binning: int = 2, segmentation: str = "auto", cell_p99_adu: float = 1500.0,
                 patch: int = 32) -> CellLibrary:
    """Read every 5-channel site of ``folders`` and cut its real cells (see :func:`cells_from_site`).

    ``segmentation``: ``outlines`` (the shipped CellProfiler outlines, required), ``own``
    (:func:`segment_site`) or ``auto`` (outlines when the site has them).
    """
    if segmentation not in ("auto", "outlines", "own"):
        raise InputError(f"segmentation {segmentation!r} is unknown", fix="use auto, outlines or own")
    all_cells: list[Cell] = []
    backgrounds, bases, summaries = [], [], []
    for folder in folders:
        for site in find_source_sites(folder, channel_map, channels):
            try:
                pixels = images.read_site(list(site.channel_urls))
            except images.ImageReadError as exc:
                raise InputError(f"{folder}: no usable cells: {exc.message}", fix=_SOURCE_FIX) from None
            has_outlines = site.nuclei_outlines is not None and site.cells_outlines is not None
            if segmentation == "outlines" and not has_outlines:
                raise InputError(f"{folder}: site {site.id} has no Nuclei/Cells outline images",
                                 fix="set source.segmentation=auto or own to segment it")
            if has_outlines and segmentation != "own":
                nuc = labels_from_outlines(read_outline(site.nuclei_outlines))
                cel = labels_from_outlines(read_outline(site.cells_outlines))
                how = "CellProfiler outlines"
            else:
                nuc, cel = segment_site(pixels, dna=list(channels).index("DNA") if "DNA" in channels else 0)
                how = "own (Otsu + watershed)"
            if nuc.shape != pixels.shape[1:] or cel.shape != pixels.shape[1:]:
                raise InputError(f"{folder}: outlines of {site.id} are {nuc.shape}, images {pixels.shape[1:]}",
                                 fix="use the outline images made for this site")
            cells, bg, base, summary = cells_from_site(pixels, nuc, cel, site_id=site.id, binning=binning,
                                                      cell_p99_adu=cell_p99_adu, patch=patch)
            summary["segmentation"] = how
            summaries.append(summary)
            if cells:
                all_cells.extend(cells)
                bases.append(base)
            if len(bg):
                backgrounds.append(bg)
    if not all_cells:
        detail = "; ".join(f"{s['site']}: {s.get('n_objects', 0)} objects, dropped {s['dropped']}" for s in summaries)
        raise InputError(f"{', '.join(folders)}: no usable cells ({detail or 'no site'})", fix=_SOURCE_FIX)
    if not backgrounds:
        raise InputError(f"{', '.join(folders)}: no cell-free background area of {patch}×{patch} px found",
                         fix="use a site that is not confluent (background pixels between cells)")
    return CellLibrary(
        channels=tuple(channels),
        cells=tuple(all_cells),
        background=np.concatenate(backgrounds),
        base=np.mean(np.stack(bases), axis=0).astype(np.float32),
        binning=int(binning),
        sources=tuple(summaries),
    )


# --------------------------------------------------------------------------- placement helpers


def dihedral(cell: Cell, k: int) -> Cell:
    """One of the 8 rotations/flips of a real cell (k in 0..7)."""
    def t(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a, k % 4, axes=(-2, -1))
        if k >= 4:
            a = a[..., ::-1]
        return np.ascontiguousarray(a)

    return Cell(signal=t(cell.signal), cell=t(cell.cell), nucleus=t(cell.nucleus), source=cell.source)
