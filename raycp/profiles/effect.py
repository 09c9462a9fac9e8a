"""Average treatment effect (ATE) and the paper's treatment subsets.

Moshkov et al. 2024, Methods "Measuring treatment effect" (on CellProfiler well profiles sphered
with λ = 1e-2):

1. per plate, the median profile of the control wells;
2. the Euclidean distance of each treated well to its plate's median control profile;
3. the mean and standard deviation of the control wells' distances to it, per plate;
4. the z-score of each treated well's distance with its plate's control statistics;
5. a treatment's effect = the mean z-score over its wells (across plates).

Treatments are ranked by effect and the weakest, median and strongest 20% are the subsets of the
paper's Table 1 / Fig. 3 experiments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.profiles.aggregate import group_codes
from raycp.profiles.io import NA_CUTOFF, feature_columns, feature_matrix, require_columns

EFFECT_COL = "ate"
SUBSETS = ("weakest", "median", "strongest")


@dataclass
class TreatmentEffect:
    """``treatments``: keys, ``n_wells``, ``ate`` (mean z), ``rank`` (1 = strongest), sorted by rank.
    ``wells``: the wells used (controls flagged ``is_control``), with ``distance`` and ``z``. ``accounting``: plates used,
    plates skipped for lack of controls (fewer than 2 control wells or zero spread), wells skipped."""

    treatments: pd.DataFrame
    wells: pd.DataFrame
    accounting: dict = field(default_factory=dict)


def treatment_effect(
    wells: pd.DataFrame,
    treatment_cols: Sequence[str],
    control_mask: np.ndarray,
    plate_col: str = "Metadata_Plate",
    features: Sequence[str] | None = None,
    ddof: int = 0,
) -> TreatmentEffect:
    """ATE of each treatment from well profiles (already batch-corrected, e.g. sphered λ = 1e-2).

    ``control_mask``: one bool per well. ``ddof``: of the control distances' standard deviation.
    A plate with fewer than 2 control wells (or identical control distances) cannot z-score:
    its treated wells are skipped and counted in ``accounting``; no usable plate at all is an
    error."""
    treatment_cols = list(treatment_cols)
    require_columns(wells, [*treatment_cols, plate_col], "wells")
    feats = list(features) if features is not None else feature_columns(wells, "wells")
    mask = np.asarray(control_mask, dtype=bool)
    if mask.shape != (len(wells),):
        raise ValueError("control_mask must have one entry per well")
    if not mask.any():
        raise InputError("treatment effect: no control wells (the control query matched nothing)", fix="check --control-query")
    X = feature_matrix(wells, feats)
    plates = wells[plate_col].to_numpy()
    dist = np.full(len(wells), np.nan)
    z = np.full(len(wells), np.nan)
    skipped: list[str] = []
    used = 0
    for plate in pd.unique(plates):
        rows = plates == plate
        ctrl = rows & mask
        if ctrl.sum() < 1:
            skipped.append(str(plate))
            continue
        med = np.median(X[ctrl], axis=0)
        d = np.sqrt(((X[rows].astype(np.float64) - med) ** 2).sum(axis=1))
        dist[rows] = d
        dc = dist[ctrl]
        sd = dc.std(ddof=ddof) if len(dc) > ddof else 0.0
        if len(dc) < 2 or not sd > 0:
            skipped.append(str(plate))
            continue
        z[rows] = (d - dc.mean()) / sd
        used += 1
    if used == 0:
        raise InputError(
            "treatment effect: no plate has at least 2 control wells with distinct distances",
            fix="check --control-query and --plate-col",
        )
    treated = ~mask
    usable = ~np.isnan(z)
    keyed = wells[treatment_cols].notna().all(axis=1).to_numpy()
    out_wells = wells.loc[usable & (keyed | mask), [plate_col, *treatment_cols]].copy()
    out_wells["is_control"] = mask[usable & (keyed | mask)]
    out_wells["distance"] = dist[usable & (keyed | mask)]
    out_wells["z"] = z[usable & (keyed | mask)]
    out_wells = out_wells.reset_index(drop=True)
    trt = out_wells[~out_wells["is_control"]].reset_index(drop=True)
    codes, keys = group_codes(trt, treatment_cols)
    counts = np.bincount(codes, minlength=len(keys))
    ate = np.bincount(codes, weights=trt["z"].to_numpy(), minlength=len(keys)) / np.maximum(counts, 1)
    table = keys.copy()
    table["n_wells"] = counts.astype(np.int64)
    table[EFFECT_COL] = ate
    table = table.sort_values(EFFECT_COL, ascending=False, kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    accounting = {
        "plates": len(pd.unique(plates)),
        "plates_used": used,
        "plates_skipped_no_controls": skipped,
        "wells_treated": int(treated.sum()),
        "wells_skipped_no_controls": int((treated & np.isnan(z)).sum()),
        "wells_skipped_missing_treatment": int((treated & usable & ~keyed).sum()),
        "treatments": len(table),
    }
    return TreatmentEffect(treatments=table, wells=out_wells, accounting=accounting)


def select_subsets(treatments: pd.DataFrame, fraction: float = 0.2, effect_col: str = EFFECT_COL) -> dict[str, pd.DataFrame]:
    """The weakest, median and strongest ``fraction`` of treatments by effect (paper: 20% each).

    Each subset is a DataFrame of the treatment rows (sorted by increasing effect); with n
    treatments and k = round(fraction·n) (at least 1): weakest = the k lowest, strongest = the k
    highest, median = the k around the middle (starting at ⌊(n − k)/2⌋)."""
    if not 0 < fraction <= 1 / 3:
        raise ValueError("fraction must be in (0, 1/3]")
    ordered = treatments.sort_values(effect_col, ascending=True, kind="stable").reset_index(drop=True)
    n = len(ordered)
    if n == 0:
        return {name: ordered.copy() for name in SUBSETS}
    k = max(1, int(round(fraction * n)))
    mid = (n - k) // 2
    return {
        "weakest": ordered.iloc[:k].reset_index(drop=True),
        "median": ordered.iloc[mid : mid + k].reset_index(drop=True),
        "strongest": ordered.iloc[n - k :].reset_index(drop=True),
    }


def effect_of_wells(
    wells: pd.DataFrame,
    treatment_cols: Sequence[str],
    control_mask: np.ndarray,
    *,
    sphere_lambda: float | None = 0.01,
    sphere_scope_col: str | None = None,
    plate_col: str = "Metadata_Plate",
    na_cutoff: float = NA_CUTOFF,
    source: str = "wells",
) -> TreatmentEffect:
    """The paper's treatment-effect flow from well profiles, used by ``raycp profile effect`` and
    ``raycp run``: NaN features then NaN wells left out (:func:`raycp.profiles.io.feature_matrix_na`),
    sphering fitted on the control wells (``sphere_lambda``; ``None`` = the profiles as given;
    one fit per ``sphere_scope_col`` value if given), then :func:`treatment_effect`.

    ``accounting`` adds the NaN rule's figures (features dropped, wells left out) and λ.
    Raises :class:`InputError` when no control well is selected."""
    from raycp.profiles.io import feature_matrix_na
    from raycp.profiles.sphere import sphere

    mask = np.asarray(control_mask, dtype=bool)
    if not mask.any():
        raise InputError(f"{source}: no control well selected", fix="check the control query")
    fm = feature_matrix_na(wells, na_cutoff=na_cutoff, source=source)
    ok, X = fm.ok, fm.X
    if sphere_lambda is not None:
        groups = None if sphere_scope_col is None else wells[sphere_scope_col].to_numpy()[ok]
        X = X.copy()
        X[ok] = sphere(X[ok], mask[ok], sphere_lambda, groups)
    numeric = set(fm.features) | set(fm.dropped_na)
    meta = [c for c in wells.columns if c not in numeric]
    frame = pd.concat([wells.loc[ok, meta].reset_index(drop=True), pd.DataFrame(X[ok], columns=fm.features)], axis=1)
    res = treatment_effect(frame, treatment_cols, mask[ok], plate_col=plate_col, features=fm.features)
    res.accounting.update({**fm.accounting(), "wells": int(len(wells)), "wells_dropped_nan": int((~ok).sum()),
                           "sphere_lambda": sphere_lambda})
    return res
