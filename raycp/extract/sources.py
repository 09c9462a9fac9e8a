"""Where a site's crops come from: the crops stage's shards, or the images in the same pass.

Both give the same ``(metadata, N×C×S×S uint8 crops)`` for a site, in the channel order the model
takes, with the same pixels: the images path chains the preprocessing stage's pure cores exactly
as ``raycp preprocess crops`` does (read → illumination correction → 0.05/99.95 percentile
stretch to 8 bits → nuclei (imported or detected on the corrected DNA channel) → 128×128 crops
centred on each nucleus, zero-padded at the border; paper Methods, "image preprocessing").

The CellProfiler baseline needs whole images and masks instead of crops: :meth:`SiteSource.cp_site`
gives the corrected channels (float, scaled to [0, 1] as CellProfiler does) and the nuclei labels.

Everything here is plain numpy/pandas, callable without Ray; :class:`SiteSource` keeps the
per-worker state (a thread pool for channel reads, the current plate's illumination functions).
"""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.images import ImageReadError, check_site_planes, read_plane
from raycp.io.index import IS_CONTROL, KEYS, PLATE, SITE, TREATMENT, WELL, plane_refs, url_col
from raycp.layout import RunLayout
from raycp.preprocess import compress as compress_core
from raycp.preprocess import crops as crops_core
from raycp.preprocess import illumination as illum_core
from raycp.preprocess import locations as loc_core
from raycp.preprocess import nuclei as nuclei_core
from raycp.sites import JsonSpec


@dataclass
class SourceSpec(JsonSpec):
    """What a worker needs to make a site's crops, as JSON (no user data is ever unpickled)."""

    run: str
    input: str                                   # "crops" | "images"
    channels: list[str]                          # the order crops are delivered in (the model's)
    config: dict                                 # ExtractConfig.model_dump(mode="json")
    correct: bool = False                        # images: divide by the plate's illumination functions
    compressed: bool = False                     # images: the index points at 8-bit PNGs already stretched
    locate: str = "detect"                       # images: detect | file | template
    metadata_columns: list[str] = field(default_factory=list)



def site_key(row: dict) -> dict:
    return {PLATE: str(row[PLATE]), WELL: str(row[WELL]), SITE: int(row[SITE])}


def where(key: dict) -> str:
    return f"{key[PLATE]} {key[WELL]} site {key[SITE]}"


def crops_url(run: str, key: dict) -> str:
    """The crops stage's shard of a site (``<run>/crops/<plate>/<well>_<site>.parquet``)."""
    return RunLayout(run).crops(key[PLATE], key[WELL], key[SITE])


def _nan_to(value, default=None):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value


# -- crops shards ---------------------------------------------------------------------------------

def read_crops_shard(url: str, channels: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """A crops shard as ``(metadata, N×C×S×S uint8)`` with its channels put in ``channels`` order."""
    import pyarrow.parquet as pq

    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: no crops for this site (the crops stage quarantined it or did not reach it)",
                         fix="see crops/ledger.parquet, or set input=images to crop in this pass") from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise InputError(f"{url}: unreadable crops shard ({type(exc).__name__})",
                         fix="re-run `raycp preprocess crops` for this site") from None
    if crops_core.CROP not in table.column_names:
        raise InputError(f"{url}: no {crops_core.CROP} column", fix="point at a shard written by `raycp preprocess crops`")
    stored = json.loads((table.schema.metadata or {}).get(b"raycp.channels", b"null") or "null")
    crops = crops_core.tensor_to_numpy(table.column(crops_core.CROP), crops_core.crop_shape(table.schema))
    meta = table.drop_columns([crops_core.CROP]).to_pandas()
    if stored is None:
        stored = list(channels)[: crops.shape[1]] if crops.ndim == 4 else []
    missing = [c for c in channels if c not in stored]
    if missing:
        raise InputError(f"{url}: the crops have channels {stored}, not {missing}",
                         fix="re-run the crops stage with these channels or choose data.channels among them")
    order = [stored.index(c) for c in channels]
    if order != list(range(crops.shape[1])):
        crops = np.ascontiguousarray(crops[:, order])
    return meta, crops


# -- images ---------------------------------------------------------------------------------------

