"""One site → its single-cell crops: the one path used by the crops stage (which writes the crops)
and by extraction with ``input: images`` (which embeds them in the same pass), so both give the
same pixels (paper Methods, "Image preprocessing"):

read the channels → divide by the plate's illumination functions → stretch the 0.05/99.95
percentiles to 8 bits → nuclei (the nuclei stage's file, a per-site locations file, or detected
on the corrected DNA channel) → 128×128 crops centred on each nucleus, zero-padded at the border
→ per-cell metadata.

Plain numpy/pandas, callable without Ray; :class:`SiteReader` is a worker's state (a thread pool
for channel reads, the current plate's illumination functions, reusable 8-bit buffers).
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


def site_key(row: dict) -> dict:
    """``{Metadata_Plate: str, Metadata_Well: str, Metadata_Site: int}`` of an index row."""
    return {PLATE: str(row[PLATE]), WELL: str(row[WELL]), SITE: int(row[SITE])}


def where(key: dict) -> str:
    """``"<plate> <well> site <n>"``: how messages name a site."""
    return f"{key[PLATE]} {key[WELL]} site {key[SITE]}"


def nan_to(value, default=None):
    """``default`` for a missing index value (None or NaN), else the value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value


class SiteReader:
    """A worker's reader of sites: channel planes fetched and decoded in parallel threads, the
    current plate's illumination functions (``<run>/illum``, when ``correct``), and the 8-bit
    site and float scratch buffers reused from site to site (:func:`compress.site_to_u8`)."""

    def __init__(self, run: str, *, correct: bool, threads: int) -> None:
        self.run = run
        self.layout = RunLayout(run)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self._illum = illum_core.PlateFunctions(self.layout.folder("illum") if correct else None)
        self.buffers: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def read(self, row: dict, channels: list[str]) -> tuple[list[np.ndarray], int]:
        """The site's planes of ``channels`` (one shape and dtype; not stacked, to spare a copy)
        and the bytes read from storage. Raises :class:`ImageReadError` naming the file."""
        refs = plane_refs(row, channels)
        planes_sizes = list(self.pool.map(read_plane, refs))
        planes = [p for p, _ in planes_sizes]
        check_site_planes(planes, [r.url for r in refs])
        return planes, int(sum(s for _, s in planes_sizes))

    def functions(self, plate: str, channels: list[str]) -> np.ndarray | None:
        """The plate's illumination functions of ``channels`` (``C×H×W`` float32), or None."""
        return self._illum.get(plate, channels)


def nuclei_source(cfg, run: str) -> str:
    """How a site's nuclei are found (the crops stage and extraction's images path decide alike):
    ``file`` when the nuclei stage finished in this run, ``template`` for per-site
    ``nuclei.locations`` files, else ``detect``. Raises :class:`InputError` for a whole-screen
    locations table (the nuclei stage splits it per site first)."""
    if urls.exists(RunLayout(run).success("nuclei")):
        return "file"
    source = cfg.nuclei.locations
    if source and not loc_core.is_template(source):
        raise InputError(f"nuclei.locations {source} is a whole-screen table",
                         fix="run `raycp preprocess nuclei` first: it splits the table per site")
    return "template" if source else "detect"


def corrects_illumination(cfg, run: str, *, compressed: bool) -> bool:
    """Whether sites are divided by their plate's illumination functions: never for a compressed
    index (its PNGs are corrected already) or with ``illumination.enabled`` off. Raises
    :class:`InputError` when correction is on but the illum stage has not finished."""
    if compressed or not cfg.illumination.enabled:
        return False
    layout = RunLayout(run)
    if not urls.exists(layout.success("illum")):
        raise InputError(f"{layout.folder('illum')}: no illumination functions (illum/_SUCCESS missing)",
                         fix="run `raycp preprocess illum` first, or set illumination.enabled=false")
    return True


def detect(nuclei_cfg, plane: np.ndarray, *, return_labels: bool = False):
    """:func:`raycp.preprocess.nuclei.detect_nuclei` with the config's ``nuclei`` section."""
    n = nuclei_cfg
    return nuclei_core.detect_nuclei(
        plane, smoothing_sigma=n.smoothing_sigma, threshold_correction=n.threshold_correction,
        diameter=n.diameter, min_diameter_fraction=n.min_diameter_fraction,
        max_diameter_fraction=n.max_diameter_fraction, declump_distance_fraction=n.declump_distance_fraction,
        min_contrast=n.min_contrast, return_labels=return_labels)


def read_nuclei_file(run: str, key: dict) -> pd.DataFrame:
    """The nuclei stage's table of a site. Raises :class:`InputError` when the stage has none."""
    import pyarrow.parquet as pq

    url = RunLayout(run).nuclei(key[PLATE], key[WELL], key[SITE])
    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: no nuclei for this site (the nuclei stage quarantined it)",
                         fix="see nuclei/ledger.parquet for the reason") from None
    return pq.read_table(io.BytesIO(data)).to_pandas()


def site_nuclei(locate: str, *, run: str, key: dict, nuclei_cfg, dna_plane: np.ndarray | None) -> pd.DataFrame:
    """Nuclei centres of a site (CellProfiler column names) by ``locate``: ``file`` (the nuclei
    stage's), ``template`` (``nuclei.locations`` per site) or ``detect`` (on ``dna_plane``).
    Raises :class:`InputError` for an empty site."""
    if locate == "file":
        table = read_nuclei_file(run, key)
    elif locate == "template":
        table = loc_core.read_site_csv(nuclei_cfg.locations, key[PLATE], key[WELL], key[SITE])
    else:
        table = detect(nuclei_cfg, dna_plane)
    if len(table) == 0:
        raise no_nuclei(key, "detected" if locate == "detect" else "in the locations")
    return table.reset_index(drop=True)


