"""Profile operations of the JUMP recipe and pycytominer, as pure functions over a wells table.

Each operation takes a wells table (``Metadata_*`` columns + numeric feature columns) and returns an
:class:`OpResult`: the new table (``Metadata_*`` unchanged and first, features float32) and ``info``,
what the operation decided (features dropped, with the reason; rows left out, with the reason; the
statistics it fitted). Statistics are computed in float64. Rows are never dropped silently: an
operation that leaves rows out lists them under ``info["rows_quarantined"]``.

References, and which one each operation follows:

* **Variant features** (``variant_features``): jump-profiling-recipe ``select_variant_features``.
  Features with NaN or ±inf anywhere are dropped; per plate (``by``) on the ``samples`` rows the
  median and the MAD (scipy ``median_abs_deviation``, scale 1, NaN omitted); a feature is kept
  when on *every* plate MAD ≠ 0 and |MAD / median| > ``min_abs_coef_var`` (1e-3; a zero median
  counts as 0). Plates with no ``samples`` row have no statistics: the recipe drops their wells;
  here they are quarantined and listed.
* **Normalisation** (``normalize``) per plate (``by``; None = the whole table), statistics on the
  ``samples`` rows (``"all"`` or a pandas query, e.g. the negative controls), NaN omitted:
  ``standardize`` = (x − mean) / sd (ddof 0; sd ≈ 0 → 1; sklearn ``StandardScaler``, pycytominer);
  ``robustize`` = (x − median) / IQR (sklearn ``RobustScaler``: linear percentiles, IQR ≈ 0 → 1);
  ``mad_robustize`` = (x − median) / (MAD·s + ε). Which MAD: pycytominer's ``RobustMAD`` scales
  the MAD to a normal sd (``mad_scale="normal"``, s = 1.4826, ε = 1e-18, its defaults); the JUMP
  recipe's ``mad`` step uses the raw MAD (``mad_scale="raw"``, s = 1, ε = 0). With ε = 0 a zero
  MAD is an error naming the feature and the plate (run ``variant_features`` first).
* **Rank-based inverse normal transform** (``rank_int``): jump-profiling-recipe
  ``rank_int_array``: per feature over all rows, rank r (1..n), Φ⁻¹((r − c)/(n − 2c + 1)) with
  Blom's c = 3/8; ties get distinct ranks in the order of one random permutation
  (``default_rng(seed).permutation(n)``, seed 0, the same for every feature), as the recipe does.
  NaN stays NaN and the other values are ranked among themselves (the recipe gives a whole NaN
  column).
* **Feature selection**, pycytominer 1.7.1's operations and defaults, each on the features left by
  the previous one (pycytominer ``feature_select``): ``variance_threshold`` (variance > 1e-6,
  sklearn ``VarianceThreshold``), ``frequency_threshold`` (2nd / 1st most common value < 0.05 or
  unique / n < 0.01: pycytominer's earlier ``variance_threshold``, the one the JUMP recipe vendors),
  ``correlation_threshold`` (Pearson; of every pair with correlation > 0.9 the feature with the
  larger total |correlation| goes), ``drop_na_columns`` (NaN fraction > 0.05), ``blocklist``
  (pycytominer's list, shipped in ``raycp/profiles/data``), ``drop_outliers`` (max |x| > 500) —
  and the JUMP recipe's ``drop_na`` (any NaN) and ``outlier`` step (drop features whose 99th
  percentile of |x| exceeds 100, then clip to ±100; the recipe's clip works on a copy and is lost,
  a defect fixed here).
* **Sphering** (``spherize``): ``method="paper"`` is Moshkov et al.'s Q = U(Δ + λ)^−½Uᵀ
  (:mod:`raycp.profiles.sphere`); ``ZCA``, ``ZCA-cor``, ``PCA``, ``PCA-cor`` are pycytominer's
  ``Spherize`` (singular values of the centred — for ``-cor`` also scaled — reference rows plus ε,
  W = V Σ⁻¹ √(n − 1), ZCA: W Vᵀ; with n ≤ d the last singular values padded as pycytominer ≥ 1.1
  pads them, the fix for its rank-deficient ZCA). The JUMP presets fit on the negative controls.
* **Harmony** (``harmony``): :func:`raycp.profiles.harmony.harmony` with a batch column.
* **Well-position correction** (``well_position``): jump-profiling-recipe ``subtract_well_mean``:
  subtract each feature's mean over all wells at the same position (``Metadata_Well``), NaN
  omitted. (The recipe first drops the rows with a NaN feature when fewer than 100 are affected;
  here they stay, NaN where they were.)
* **Cell-count correction** (``cell_count``): jump-profiling-recipe
  ``regress_out_cell_counts_parallel``: for each feature with more than ``min_unique`` (100)
  distinct values, the residual of the least-squares fit feature ~ 1 + cell count; NaN stays NaN.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.profiles.aggregate import group_rows
from raycp.profiles.io import feature_columns, feature_matrix, feature_view, na_features, require_columns

MAD_NORMAL_SCALE = 1.4826  # pycytominer RobustMAD: median_abs_deviation(..., scale=1 / 1.4826)
BLOM_C = 3.0 / 8.0
JUMP_MIN_ABS_COEF_VAR = 1e-3
JUMP_OUTLIER_THRESHOLD = 100.0
_ZERO_SCALE = 10 * np.finfo(np.float64).eps  # sklearn _handle_zeros_in_scale
BLOCK_ROWS = 1 << 15  # rows converted to float64 at a time: memory stays ~ the table's own size


@dataclass
class OpResult:
    """``wells``: the table after the operation; ``info``: what it decided (JSON-able)."""

    wells: pd.DataFrame
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Table helpers
# --------------------------------------------------------------------------------------------
def _split(wells: pd.DataFrame, source: str) -> tuple[list[str], list[str], np.ndarray]:
    """The columns carried unchanged (``Metadata_*`` and any other non-feature column, e.g. a text
    column without the prefix), the feature columns, and the features (float32 stays float32;
    read only: an operation writes its result into a new array)."""
    feats = feature_columns(wells, source)
    gone = set(feats)
    return [c for c in wells.columns if c not in gone], feats, feature_view(wells, feats)


@contextmanager
def _quiet() -> Iterator[None]:
    """No floating-point or all-NaN-slice warnings: a column NaN on a plate gives NaN statistics,
    which the operations handle (the reference tools stay silent there too)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _blocks(n: int):
    for lo in range(0, n, BLOCK_ROWS):
        yield slice(lo, min(n, lo + BLOCK_ROWS))


