"""Where a site's crops come from: the crops stage's shards, or the images in the same pass.

Both give the same ``(metadata, N×C×S×S uint8 crops)`` for a site, in the channel order the model
takes, with the same pixels: the images path is the crops stage's own site → crops path
(:func:`raycp.preprocess.site.site_crops`: read → illumination correction → 0.05/99.95 percentile
stretch to 8 bits → nuclei → 128×128 crops; paper Methods, "image preprocessing"), and shards are
read by the crops stage's one reader (:func:`raycp.preprocess.crops.read_shard`).

The CellProfiler baseline needs whole images and masks instead of crops: :meth:`SiteSource.cp_site`
gives the corrected channels (float, scaled to [0, 1] as CellProfiler does) and the nuclei labels.

Everything here is plain numpy/pandas, callable without Ray; :class:`SiteSource` keeps the
per-worker state (a thread pool for channel reads, the current plate's illumination functions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.images import ImageReadError
from raycp.io.index import PLATE, SITE, WELL, url_col
from raycp.layout import RunLayout
from raycp.preprocess import crops as crops_core
from raycp.preprocess import illumination as illum_core
from raycp.preprocess import locations as loc_core
from raycp.preprocess import nuclei as nuclei_core
from raycp.preprocess.site import (
    SiteReader,
    cell_metadata,
    corrects_illumination,
    detect,
    site_crops,
    site_key,
    site_nuclei,
    where,
)
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



def crops_url(run: str, key: dict) -> str:
    """The crops stage's shard of a site (``<run>/crops/<plate>/<well>_<site>.parquet``)."""
    return RunLayout(run).crops(key[PLATE], key[WELL], key[SITE])


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


class SiteSource(SiteReader):
    """Per-worker maker of a site's crops (or, for cp-measure, its images and nuclei labels)."""

    def __init__(self, spec: SourceSpec, *, threads: int | None = None) -> None:
        from raycp.extract.config import ExtractConfig

        super().__init__(spec.run, correct=spec.correct, threads=threads or min(8, len(spec.channels) + 1))
        self.spec = spec
        self.cfg = ExtractConfig.model_validate(spec.config)

    def crops(self, row: dict) -> tuple[pd.DataFrame, np.ndarray]:
        """``(metadata, N×C×S×S uint8)`` of one site, from its shard or from its images."""
        key = site_key(row)
        if self.spec.input == "crops":
            meta, crops = crops_core.read_shard(crops_url(self.spec.run, key), self.spec.channels)
            if len(meta) == 0:
                raise InputError(f"{where(key)}: empty site, the crops shard has no cell",
                                 fix="nothing to profile at this site")
            return meta, crops
        got = site_crops(self, row, self.cfg, channels=list(self.spec.channels), compressed=self.spec.compressed,
                         locate=self.spec.locate, metadata_columns=self.spec.metadata_columns)
        return got.meta, got.crops

    def cell_metadata(self, row: dict, key: dict, table: pd.DataFrame, border: np.ndarray) -> pd.DataFrame:
        """The crops stage's per-cell metadata (:func:`raycp.preprocess.site.cell_metadata`)."""
        return cell_metadata(row, key, table, border, metadata_columns=self.spec.metadata_columns)

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
        planes, _ = self.read(row, channels)
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
            (mask_plane,), _ = self.read(row, [cp.nuclei_labels])
            if mask_plane.shape != images[0].shape:
                raise ImageReadError(f"{row[url_col(cp.nuclei_labels)]}: label image {mask_plane.shape} differs from "
                                     f"the site's {images[0].shape}", fix="the label image must match the site")
            labels, table = dense_labels(crops_core.label_image(mask_plane))
        elif spec.locate == "detect":
            if dna is None:
                raise InputError(f"nuclei.channel {self.cfg.nuclei.channel} is not among {channels}",
                                 fix="set nuclei.channel to the DNA channel")
            table, labels = detect(self.cfg.nuclei, images[dna] * np.float32(scale), return_labels=True)
        else:
            table = site_nuclei(spec.locate, run=spec.run, key=key, nuclei_cfg=self.cfg.nuclei, dna_plane=None)
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


def decide_correct(cfg, run: str, compressed: bool, input_: str) -> bool:
    """Whether the images path divides by the plate's illumination functions: as the crops stage
    decides (:func:`raycp.preprocess.site.corrects_illumination`); never when reading crops."""
    return input_ == "images" and corrects_illumination(cfg, run, compressed=compressed)