def no_nuclei(key: dict, what: str) -> InputError:
    """The error of an empty site: zero nuclei ``what`` (detected, in the locations, ...)."""
    return InputError(f"{where(key)}: zero nuclei {what} (empty site, zero nuclei to profile)",
                      fix="check the DNA image (blank, out of focus?) or the locations source")


def cell_metadata(row: dict, key: dict, table: pd.DataFrame, border: np.ndarray, *,
                  metadata_columns: list[str], labels: dict[str, int] | None = None) -> pd.DataFrame:
    """Per-cell metadata of a site: keys, cell id (the nucleus number), centre, border flag,
    treatment and control flag, the class label (``labels``: treatment → code; -1 when unknown;
    only when given) and the index's other ``Metadata_*`` columns."""
    n = len(table)
    treatment = nan_to(row.get(TREATMENT))
    meta = pd.DataFrame({
        PLATE: [key[PLATE]] * n, WELL: [key[WELL]] * n, SITE: np.full(n, key[SITE], dtype=np.int64),
        crops_core.CELL_ID: table[nuclei_core.NUMBER].to_numpy(np.int64),
        crops_core.CELL_X: table[nuclei_core.X].to_numpy(np.float64),
        crops_core.CELL_Y: table[nuclei_core.Y].to_numpy(np.float64),
        crops_core.TOUCHES_BORDER: np.asarray(border, dtype=bool),
        TREATMENT: pd.Series([treatment] * n, dtype=object),
        IS_CONTROL: np.full(n, bool(nan_to(row.get(IS_CONTROL), False)), dtype=bool),
    })
    if labels is not None:
        meta[crops_core.LABEL] = np.full(n, labels.get(treatment, -1) if treatment is not None else -1, dtype=np.int64)
    for col in metadata_columns:
        if col not in meta.columns:
            meta[col] = pd.Series([nan_to(row.get(col))] * n, dtype=object)
    return meta


def metadata_columns(index_table: pd.DataFrame) -> list[str]:
    """The index's ``Metadata_*`` columns a site's cells carry besides their keys."""
    return [c for c in index_table.columns if c.startswith("Metadata_") and c not in KEYS]


@dataclass
class SiteCrops:
    """A site's crops: ``meta`` (one row a kept cell), ``crops`` (``N×C×S×S`` uint8, in ``channels``
    order), and how many nuclei touched the border (kept or not, per ``crops.skip_border``)."""

    meta: pd.DataFrame
    crops: np.ndarray
    channels: list[str]
    n_border: int


def site_crops(reader: SiteReader, row: dict, cfg, *, channels: list[str], compressed: bool, locate: str,
               mask_channel: str | None = None, labels: dict[str, int] | None = None,
               metadata_columns: list[str] = ()) -> SiteCrops:
    """Read → correct → stretch to 8 bits → locate → crop one site, read once (see the module
    docstring). ``cfg`` has the ``compression``, ``nuclei`` and ``crops`` sections; ``compressed``:
    the index points at 8-bit PNGs already corrected and stretched; ``mask_channel``: a label
    image cropped as one more channel (the cell's own mask). Raises :class:`InputError` or
    :class:`ImageReadError` naming the site or file (the caller quarantines the site)."""
    key = site_key(row)
    dna = None
    if locate == "detect":
        if cfg.nuclei.channel not in channels:
            raise InputError(f"nuclei.channel {cfg.nuclei.channel} is not among {channels}",
                             fix="set nuclei.channel to the DNA channel")
        dna = channels.index(cfg.nuclei.channel)
    planes, _ = reader.read(row, channels)
    cc = cfg.compression
    u8, dna_plane = compress_core.site_to_u8(
        planes, None if compressed else reader.functions(key[PLATE], channels), compressed=compressed,
        dna=dna, low=cc.low_percentile, high=cc.high_percentile, source=row[url_col(channels[0])],
        buffers=reader.buffers)
    del planes
    table = site_nuclei(locate, run=reader.run, key=key, nuclei_cfg=cfg.nuclei, dna_plane=dna_plane)
    del dna_plane
    loc_core.check_inside(table, u8.shape[1:], source=where(key))
    size = cfg.crops.size
    xs = table[nuclei_core.X].to_numpy(np.float64)
    ys = table[nuclei_core.Y].to_numpy(np.float64)
    crops, border = crops_core.crop_cells(u8, xs, ys, size)
    out_channels = list(channels)
    if mask_channel:
        (mask_plane,), _ = reader.read(row, [mask_channel])
        if mask_plane.shape != u8.shape[1:]:
            raise ImageReadError(f"{row[url_col(mask_channel)]}: mask shape {mask_plane.shape} differs from "
                                 f"the image's {u8.shape[1:]}", fix="the label image must match the site")
        masks = crops_core.mask_crops(crops_core.label_image(mask_plane), xs, ys, size)
        crops = np.concatenate([crops, masks[:, None]], axis=1)
        out_channels.append(mask_channel)
    keep = ~border if cfg.crops.skip_border else np.ones(len(border), dtype=bool)
    if not keep.any():
        raise InputError(f"{where(key)}: all {len(border)} nuclei are border cells and crops.skip_border is on",
                         fix="turn crops.skip_border off to keep them zero-padded")
    meta = cell_metadata(row, key, table, border, metadata_columns=list(metadata_columns),
                         labels=labels)[keep].reset_index(drop=True)
    return SiteCrops(meta=meta, crops=np.ascontiguousarray(crops[keep]), channels=out_channels,
                     n_border=int(border.sum()))
