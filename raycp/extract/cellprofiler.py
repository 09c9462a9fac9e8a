"""The paper's CellProfiler baseline with cp-measure (Methods, "Feature extraction with CellProfiler",
Table 4).

CellProfiler identifies nuclei first, infers each cell's boundary from its nucleus, then measures
every object per channel: intensity, texture (Haralick), granularity, and shape (AreaShape), plus
correlation between channels — about 1,700 features per cell in the paper's datasets. Here:

1. nuclei labels (the detection's watershed labels, labels grown from imported centres, or a label
   image; see :meth:`raycp.extract.sources.SiteSource.cp_site`);
2. cells: a watershed of the smoothed cytoplasm channel (AGP or RNA) seeded by the nuclei and
   limited to its Otsu foreground (:func:`grow_cells`) — a cell keeps its nucleus' label;
3. cytoplasm: the cell minus its nucleus;
4. per compartment, per channel: cp-measure's ``intensity``, ``texture``, ``granularity`` (and
   optionally ``radial_distribution``); per compartment: ``sizeshape`` (+ Zernike, Feret); per
   channel pair: ``correlation`` (Pearson, slope, Manders, RWC).

Columns are named as CellProfiler names them (``Cells_Intensity_MeanIntensity_DNA``,
``Nuclei_Texture_Contrast_ER_3_00_256``, ``Cytoplasm_Correlation_Correlation_DNA_RNA`` …), float32,
one row per nucleus (``Metadata_CellId`` = its label). An object with no pixels in a compartment
(a cell whose nucleus fills it has no cytoplasm) gets NaN there. Absolute positions
(``Location_*``, ``Center_*``, bounding-box corners) are not morphology and are left out, as are the
three normalised moments CellProfiler leaves undefined.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Not morphology (absolute positions) or always undefined: left out.
_DROP_PREFIXES = ("Location_", "Center_", "BoundingBoxMinimum_", "BoundingBoxMaximum_")
_DROP = {"NormalizedMoment_0_0", "NormalizedMoment_0_1", "NormalizedMoment_1_0"}
_CORRELATION_NAMES = {  # cp-measure name -> (CellProfiler name, channel order: ab or ba)
    "Correlation_Pearson": ("Correlation_Correlation", "ab"),
    "Correlation_Slope": ("Correlation_Slope", "ab"),
    "Correlation_Manders_1": ("Correlation_Manders", "ab"),
    "Correlation_Manders_2": ("Correlation_Manders", "ba"),
    "Correlation_RWC_1": ("Correlation_RWC", "ab"),
    "Correlation_RWC_2": ("Correlation_RWC", "ba"),
}


def grow_cells(nuclei: np.ndarray, cytoplasm: np.ndarray, *, smoothing_sigma: float = 1.0,
               threshold_correction: float = 1.0) -> np.ndarray:
    """Cell labels grown from nuclei labels over a cytoplasm image (same label per nucleus and cell).

    Watershed of the inverted smoothed image seeded by the nuclei, restricted to the Otsu
    foreground (× ``threshold_correction``) joined with the nuclei themselves, so every nucleus
    has a cell that contains it.
    """
    from scipy import ndimage as ndi
    from skimage import filters, segmentation

    image = cytoplasm.astype(np.float32, copy=False)
    smooth = ndi.gaussian_filter(image, smoothing_sigma) if smoothing_sigma > 0 else image
    if smooth.max() > smooth.min():
        fg = smooth > filters.threshold_otsu(smooth) * threshold_correction
    else:
        fg = np.zeros(smooth.shape, dtype=bool)
    return segmentation.watershed(-smooth, nuclei, mask=fg | (nuclei > 0)).astype(np.int32)


def compartments(nuclei: np.ndarray, cells: np.ndarray) -> dict[str, np.ndarray]:
    """``Nuclei``, ``Cells`` and ``Cytoplasm`` (cell pixels outside any nucleus) label images."""
    cytoplasm = np.where(nuclei > 0, 0, cells).astype(np.int32)
    return {"Nuclei": nuclei.astype(np.int32, copy=False), "Cells": cells, "Cytoplasm": cytoplasm}


def _keep(name: str) -> bool:
    return name not in _DROP and not name.startswith(_DROP_PREFIXES)


def _channel_name(feature: str, channel: str, group: str) -> str:
    """CellProfiler's placement of the image name inside a feature name."""
    if group == "intensity":          # Intensity_MeanIntensity -> Intensity_MeanIntensity_DNA
        return f"{feature}_{channel}"
    if group == "granularity":        # Granularity_1 -> Granularity_1_DNA
        return f"{feature}_{channel}"
    if group == "texture":            # Contrast_3_00_256 -> Texture_Contrast_DNA_3_00_256
        head, _, tail = feature.partition("_")
        return f"Texture_{head}_{channel}_{tail}" if tail else f"Texture_{head}_{channel}"
    if group == "radial_distribution":  # RadialDistribution_FracAtD_1of4 -> ..._FracAtD_DNA_1of4
        parts = feature.split("_")
        return "_".join(parts[:-1] + [channel, parts[-1]])
    return f"{feature}_{channel}"