def _finite_columns(X: np.ndarray) -> np.ndarray:
    ok = np.ones(X.shape[1], dtype=bool)
    for b in _blocks(len(X)):
        ok &= np.isfinite(X[b]).all(axis=0)
    return ok


def _nan_counts(X: np.ndarray) -> np.ndarray:
    out = np.zeros(X.shape[1], dtype=np.int64)
    for b in _blocks(len(X)):
        out += np.isnan(X[b]).sum(axis=0)
    return out


def _nan_mean_var(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance (ddof 0), NaN omitted, in float64, two passes over row blocks."""
    total = np.zeros(X.shape[1])
    count = np.zeros(X.shape[1])
    for b in _blocks(len(X)):
        blk = X[b].astype(np.float64)
        total += np.nansum(blk, axis=0)
        count += (~np.isnan(blk)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    sq = np.zeros(X.shape[1])
    for b in _blocks(len(X)):
        sq += np.nansum((X[b].astype(np.float64) - mean) ** 2, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return mean, sq / count


def _table(wells: pd.DataFrame, meta: list[str], feats: Sequence[str], X: np.ndarray) -> pd.DataFrame:
    """The carried columns as they were, then the features as float32 (``X`` is not copied when
    it is float32 already: an operation hands over its own result array)."""
    out = pd.DataFrame(np.asarray(X, dtype=np.float32), columns=list(feats), copy=False)
    for i, c in enumerate(meta):
        out.insert(i, c, wells[c].reset_index(drop=True))
    return out


def _drop_features(wells: pd.DataFrame, drop: Sequence[str], source: str) -> pd.DataFrame:
    """The table without the ``drop`` features (the rest untouched; features float32)."""
    meta, feats, X = _split(wells, source)
    gone = set(drop)
    keep = [i for i, f in enumerate(feats) if f not in gone]
    return _table(wells, meta, [feats[i] for i in keep], X[:, keep])


def sample_mask(wells: pd.DataFrame, samples: str, source: str = "wells") -> np.ndarray:
    """Rows selected by ``samples``: ``"all"`` or a pandas query (pycytominer's ``samples``)."""
    if samples in (None, "all"):
        return np.ones(len(wells), dtype=bool)
    from raycp.evaluate import control_mask_from_query

    return control_mask_from_query(wells.reset_index(drop=True), samples, source, require=True, what="samples query")


def _groups(wells: pd.DataFrame, by: str | None, source: str) -> list[tuple[object, np.ndarray]]:
    if by is None:
        return [(None, np.arange(len(wells)))]
    require_columns(wells, [by], source, what="group column")
    codes, uniques = pd.factorize(wells[by], sort=True)
    if (codes < 0).any():
        raise InputError(f"{source}: group column {by!r} is empty in {int((codes < 0).sum())} row(s)", fix="fill it")
    return [(uniques[codes[rows[0]]], rows) for rows in group_rows(codes)]


def _label(value) -> str:
    return "the table" if value is None else repr(value.item() if hasattr(value, "item") else value)


def _median_mad(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with _quiet():
        med = np.nanmedian(X, axis=0)
        return med, np.nanmedian(np.abs(X - med), axis=0)


# --------------------------------------------------------------------------------------------
# Variant features, normalisation, INT
# --------------------------------------------------------------------------------------------
def variant_features(wells: pd.DataFrame, *, by: str = "Metadata_Plate", samples: str = "all",
                     min_abs_coef_var: float = JUMP_MIN_ABS_COEF_VAR, source: str = "wells") -> OpResult:
    """The JUMP recipe's variant-feature selection (see the module docstring)."""
    meta, feats, X = _split(wells, source)
    finite = _finite_columns(X)
    nonfinite = [f for f, ok in zip(feats, finite) if not ok]
    ref = sample_mask(wells, samples, source)
    keep = finite.copy()
    plates_ok = np.zeros(len(wells), dtype=bool)
    stats = {}
    for g, rows in _groups(wells, by, source):
        r = rows[ref[rows]]
        if len(r) == 0:
            continue
        plates_ok[rows] = True
        med, mad = _median_mad(X[r].astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = np.abs(mad / med)
        cv[~np.isfinite(cv)] = 0.0  # the recipe's fillna(0) and inf → 0
        keep &= (mad != 0) & (cv > min_abs_coef_var)
        stats[str(g)] = {"rows": int(len(r)), "features_invariant": int(((mad == 0) | (cv <= min_abs_coef_var)).sum())}
    if not plates_ok.any():
        raise InputError(f"{source}: no plate has rows matching samples {samples!r}", fix="check the samples query")
    dropped = [f for f, k in zip(feats, keep) if not k]
    kept = [i for i, k in enumerate(keep) if k]
    if not kept:
        raise InputError(f"{source}: no feature is variant on every plate (|MAD/median| > {min_abs_coef_var:g})",
                         fix="check the samples query; lower min_abs_coef_var")
    out = _table(wells, meta, [feats[i] for i in kept], X[:, kept])
    quarantined = {}
    if not plates_ok.all():
        out = out[plates_ok].reset_index(drop=True)
        bad = sorted({str(v) for v in wells.loc[~plates_ok, by]}) if by else []
        quarantined = {"rows": int((~plates_ok).sum()), "reason": f"plate has no row matching samples {samples!r}",
                       "plates": bad}
    info = {"features_dropped": dropped, "features_dropped_nonfinite": nonfinite,
            "reason": f"MAD = 0 or |MAD/median| <= {min_abs_coef_var:g} on some plate, or NaN/inf",
            "plates": stats}
    if quarantined:
        info["rows_quarantined"] = quarantined
    return OpResult(out, info)


NORMALIZE_METHODS = ("standardize", "robustize", "mad_robustize")


def normalize(wells: pd.DataFrame, *, method: str = "mad_robustize", samples: str = "all",
              by: str | None = "Metadata_Plate", mad_scale: str = "normal", epsilon: float | None = None,
              source: str = "wells") -> OpResult:
    """Per-plate normalisation on reference rows (see the module docstring). ``epsilon`` defaults to
    pycytominer's 1e-18 with ``mad_scale="normal"`` and to 0 with ``"raw"`` (the JUMP recipe)."""
    if method not in NORMALIZE_METHODS:
        raise InputError(f"normalize method {method!r} is unknown", fix=f"use one of {list(NORMALIZE_METHODS)}")
    if mad_scale not in ("normal", "raw"):
        raise InputError(f"mad_scale {mad_scale!r} is unknown",
                         fix="use 'normal' (pycytominer, MAD × 1.4826) or 'raw' (JUMP recipe)")
    eps = (1e-18 if mad_scale == "normal" else 0.0) if epsilon is None else float(epsilon)
    meta, feats, X = _split(wells, source)
    ref = sample_mask(wells, samples, source)
    out = np.empty(X.shape, dtype=np.float32)
    for g, rows in _groups(wells, by, source):
        R = X[rows[ref[rows]]].astype(np.float64)
        if len(R) == 0:
            raise InputError(f"{source}: {by} {_label(g)} has no row matching samples {samples!r}",
                             fix="normalise on all rows (samples: all), or drop that plate (the variant_features step quarantines it)")
        with _quiet():
            if method == "standardize":
                center = np.nanmean(R, axis=0)
                scale = np.nanstd(R, axis=0)
                scale[scale < _ZERO_SCALE] = 1.0
            elif method == "robustize":
                center = np.nanmedian(R, axis=0)
                q25, q75 = np.nanpercentile(R, [25, 75], axis=0)
                scale = q75 - q25
                scale[scale < _ZERO_SCALE] = 1.0
            else:
                center, mad = _median_mad(R)
                scale = (mad / (1 / MAD_NORMAL_SCALE) if mad_scale == "normal" else mad) + eps
        if method == "mad_robustize" and eps == 0 and (scale == 0).any():
            f = feats[int(np.flatnonzero(scale == 0)[0])]
            raise InputError(f"{source}: feature {f!r} has MAD 0 on {by} {_label(g)}, so (x − median)/MAD is undefined",
                             fix="run the variant_features step first, or set epsilon > 0")
        for lo in range(0, len(rows), BLOCK_ROWS):
            r = rows[lo:lo + BLOCK_ROWS]
            out[r] = (X[r].astype(np.float64) - center) / scale
    return OpResult(_table(wells, meta, feats, out),
                    {"method": method, "samples": samples, "by": by, "mad_scale": mad_scale if method == "mad_robustize" else None,
                     "epsilon": eps if method == "mad_robustize" else None, "reference_rows": int(ref.sum())})


def sortable_bits(v: np.ndarray) -> np.ndarray:
    """float32 → uint64 holding an order-preserving 32-bit code: a < b ⇔ code(a) < code(b), equal
    values equal codes (−0.0 counted as +0.0, as comparisons count it); no NaN."""
    bits = (np.asarray(v, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    bits = bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return bits.astype(np.uint64)


def _stable_order(v: np.ndarray) -> np.ndarray:
    """``np.argsort(v, kind="stable")`` (no NaN). For float32, one unstable sort of unique 64-bit
    keys (order-preserving bits of the value, then the position), several times faster."""
    if v.dtype != np.float32 or len(v) >= 2**32:
        return np.argsort(v, kind="stable")
    keys = (sortable_bits(v) << np.uint64(32)) | np.arange(len(v), dtype=np.uint64)
    keys.sort()
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)


def rank_int(wells: pd.DataFrame, *, c: float = BLOM_C, seed: int = 0, source: str = "wells") -> OpResult:
    """Rank-based inverse normal transform per feature (see the module docstring)."""
    from scipy.special import ndtri

    meta, feats, X = _split(wells, source)
    n = len(X)
    perm = np.random.default_rng(seed).permutation(n)
    out = np.full(X.shape, np.nan, dtype=np.float32)
    phi = ndtri((np.arange(1, n + 1) - c) / (n - 2 * c + 1))  # Φ⁻¹ of each rank (no NaN: m = n)

    def slab(j0: int, j1: int) -> None:
        cols = np.ascontiguousarray(X[perm, j0:j1].T)  # the recipe's shuffle: ties ranked in the permuted order
        res = np.full(cols.shape, np.nan)
        for t, col in enumerate(cols):
            ok = ~np.isnan(col)
            m = int(ok.sum())
            if m == 0:
                continue
            if m == n:
                res[t, _stable_order(col)] = phi
            else:
                rank_phi = ndtri((np.arange(1, m + 1) - c) / (m - 2 * c + 1))
                sub = np.empty(m)
                sub[_stable_order(col[ok])] = rank_phi
                res[t, ok] = sub
        out[perm, j0:j1] = res.T

    step = 32
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:  # sorts release the GIL
        list(pool.map(lambda j: slab(j, min(j + step, X.shape[1])), range(0, X.shape[1], step)))
    return OpResult(_table(wells, meta, feats, out), {"c": c, "seed": seed, "ties": "ordinal after permutation"})


# --------------------------------------------------------------------------------------------
# Feature selection
# --------------------------------------------------------------------------------------------
def _ref_matrix(wells: pd.DataFrame, feats: Sequence[str], samples: str, source: str) -> np.ndarray:
    """The ``samples`` rows' features in the table's dtype (statistics are accumulated in float64)."""
    m = sample_mask(wells, samples, source)
    return feature_view(wells, feats) if m.all() else feature_matrix(wells[m], feats)


def excluded_variance(X: np.ndarray, feats: Sequence[str], min_variance: float = 1e-6) -> list[str]:
    """pycytominer ``variance_threshold``: features whose variance (NaN omitted) is ≤ ``min_variance``."""
    if min_variance < 0:
        raise InputError(f"min_variance must be ≥ 0, not {min_variance}", fix="pycytominer's default is 1e-6")
    with _quiet():
        _, var = _nan_mean_var(X)
        keep = var > min_variance
        if min_variance == 0:
            keep &= (np.nanmax(X, axis=0) - np.nanmin(X, axis=0)) > 0
    return [f for f, k in zip(feats, keep) if not k]


def excluded_frequency(X: np.ndarray, feats: Sequence[str], freq_cut: float = 0.05, unique_cut: float = 0.01) -> list[str]:
    """pycytominer ``frequency_threshold``: 2nd / 1st most common value < ``freq_cut`` (0 with one
    value), or distinct values / rows < ``unique_cut`` (NaN not counted as a value)."""
    n = X.shape[0]

    def low(j0: int, j1: int) -> list[bool]:
        flags = []
        for col in np.ascontiguousarray(X[:, j0:j1].T):
            col = np.sort(col[~np.isnan(col)])
            counts = np.diff(np.flatnonzero(np.concatenate([[True], col[1:] != col[:-1], [True]])))
            top = np.sort(counts)[::-1]
            ratio = 0.0 if len(top) < 2 else top[1] / top[0]
            flags.append(bool(ratio < freq_cut or len(counts) / n < unique_cut))
        return flags

    step = 32
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:  # sorts release the GIL
        flags = [f for part in pool.map(lambda j: low(j, min(j + step, X.shape[1])), range(0, X.shape[1], step)) for f in part]
    return [f for f, bad in zip(feats, flags) if bad]


def correlation_matrix(X: np.ndarray, method: str = "pearson") -> np.ndarray:
    """Feature × feature correlation (float64). Without NaN: Pearson of the columns (Spearman: of
    their average ranks); with NaN, pandas' pairwise-complete ``DataFrame.corr`` (as pycytominer)."""
    if method not in ("pearson", "spearman"):
        raise InputError(f"correlation method {method!r} is not supported", fix="use pearson or spearman")
    if not _finite_columns(X).all():
        return pd.DataFrame(X).corr(method=method).to_numpy()
    if method == "spearman":
        from scipy.stats import rankdata

        X = rankdata(X, axis=0)
    mean, _ = _nan_mean_var(X)
    C = np.zeros((X.shape[1], X.shape[1]))
    for b in _blocks(len(X)):
        Z = X[b].astype(np.float64) - mean
        C += Z.T @ Z
    d = np.sqrt(np.diag(C))
    with np.errstate(divide="ignore", invalid="ignore"):
        C = C / d[:, None] / d[None, :]
    return np.clip(C, -1.0, 1.0)


def excluded_correlation(X: np.ndarray, feats: Sequence[str], threshold: float = 0.9, method: str = "pearson") -> list[str]:
    """pycytominer ``correlation_threshold``: for every pair (i > j) with correlation > ``threshold``
    (signed, as pycytominer compares it), the feature ranked later by total |correlation| (pandas'
    ``sort_values`` order) is excluded."""
    if not 0 <= threshold <= 1:
        raise InputError(f"correlation threshold must be in [0, 1], not {threshold}", fix="pycytominer's default is 0.9")
    C = correlation_matrix(X, method)
    order = pd.Series(np.abs(C).sum(axis=0)).sort_values().index.to_numpy()
    position = np.empty(len(feats), dtype=np.int64)
    position[order] = np.arange(len(feats))
    a, b = np.nonzero(np.tril(C > threshold, k=-1))
    drop = np.where(position[a] > position[b], a, b)
    gone = set(drop.tolist())
    return [f for i, f in enumerate(feats) if i in gone]


def excluded_na(X: np.ndarray, feats: Sequence[str], cutoff: float = 0.05) -> list[str]:
    """pycytominer ``get_na_columns``: NaN fraction > ``cutoff`` (:func:`raycp.profiles.io.na_features`)."""
    try:
        return na_features(_nan_counts(X), len(X), feats, cutoff)
    except ValueError:
        raise InputError(f"NaN cutoff must be in [0, 1], not {cutoff}", fix="pycytominer's default is 0.05") from None


def default_blocklist() -> list[str]:
    """pycytominer's blocklist (``pycytominer/data/blocklist_features.txt``, BSD-3), shipped with raycp."""
    text = resources.files("raycp.profiles").joinpath("data/blocklist_features.txt").read_text()
    return [line.strip() for line in text.splitlines()[1:] if line.strip()]


def excluded_outliers(X: np.ndarray, feats: Sequence[str], cutoff: float = 500.0) -> list[str]:
    """pycytominer ``drop_outlier_features``: max |x| or |min x| > ``cutoff``."""
    with _quiet():
        big = (np.abs(np.nanmax(X, axis=0)) > cutoff) | (np.abs(np.nanmin(X, axis=0)) > cutoff)
    return [f for f, b in zip(feats, big) if b]


FEATURE_SELECT_OPS = ("variance_threshold", "frequency_threshold", "correlation_threshold", "drop_na_columns",
                      "blocklist", "drop_outliers", "drop_na")


def feature_select(wells: pd.DataFrame, *, operations: Sequence[str] = ("variance_threshold",), samples: str = "all",
                   min_variance: float = 1e-6, freq_cut: float = 0.05, unique_cut: float = 0.01,
                   corr_threshold: float = 0.9, corr_method: str = "pearson", na_cutoff: float = 0.05,
                   blocklist: Sequence[str] | None = None, outlier_cutoff: float = 500.0,
                   source: str = "wells") -> OpResult:
    """pycytominer's ``feature_select``: the operations in order, each on the features the earlier
    ones left, on the ``samples`` rows; pycytominer's defaults. ``drop_na`` (the JUMP recipe's last
    feature-selection step) drops any feature with a NaN."""
    ops = [operations] if isinstance(operations, str) else list(operations)
    unknown = [o for o in ops if o not in FEATURE_SELECT_OPS]
    if unknown:
        raise InputError(f"feature_select operation {unknown[0]!r} is unknown", fix=f"use some of {list(FEATURE_SELECT_OPS)}")
    feats = feature_columns(wells, source)
    excluded: dict[str, list[str]] = {}
    for op in ops:
        X = _ref_matrix(wells, feats, samples, source) if op != "blocklist" else None
        if op == "variance_threshold":
            ex = excluded_variance(X, feats, min_variance)
        elif op == "frequency_threshold":
            ex = excluded_frequency(X, feats, freq_cut, unique_cut)
        elif op == "correlation_threshold":
            ex = excluded_correlation(X, feats, corr_threshold, corr_method)
        elif op == "drop_na_columns":
            ex = excluded_na(X, feats, na_cutoff)
        elif op == "drop_na":
            ex = excluded_na(X, feats, 0.0)
        elif op == "drop_outliers":
            ex = excluded_outliers(X, feats, outlier_cutoff)
        else:
            block = set(default_blocklist() if blocklist is None else blocklist)
            ex = [f for f in feats if f in block]
        excluded[op] = ex
        gone = set(ex)
        feats = [f for f in feats if f not in gone]
        if not feats:
            raise InputError(f"{source}: feature selection ({op}) leaves no feature", fix="check the thresholds")
    all_gone = [f for op in ops for f in excluded[op]]
    return OpResult(_drop_features(wells, all_gone, source),
                    {"operations": ops, "samples": samples, "excluded": excluded, "features_dropped": all_gone,
                     "features_kept": len(feats)})


def outlier_features(wells: pd.DataFrame, *, threshold: float = JUMP_OUTLIER_THRESHOLD, quantile: float = 0.99,
                     clip: bool = True, source: str = "wells") -> OpResult:
    """The JUMP recipe's ``outlier`` step: drop features whose ``quantile`` of |x| (linear, NaN
    omitted) exceeds ``threshold``, then clip the rest to ±``threshold`` (the recipe means to clip,
    but clips a copy; here the clip is applied)."""
    meta, feats, X = _split(wells, source)
    with _quiet():
        q = np.array([np.nanquantile(np.abs(X[:, j].astype(np.float64)), quantile) for j in range(X.shape[1])])
    big = q > threshold
    keep = np.flatnonzero(~big)
    if not len(keep):
        raise InputError(f"{source}: every feature has |x| above {threshold:g} at the {quantile:g} quantile",
                         fix="normalise first (the JUMP recipe runs this after mad)")
    Y = X[:, keep].astype(np.float32, copy=False)  # X[:, keep] is a new, writeable array already
    clipped = 0
    if clip:
        for b in _blocks(len(Y)):
            clipped += int((np.abs(Y[b]) > threshold).sum())
            np.clip(Y[b], -threshold, threshold, out=Y[b])
    return OpResult(_table(wells, meta, [feats[i] for i in keep], Y),
                    {"features_dropped": [f for f, b in zip(feats, big) if b], "values_clipped": clipped,
                     "threshold": threshold, "quantile": quantile,
                     "reason": f"{quantile:g} quantile of |x| > {threshold:g}"})


# --------------------------------------------------------------------------------------------
# Sphering, Harmony, well position, cell count
# --------------------------------------------------------------------------------------------
SPHERIZE_METHODS = ("paper", "ZCA", "ZCA-cor", "PCA", "PCA-cor")


@dataclass(frozen=True)
class PycytominerSpherer:
    """pycytominer's ``Spherize`` fitted: ``apply(X) = ((X − mean) / scale) @ W``."""

    mean: np.ndarray
    scale: np.ndarray
    W: np.ndarray
    method: str

    def apply(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.W


def fit_pycytominer_spherize(R: np.ndarray, method: str = "ZCA", epsilon: float = 1e-6, center: bool = True) -> PycytominerSpherer:
    """Fit pycytominer's ``Spherize`` on reference rows ``R`` (n × d), in float64.

    Raises :class:`InputError` for NaN/inf, a zero-variance feature with a ``-cor`` method, or a
    rank-deficient R (pycytominer's checks)."""
    R = np.asarray(R, dtype=np.float64)
    if not np.isfinite(R).all():
        raise InputError("sphering: reference rows hold NaN or inf", fix="run feature selection (drop_na) first")
    n, d = R.shape
    mean = R.mean(axis=0) if center or method.endswith("-cor") else np.zeros(d)
    scale = np.ones(d)
    if method.endswith("-cor"):
        scale = R.std(axis=0)
        if (scale == 0).any():
            raise InputError("sphering (ZCA-cor/PCA-cor): a feature has zero variance on the reference rows",
                             fix="run the variant_features or variance_threshold step first")
        scale[scale < _ZERO_SCALE] = 1.0
    Z = (R - mean) / scale
    full = n < d
    _, S, Vt = np.linalg.svd(Z, full_matrices=full)
    r = int((S > S.max(initial=0) * max(n, d) * np.finfo(np.float64).eps).sum())  # numpy's matrix_rank rule
    if not ((r == d) or (center and r == n - 1) or (not center and r == n)):
        raise InputError(f"sphering: the reference rows are not full rank (n = {n}, d = {d}, rank {r})",
                         fix="remove linearly dependent features (correlation_threshold) or add reference wells")
    if n <= d:
        S = np.concatenate((S[:r], np.repeat(S[r - 1], d - r)))
    S = S + epsilon
    W = (Vt / S[:, None]).T * np.sqrt(n - 1)
    if method.startswith("ZCA"):
        W = W @ Vt
    return PycytominerSpherer(mean=mean, scale=scale, W=W, method=method)


def spherize(wells: pd.DataFrame, *, method: str = "ZCA-cor", samples: str = "all", epsilon: float = 1e-6,
             lam: float = 1e-2, by: str | None = None, center: bool = True, source: str = "wells") -> OpResult:
    """Sphering fitted on the ``samples`` rows (per ``by`` group, or the whole table), applied to
    all rows. ``method="paper"`` uses λ = ``lam``; the pycytominer methods use ``epsilon``. The
    PCA methods name their outputs ``PC1``… as pycytominer does."""
    if method not in SPHERIZE_METHODS:
        raise InputError(f"sphering method {method!r} is unknown", fix=f"use one of {list(SPHERIZE_METHODS)}")
    meta, feats, X = _split(wells, source)
    ref = sample_mask(wells, samples, source)
    d = X.shape[1]
    out = np.empty((len(X), d), dtype=np.float32)
    warnings_: list[str] = []
    for g, rows in _groups(wells, by, source):
        R = X[rows[ref[rows]]].astype(np.float64)
        if len(R) == 0:
            raise InputError(f"{source}: {by} {_label(g)} has no row matching samples {samples!r}",
                             fix="sphere the whole table (by: null) or add reference wells")
        if len(R) < d:
            warnings_.append(f"{by or 'table'} {_label(g)}: {len(R)} reference wells for {d} features — the sphered "
                             "profiles of the other wells are dominated by the directions the reference does not span")
        if method == "paper":
            from raycp.profiles.sphere import fit_sphere

            spherer = fit_sphere(R, lam)
        else:
            spherer = fit_pycytominer_spherize(R, method, epsilon, center)
        for lo in range(0, len(rows), BLOCK_ROWS):
            r = rows[lo:lo + BLOCK_ROWS]
            out[r] = spherer.apply(X[r].astype(np.float64))
    names = [f"PC{i}" for i in range(1, d + 1)] if method.startswith("PCA") else feats
    return OpResult(_table(wells, meta, names, out),
                    {"method": method, "samples": samples, "by": by, "reference_rows": int(ref.sum()),
                     **({"lambda": lam} if method == "paper" else {"epsilon": epsilon}),
                     **({"warnings": warnings_} if warnings_ else {})})


def harmony_op(wells: pd.DataFrame, *, batch: str = "Metadata_Batch", n_clusters: int | None = None,
               n_components: int | None = None, theta: float = 2.0, max_iter: int = 10, seed: int = 0,
               source: str = "wells") -> OpResult:
    """Harmony with ``batch`` as the batch column (:func:`raycp.profiles.harmony.harmony`)."""
    from raycp.profiles.harmony import harmony

    meta, feats, X = _split(wells, source)
    if batch not in wells.columns:
        raise InputError(f"{source}: batch column {batch!r} not found", fix=f"pass an existing column (metadata: {meta[:12]})")
    n_batches = wells[batch].nunique()
    if n_batches < 2:
        raise InputError(f"{source}: Harmony needs at least 2 values of {batch!r}, the table has {n_batches}",
                         fix="drop the harmony step (one batch needs no batch correction) or name another batch column")
    Z = harmony(X, wells[batch].to_numpy(), n_clusters=n_clusters, n_components=n_components, theta=theta,
                max_iter=max_iter, random_state=seed)
    names = feats if Z.shape[1] == len(feats) else [f"harmony_{i}" for i in range(Z.shape[1])]
    return OpResult(_table(wells, meta, names, Z), {"batch": batch, "n_clusters": n_clusters, "n_components": n_components,
                                                    "theta": theta, "max_iter": max_iter, "seed": seed})


def well_position(wells: pd.DataFrame, *, well_col: str = "Metadata_Well", source: str = "wells") -> OpResult:
    """Subtract each feature's mean over the wells at the same position (NaN omitted)."""
    meta, feats, X = _split(wells, source)
    out = np.empty(X.shape, dtype=np.float32)
    groups = _groups(wells, well_col, source)
    if all(len(rows) == 1 for _, rows in groups):
        raise InputError(f"{source}: every {well_col} position holds one well (one plate), so subtracting the "
                         "position's mean would zero every feature",
                         fix="drop the well_position step for a single plate (it corrects positions across plates)")
    for _, rows in groups:
        R = X[rows].astype(np.float64)
        with _quiet():
            out[rows] = R - np.nanmean(R, axis=0)
    return OpResult(_table(wells, meta, feats, out), {"well_col": well_col, "positions": len(groups)})


def cell_count(wells: pd.DataFrame, *, count_col: str = "Metadata_n_cells", min_unique: int = 100,
               source: str = "wells") -> OpResult:
    """Regress the cell count out of every feature with more than ``min_unique`` distinct values
    (least squares with intercept, rows where both are defined; the residual replaces the value)."""
    meta, feats, X = _split(wells, source)
    if count_col not in wells.columns:
        raise InputError(f"{source}: cell-count column {count_col!r} not found",
                         fix="pass the column holding the number of cells per well (raycp aggregate writes Metadata_n_cells)")
    cc = pd.to_numeric(wells[count_col], errors="coerce").to_numpy(dtype=np.float64)
    out = X.astype(np.float32)  # a copy
    regressed = []
    for j, f in enumerate(feats):
        y = X[:, j].astype(np.float64)
        if pd.Series(y).nunique() <= min_unique:
            continue
        ok = ~np.isnan(y) & ~np.isnan(cc)
        if ok.sum() < 2:
            continue
        x0 = cc[ok] - cc[ok].mean()
        sxx = x0 @ x0
        if sxx == 0:
            continue
        slope = (x0 @ (y[ok] - y[ok].mean())) / sxx
        out[ok, j] = y[ok] - y[ok].mean() - slope * x0
        regressed.append(f)
    return OpResult(_table(wells, meta, feats, out), {"count_col": count_col, "min_unique": min_unique,
                                                      "features_regressed": len(regressed),
                                                      "features_not_regressed": len(feats) - len(regressed)})
