"""Simple per-site statistics that show a built screen has the intended structure (no CNN needed).

- :func:`site_features`: per channel mean, 99th percentile, spread and fine texture, plus a DNA
  threshold count of nuclei and their mean area: crude stand-ins for CellProfiler's intensity,
  texture, size and count groups (paper Methods, "CellProfiler features", Table 4).
- :func:`plate_predictability`: leave-one-out nearest-centroid accuracy of the plate from control
  sites alone — confounders (C) are visible in raw features when it beats chance.
- :func:`normalise_to_controls` + :func:`treatment_effects`: per-plate control normalisation and
  the paper's treatment-effect estimate (Methods, "Measuring treatment effect": distance of each
  well to its plate's median control, z-scored by the control wells' distances, averaged per
  treatment).
- :func:`detection_f1`: how well detected nuclei centres match the true ones (Hungarian matching).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from raycp.io.index import IS_CONTROL, PLATE, SITE, TREATMENT, WELL


def site_features(image: np.ndarray, channels: list[str] | tuple[str, ...]) -> dict[str, float]:
    """A few dozen interpretable statistics of one C×H×W site."""
    out: dict[str, float] = {}
    for c, ch in enumerate(channels):
        x = image[c].astype(np.float32)
        out[f"{ch}_mean"] = float(x.mean())
        out[f"{ch}_p99"] = float(np.percentile(x, 99))
        out[f"{ch}_std"] = float(x.std())
        out[f"{ch}_texture"] = float(np.abs(x - ndi.gaussian_filter(x, 1.0)).mean())
    dna = ndi.gaussian_filter(image[list(channels).index("DNA") if "DNA" in channels else 0].astype(np.float32), 1.0)
    from skimage.filters import threshold_otsu

    fg = dna > threshold_otsu(dna) if dna.max() > dna.min() else np.zeros(dna.shape, bool)
    labels, n = ndi.label(fg)
    out["nuclei_count"] = float(n)
    out["nucleus_area"] = float(fg.sum() / max(n, 1))
    return out


def feature_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if not c.startswith("Metadata_")]


def plate_predictability(sites: pd.DataFrame, features: list[str] | None = None) -> float:
    """Leave-one-out nearest-centroid accuracy of ``Metadata_Plate`` from the *control* sites."""
    ctrl = sites[sites[IS_CONTROL]]
    features = features or feature_columns(ctrl)
    X = ctrl[features].to_numpy(np.float64)
    X = (X - X.mean(0)) / (X.std(0) + 1e-12)
    y = ctrl[PLATE].to_numpy()
    plates = np.unique(y)
    correct = 0
    for i in range(len(X)):
        keep = np.ones(len(X), bool)
        keep[i] = False
        cents = np.stack([X[keep & (y == p)].mean(0) for p in plates])
        correct += plates[np.argmin(((cents - X[i]) ** 2).sum(1))] == y[i]
    return correct / len(X)


def normalise_to_controls(sites: pd.DataFrame, features: list[str] | None = None) -> pd.DataFrame:
    """Per plate and feature: (x − median of the plate's control sites) / (1.4826 · their MAD)."""
    features = features or feature_columns(sites)
    out = sites.copy()
    for _, idx in sites.groupby(PLATE).groups.items():
        plate = sites.loc[idx]
        ctrl = plate.loc[plate[IS_CONTROL], features]
        med = ctrl.median()
        mad = (ctrl - med).abs().median() * 1.4826
        scale = mad.where(mad > 1e-9, ctrl.std().where(ctrl.std() > 1e-9, 1.0))
        out.loc[idx, features] = ((plate[features] - med) / scale).to_numpy()
    return out


def well_profiles(sites: pd.DataFrame, features: list[str] | None = None) -> pd.DataFrame:
    """Mean of a well's sites (the paper aggregates sites to wells with the mean)."""
    features = features or feature_columns(sites)
    meta = [c for c in sites.columns if c.startswith("Metadata_") and c != SITE]
    return sites.groupby([PLATE, WELL], sort=True).agg({**{c: "first" for c in meta if c not in (PLATE, WELL)},
                                                       **{f: "mean" for f in features}}).reset_index()


def treatment_effects(wells: pd.DataFrame, features: list[str] | None = None) -> pd.Series:
    """The paper's treatment-effect estimate (mean over wells of the control-z-scored distance)."""
    features = features or feature_columns(wells)
    z_rows = []
    for _, plate in wells.groupby(PLATE):
        X = plate[features].to_numpy(np.float64)
        ctrl = plate[IS_CONTROL].to_numpy()
        centre = np.median(X[ctrl], axis=0)
        d = np.sqrt(((X - centre) ** 2).sum(1))
        mu, sd = d[ctrl].mean(), d[ctrl].std(ddof=1) if ctrl.sum() > 1 else 1.0
        z = (d - mu) / (sd if sd > 1e-12 else 1.0)
        z_rows.append(pd.Series(z[~ctrl], index=plate.loc[~ctrl, TREATMENT].to_numpy()))
    z = pd.concat(z_rows)
    return z.groupby(level=0).mean().rename("effect")


def detection_f1(pred: np.ndarray, true: np.ndarray, max_dist: float) -> tuple[float, int, int, int]:
    """(F1, true positives, predicted, true) of one-to-one matches within ``max_dist`` px."""
    from scipy.optimize import linear_sum_assignment

    pred = np.asarray(pred, np.float64).reshape(-1, 2)
    true = np.asarray(true, np.float64).reshape(-1, 2)
    if len(pred) == 0 or len(true) == 0:
        return (1.0 if len(pred) == len(true) else 0.0), 0, len(pred), len(true)
    d = np.sqrt(((pred[:, None, :] - true[None, :, :]) ** 2).sum(-1))
    cost = np.where(d <= max_dist, d, 1e6)
    r, c = linear_sum_assignment(cost)
    tp = int((d[r, c] <= max_dist).sum())
    return 2 * tp / (len(pred) + len(true)), tp, len(pred), len(true)


def stretch_8bit(image: np.ndarray, low: float = 0.05, high: float = 99.95) -> np.ndarray:
    """Each channel stretched to its own ``low``/``high`` percentiles and cut to 8 bits: the
    paper's compression (Methods, "Image preprocessing"), without illumination correction."""
    out = np.empty(image.shape, np.uint8)
    for c, plane in enumerate(image):
        lo, hi = np.percentile(plane, [low, high])
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out[c] = np.clip(np.rint((plane.astype(np.float32) - lo) * scale), 0, 255).astype(np.uint8)
    return out


def measure_screen(index_table: pd.DataFrame, channels: list[str] | tuple[str, ...], *, workers: int = 4,
                   stretched: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`site_features` of every site of an index (threads; for small screens and checks).

    With ``stretched``, also the features of the 8-bit stretched sites (:func:`stretch_8bit`),
    from the same read: ``(raw, stretched)``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from raycp.io.images import read_site

    rows = index_table.to_dict("records")

    def one(r: dict) -> tuple[dict, dict | None]:
        img = read_site([r[f"URL_{c}"] for c in channels])
        return site_features(img, channels), site_features(stretch_8bit(img), channels) if stretched else None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        feats = list(pool.map(one, rows))
    meta = index_table[[c for c in index_table.columns if c.startswith("Metadata_")]].reset_index(drop=True)
    raw = pd.concat([meta, pd.DataFrame([f for f, _ in feats])], axis=1)
    if not stretched:
        return raw
    return raw, pd.concat([meta, pd.DataFrame([g for _, g in feats])], axis=1)


def structure_report(sites: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """The figures that show the intended structure: plate predictability (raw vs normalised) and
    treatment effects by true strength class (``truth``: the treatments table)."""
    from scipy.stats import spearmanr

    features = feature_columns(sites)
    raw_acc = plate_predictability(sites, features)
    norm = normalise_to_controls(sites, features)
    norm_acc = plate_predictability(norm, features)
    effects = treatment_effects(well_profiles(norm, features), features)
    t = truth[~truth[IS_CONTROL]].set_index(TREATMENT)
    joined = t.join(effects, how="inner")
    by_class = joined.groupby("Metadata_StrengthClass")["effect"].agg(["mean", "min", "max", "count"])
    rho = float(spearmanr(joined["Metadata_Strength"], joined["effect"]).statistic) if len(joined) > 2 else float("nan")
    return {
        "plates": int(sites[PLATE].nunique()),
        "chance": 1.0 / sites[PLATE].nunique(),
        "plate_accuracy_raw": float(raw_acc),
        "plate_accuracy_normalised": float(norm_acc),
        "effect_by_class": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in by_class.to_dict("index").items()},
        "spearman_strength_effect": rho,
        "effects": joined[["Metadata_MoA", "Metadata_StrengthClass", "Metadata_Strength", "effect"]]
        .sort_values("effect", ascending=False),
    }