def seeded_nuclei(dna: np.ndarray, xs: np.ndarray, ys: np.ndarray, *, smoothing_sigma: float = 2.0) -> np.ndarray:
    """Nuclei labels grown from imported centres: a watershed of the smoothed DNA image seeded at
    each centre (label i+1 for centre i) inside its Otsu foreground (CellProfiler's propagation idea).
    A centre on background keeps a one-pixel seed, so every nucleus has a mask."""
    from scipy import ndimage as ndi
    from skimage import filters, segmentation

    smooth = ndi.gaussian_filter(dna.astype(np.float32), smoothing_sigma) if smoothing_sigma > 0 else dna.astype(np.float32)
    fg = smooth > filters.threshold_otsu(smooth) if smooth.max() > smooth.min() else np.zeros(dna.shape, bool)
    markers = np.zeros(dna.shape, dtype=np.int32)
    h, w = dna.shape
    cy = np.clip(np.floor(np.asarray(ys) + 0.5).astype(np.int64), 0, h - 1)
    cx = np.clip(np.floor(np.asarray(xs) + 0.5).astype(np.int64), 0, w - 1)
    markers[cy, cx] = np.arange(1, len(cx) + 1, dtype=np.int32)
    return segmentation.watershed(-smooth, markers, mask=fg | (markers > 0)).astype(np.int32)