class _Collector:
    """Feature columns of one compartment, scattered into rows 0..n-1 (row = label - 1)."""

    def __init__(self, n: int, labels: np.ndarray) -> None:
        self.n = n
        present = np.unique(labels)
        self.rows = present[present > 0].astype(np.int64) - 1
        self.columns: dict[str, np.ndarray] = {}

    def add(self, name: str, values) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size != self.rows.size:
            raise ValueError(f"cp-measure returned {values.size} values for {self.rows.size} objects ({name})")
        column = np.full(self.n, np.nan, dtype=np.float32)
        column[self.rows] = values.astype(np.float32)
        self.columns[name] = column


def measure_objects(images: list[np.ndarray], channels: list[str], nuclei: np.ndarray, cells: np.ndarray, *,
                    compartment_names: list[str] | tuple[str, ...] = ("Nuclei", "Cells", "Cytoplasm"),
                    measurements: list[str] | tuple[str, ...] = ("intensity", "sizeshape", "texture",
                                                                  "granularity", "correlation"),
                    texture_scale: int = 3, n_objects: int | None = None) -> pd.DataFrame:
    """One row per nucleus label 1..N, float32 CellProfiler-named feature columns.

    ``images``: float planes in [0, 1] (one per channel, illumination-corrected); ``nuclei`` and
    ``cells``: int32 label images sharing labels (:func:`grow_cells`).
    """
    import warnings

    from cp_measure.bulk import get_core_measurements, get_correlation_measurements

    core = get_core_measurements()
    corr = get_correlation_measurements()
    n = int(n_objects if n_objects is not None else nuclei.max())
    columns: dict[str, np.ndarray] = {}
    for comp, labels in compartments(nuclei, cells).items():
        if comp not in compartment_names:
            continue
        col = _Collector(n, labels)
        if col.rows.size == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 of empty rings etc. -> NaN, kept
            if "sizeshape" in measurements:
                shape: dict = {}
                for fn in ("sizeshape", "zernike", "feret"):
                    shape.update(core[fn](labels, images[0]))
                for name, values in shape.items():
                    if _keep(name):
                        col.add(f"{comp}_AreaShape_{name}", values)
            for c, ch in enumerate(channels):
                for group in ("intensity", "texture", "granularity", "radial_distribution"):
                    if group not in measurements:
                        continue
                    if group == "texture":
                        out = core[group](labels, images[c], scale=texture_scale)
                    else:
                        out = core[group](labels, images[c])
                    for name, values in out.items():
                        if _keep(name):
                            col.add(f"{comp}_{_channel_name(name, ch, group)}", values)
            if "correlation" in measurements:
                for a in range(len(channels)):
                    for b in range(a + 1, len(channels)):
                        for fn in ("pearson", "manders_fold", "rwc"):
                            for name, values in corr[fn](images[a], images[b], labels).items():
                                cp_name, order = _CORRELATION_NAMES.get(name, (name, "ab"))
                                first, second = (channels[a], channels[b]) if order == "ab" else (channels[b], channels[a])
                                col.add(f"{comp}_{cp_name}_{first}_{second}", values)
        columns.update(col.columns)
    return pd.DataFrame(columns, index=pd.RangeIndex(n))


def touches_border(labels: np.ndarray, n: int) -> np.ndarray:
    """Per label 1..n: whether the object touches the image border."""
    edge = np.zeros(n + 1, dtype=bool)
    for line in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        edge[np.unique(line)] = True
    return edge[1:]


def measure_site(images: list[np.ndarray], channels: list[str], nuclei: np.ndarray, cfg,
                 n_objects: int | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """``(features, cell touches-border flags)`` of one site from its corrected images and nuclei labels
    (label ``i`` = row ``i - 1``; ``n_objects`` rows, default the largest label).

    ``cfg``: the ``cellprofiler`` config section (cytoplasm channel, compartments, measurements).
    """
    from raycp.errors import InputError

    if cfg.cytoplasm_channel not in channels:
        raise InputError(f"cellprofiler.cytoplasm_channel {cfg.cytoplasm_channel} is not among {channels}",
                         fix="set it to AGP or RNA (a channel of data.channels)")
    cells = grow_cells(nuclei, images[channels.index(cfg.cytoplasm_channel)],
                       smoothing_sigma=cfg.smoothing_sigma, threshold_correction=cfg.threshold_correction)
    n = int(n_objects if n_objects is not None else nuclei.max())
    feats = measure_objects(images, channels, nuclei, cells, compartment_names=cfg.compartments,
                            measurements=cfg.measurements, texture_scale=cfg.texture_scale, n_objects=n)
    return feats, touches_border(cells, n)
