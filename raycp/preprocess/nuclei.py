"""Nuclei centres detected on the DNA channel, for screens that come without CellProfiler output.

The paper crops 128×128 boxes centred on nuclei found by CellProfiler (Methods, "cell
segmentation": global Otsu threshold of the Hoechst image, then declumping). This is the same
recipe with scikit-image, sized from the image itself:

1. Gaussian smoothing (``smoothing_sigma``), global Otsu threshold (× ``threshold_correction``),
   holes filled;
2. typical diameter = equivalent diameter of the median connected component (or ``diameter``);
3. clumps split by a watershed of the distance transform from its local maxima, at least
   ``declump_distance_fraction`` × diameter apart;
4. objects kept when their equivalent diameter lies in [``min_diameter_fraction``,
   ``max_diameter_fraction``] × diameter and their mean intensity stands ``min_contrast``
   noise sigmas (robust: 1.4826 × MAD of the background) above the background median, so a
   blank site gives zero nuclei rather than noise blobs.

Centres are centroids, in CellProfiler's convention (``Location_Center_X`` = column, 0-based).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

X, Y = "Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"
AREA, BORDER, NUMBER = "Nuclei_AreaShape_Area", "Nuclei_TouchesImageBorder", "Nuclei_Number_Object_Number"
COLUMNS = (NUMBER, X, Y, AREA, BORDER)


def _empty() -> pd.DataFrame:
    return pd.DataFrame({NUMBER: pd.Series(dtype=np.int64), X: pd.Series(dtype=np.float64),
                         Y: pd.Series(dtype=np.float64), AREA: pd.Series(dtype=np.int64),
                         BORDER: pd.Series(dtype=bool)})


def detect_nuclei(plane: np.ndarray, *, smoothing_sigma: float = 2.0, threshold_correction: float = 1.0,
                  diameter: float | None = None, min_diameter_fraction: float = 0.35,
                  max_diameter_fraction: float = 3.0, declump_distance_fraction: float = 0.25,
                  min_contrast: float = 5.0, return_labels: bool = False):
    """Nuclei of one DNA image as a table (``COLUMNS``), one row per nucleus, in label order.

    With ``return_labels`` also the ``H×W`` int32 label image of the kept nuclei.
    """
    from scipy import ndimage as ndi
    from skimage import feature, filters, segmentation

    image = plane.astype(np.float32, copy=False)
    smooth = ndi.gaussian_filter(image, smoothing_sigma) if smoothing_sigma > 0 else image.copy()
    lo, hi = float(smooth.min()), float(smooth.max())
    empty_labels = np.zeros(plane.shape, dtype=np.int32)
    if not hi > lo:
        return (_empty(), empty_labels) if return_labels else _empty()
    threshold = float(filters.threshold_otsu(smooth)) * threshold_correction
    mask = ndi.binary_fill_holes(smooth > threshold)
    background = smooth[~mask]
    if background.size == 0:
        return (_empty(), empty_labels) if return_labels else _empty()
    bg_median = float(np.median(background))
    bg_sigma = 1.4826 * float(np.median(np.abs(background - bg_median)))
    bg_sigma = max(bg_sigma, 1e-6 * max(abs(hi), 1.0))

    components, n = ndi.label(mask)
    if n == 0:
        return (_empty(), empty_labels) if return_labels else _empty()
    if diameter is None:
        areas = np.bincount(components.ravel())[1:]
        sized = areas[areas >= 9]
        diameter = 2.0 * np.sqrt(np.median(sized if sized.size else areas) / np.pi)
    distance = ndi.distance_transform_edt(mask).astype(np.float32)
    distance = ndi.gaussian_filter(distance, 1.0)
    min_distance = max(2, int(round(declump_distance_fraction * diameter)))
    peaks = feature.peak_local_max(distance, min_distance=min_distance, labels=components,
                                   exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = segmentation.watershed(-distance, markers, mask=mask).astype(np.int32)

    index = np.arange(1, len(peaks) + 1)
    if index.size == 0:
        return (_empty(), empty_labels) if return_labels else _empty()
    area = ndi.sum_labels(np.ones_like(labels, dtype=np.int64), labels, index).astype(np.int64)
    mean_intensity = ndi.mean(smooth, labels, index)
    centres = np.array(ndi.center_of_mass(np.ones_like(labels, dtype=np.uint8), labels, index), dtype=np.float64)
    eq_diameter = 2.0 * np.sqrt(area / np.pi)
    keep = ((area > 0)
            & (eq_diameter >= min_diameter_fraction * diameter)
            & (eq_diameter <= max_diameter_fraction * diameter)
            & (np.asarray(mean_intensity) - bg_median >= min_contrast * bg_sigma))
    h, w = labels.shape
    edge = np.zeros(len(index) + 1, dtype=bool)
    for line in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        edge[np.unique(line)] = True
    border = edge[index]
    kept = index[keep]
    table = pd.DataFrame({
        NUMBER: np.arange(1, kept.size + 1, dtype=np.int64),
        X: centres[keep, 1] if kept.size else np.zeros(0),
        Y: centres[keep, 0] if kept.size else np.zeros(0),
        AREA: area[keep],
        BORDER: border[keep],
    })
    if not return_labels:
        return table
    relabel = np.zeros(len(index) + 1, dtype=np.int32)
    relabel[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
    return table, relabel[labels]


def match_centres(predicted: np.ndarray, reference: np.ndarray, tolerance: float = 10.0
                  ) -> dict[str, float]:
    """One-to-one matching of predicted vs reference centres (``N×2`` x, y) within ``tolerance`` px
    (Hungarian assignment): true positives, precision, recall and F1."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1, 2)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 2)
    tp = 0
    if len(predicted) and len(reference):
        dist = cdist(predicted, reference)
        cost = np.where(dist <= tolerance, dist, 1e9)
        rows, cols = linear_sum_assignment(cost)
        tp = int((dist[rows, cols] <= tolerance).sum())
    precision = tp / len(predicted) if len(predicted) else 0.0
    recall = tp / len(reference) if len(reference) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "predicted": int(len(predicted)), "reference": int(len(reference)),
            "precision": precision, "recall": recall, "f1": f1}