class SiteSource:
    """Per-worker maker of a site's crops (or, for cp-measure, its images and nuclei labels)."""

    def __init__(self, spec: SourceSpec, *, threads: int | None = None) -> None:
        from raycp.extract.config import ExtractConfig

        self.spec = spec
        self.cfg = ExtractConfig.model_validate(spec.config)
        self.pool = ThreadPoolExecutor(max_workers=threads or max(1, min(8, len(spec.channels) + 1)))
        self._illum = illum_core.PlateFunctions(RunLayout(spec.run).illum if spec.correct else None)

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    # -- reading
    def read(self, row: dict, channels: list[str]) -> list[np.ndarray]:
        """The planes of ``channels`` (fetched and decoded in parallel threads), one shape and dtype."""
        refs = plane_refs(row, channels)
        planes = [p for p, _ in self.pool.map(read_plane, refs)]
        check_site_planes(planes, [r.url for r in refs])
        return planes

    def functions(self, plate: str, channels: list[str]) -> np.ndarray | None:
        return self._illum.get(plate, channels)

    def nuclei_table(self, key: dict, dna: np.ndarray | None) -> pd.DataFrame:
        """Nuclei centres (canonical CellProfiler columns) from the nuclei stage, a template, or detection."""
        if self.spec.locate == "file":
            url = RunLayout(self.spec.run).nuclei(key[PLATE], key[WELL], key[SITE])
            try:
                table = pd.read_parquet(io.BytesIO(urls.read_bytes(url)))
            except FileNotFoundError:
                raise InputError(f"{url}: no nuclei for this site (the nuclei stage quarantined it)",
                                 fix="see nuclei/ledger.parquet for the reason") from None
        elif self.spec.locate == "template":
            table = loc_core.read_site_csv(self.cfg.nuclei.locations, key[PLATE], key[WELL], key[SITE])
        else:
            table = self._detect(dna)
        if len(table) == 0:
            what = "detected" if self.spec.locate == "detect" else "in the locations"
            raise InputError(f"{where(key)}: empty site, zero nuclei {what}",
                             fix="nothing to profile: check the DNA image (blank, out of focus?) or the locations")
        return table.reset_index(drop=True)

    def _detect(self, plane: np.ndarray, *, return_labels: bool = False):
        n = self.cfg.nuclei
        return nuclei_core.detect_nuclei(
            plane, smoothing_sigma=n.smoothing_sigma, threshold_correction=n.threshold_correction,
            diameter=n.diameter, min_diameter_fraction=n.min_diameter_fraction,
            max_diameter_fraction=n.max_diameter_fraction, declump_distance_fraction=n.declump_distance_fraction,
            min_contrast=n.min_contrast, return_labels=return_labels)

    # -- crops
    def crops(self, row: dict) -> tuple[pd.DataFrame, np.ndarray]:
        """``(metadata, N×C×S×S uint8)`` of one site, from its shard or from its images."""
        key = site_key(row)
        if self.spec.input == "crops":
            meta, crops = read_crops_shard(crops_url(self.spec.run, key), self.spec.channels)
            if len(meta) == 0:
                raise InputError(f"{where(key)}: empty site, the crops shard has no cell",
                                 fix="nothing to profile at this site")
            return meta, crops
        return self._crops_from_images(row, key)

    def _crops_from_images(self, row: dict, key: dict) -> tuple[pd.DataFrame, np.ndarray]:
        spec, cfg = self.spec, self.cfg
        channels = list(spec.channels)
        dna = channels.index(cfg.nuclei.channel) if spec.locate == "detect" else None
        if spec.locate == "detect" and dna is None:
            raise InputError(f"nuclei.channel {cfg.nuclei.channel} is not among {channels}",
                             fix="set nuclei.channel to the DNA channel")
        planes = self.read(row, channels)
        cc = cfg.compression
        u8, dna_plane = compress_core.site_to_u8(
            planes, None if spec.compressed else self.functions(key[PLATE], channels), compressed=spec.compressed,
            dna=dna, low=cc.low_percentile, high=cc.high_percentile, source=row[url_col(channels[0])])
        del planes
        table = self.nuclei_table(key, dna_plane)
        del dna_plane
        loc_core.check_inside(table, u8.shape[1:], source=where(key))
        xs = table[nuclei_core.X].to_numpy(np.float64)
        ys = table[nuclei_core.Y].to_numpy(np.float64)
        crops, border = crops_core.crop_cells(u8, xs, ys, cfg.crops.size)
        keep = ~border if cfg.crops.skip_border else np.ones(len(border), dtype=bool)
        if not keep.any():
            raise InputError(f"{where(key)}: all {len(border)} nuclei are border cells and crops.skip_border is on",
                             fix="turn crops.skip_border off to keep them zero-padded")
        meta = self.cell_metadata(row, key, table, border)[keep].reset_index(drop=True)
        return meta, np.ascontiguousarray(crops[keep])

    def cell_metadata(self, row: dict, key: dict, table: pd.DataFrame, border: np.ndarray) -> pd.DataFrame:
        """The crops stage's per-cell metadata: keys, cell id, centre, border flag, the index's Metadata_*."""
        n = len(table)
        meta = pd.DataFrame({
            PLATE: [key[PLATE]] * n, WELL: [key[WELL]] * n, SITE: np.full(n, key[SITE], dtype=np.int64),
            crops_core.CELL_ID: table[nuclei_core.NUMBER].to_numpy(np.int64),
            crops_core.CELL_X: table[nuclei_core.X].to_numpy(np.float64),
            crops_core.CELL_Y: table[nuclei_core.Y].to_numpy(np.float64),
            crops_core.TOUCHES_BORDER: np.asarray(border, dtype=bool),
            TREATMENT: pd.Series([_nan_to(row.get(TREATMENT))] * n, dtype=object),
            IS_CONTROL: np.full(n, bool(_nan_to(row.get(IS_CONTROL), False)), dtype=bool),
        })
        for col in self.spec.metadata_columns:
            if col not in meta.columns:
                meta[col] = pd.Series([_nan_to(row.get(col))] * n, dtype=object)
        return meta

    # -- whole images for the CellProfiler baseline
    def cp_site(self, row: dict) -> tuple[pd.DataFrame, list[np.ndarray], np.ndarray]:
        """``(nuclei table, corrected planes scaled to [0, 1], nuclei labels)`` of one site.

        Scaling: 16-bit images / 65535 and 8-bit / 255, as CellProfiler's image loading does; the
        illumination functions divide before it. Nuclei labels: the ``nuclei_labels`` channel, else
        the detection's own watershed labels, else labels grown from imported centres
        (:func:`seeded_nuclei`). Label ``i`` is the ``i``-th row of the table.
        """
        key = site_key(row)
        spec, cp = self.spec, self.cfg.cellprofiler
        channels = list(spec.channels)
        planes = self.read(row, channels)
        scale = 255.0 if planes[0].dtype == np.uint8 else 65535.0
        functions = None if spec.compressed else self.functions(key[PLATE], channels)
        images = []
        for c, plane in enumerate(planes):
            corrected = illum_core.correct(plane, None if functions is None else functions[c])
            corrected /= np.float32(scale)
            np.clip(corrected, 0.0, 1.0, out=corrected)
            images.append(corrected)
        del planes
        dna = channels.index(self.cfg.nuclei.channel) if self.cfg.nuclei.channel in channels else None
        if cp.nuclei_labels:
            (mask_plane,) = self.read(row, [cp.nuclei_labels])
            if mask_plane.shape != images[0].shape:
                raise ImageReadError(f"{row[url_col(cp.nuclei_labels)]}: label image {mask_plane.shape} differs from "
                                     f"the site's {images[0].shape}", fix="the label image must match the site")
            labels, table = dense_labels(crops_core.label_image(mask_plane))
        elif spec.locate == "detect":
            if dna is None:
                raise InputError(f"nuclei.channel {self.cfg.nuclei.channel} is not among {channels}",
                                 fix="set nuclei.channel to the DNA channel")
            table, labels = self._detect(images[dna] * np.float32(scale), return_labels=True)
        else:
            table = self.nuclei_table(key, None)
            loc_core.check_inside(table, images[0].shape, source=where(key))
            base = images[dna] if dna is not None else images[0]
            labels = seeded_nuclei(base, table[nuclei_core.X].to_numpy(), table[nuclei_core.Y].to_numpy(),
                                   smoothing_sigma=self.cfg.nuclei.smoothing_sigma)
        if len(table) == 0 or labels.max() == 0:
            raise InputError(f"{where(key)}: empty site, zero nuclei",
                             fix="nothing to measure: check the DNA image or the nuclei source")
        return table.reset_index(drop=True), images, labels


def dense_labels(labels: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """A label image relabelled 1..N and its nuclei table (centroids, in label order)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    dense = relabel_sequential(labels.astype(np.int32, copy=False))[0].astype(np.int32)
    n = int(dense.max())
    index = np.arange(1, n + 1)
    if n == 0:
        return dense, pd.DataFrame({nuclei_core.NUMBER: np.zeros(0, np.int64), nuclei_core.X: np.zeros(0),
                                    nuclei_core.Y: np.zeros(0)})
    centres = np.array(ndi.center_of_mass(np.ones_like(dense, dtype=np.uint8), dense, index), dtype=np.float64)
    return dense, pd.DataFrame({nuclei_core.NUMBER: index.astype(np.int64), nuclei_core.X: centres[:, 1],
                                nuclei_core.Y: centres[:, 0]})


# -- the run's sites ----------------------------------------------------------------------------

def decide_input(cfg, run: str) -> str:
    """``crops`` or ``images`` (``auto``: crops when the crops stage finished in this run)."""
    if cfg.model.kind == "cellprofiler":
        return "images"
    if cfg.input != "auto":
        return cfg.input
    return "crops" if urls.exists(RunLayout(run).success("crops")) else "images"


def decide_locate(cfg, run: str, *, need_labels: bool = False) -> str:
    """How nuclei are found in the images path: the nuclei stage's files, a per-site template, or detection."""
    if urls.exists(RunLayout(run).success("nuclei")):
        return "file"
    source = cfg.nuclei.locations
    if source and not loc_core.is_template(source):
        raise InputError(f"nuclei.locations {source} is a whole-screen table",
                         fix="run `raycp preprocess nuclei` first: it splits the table per site")
    return "template" if source else "detect"


def decide_correct(cfg, run: str, compressed: bool, input_: str) -> bool:
    """Whether the images path divides by the plate's illumination functions (never for crops or a
    compressed index); as in the crops stage, correction on but no functions is an error."""
    if input_ != "images" or compressed or not cfg.illumination.enabled:
        return False
    if not urls.exists(RunLayout(run).success("illum")):
        raise InputError(f"{RunLayout(run).illum}: no illumination functions (illum/_SUCCESS missing)",
                         fix="run `raycp preprocess illum` first, or set illumination.enabled=false")
    return True


def metadata_columns(index_table: pd.DataFrame) -> list[str]:
    return [c for c in index_table.columns if c.startswith("Metadata_") and c not in KEYS]
