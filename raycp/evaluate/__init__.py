"""The paper's evaluation from well profiles: sphere (optional) → treatment profiles → metrics.

``evaluate(wells, ...)`` builds the treatment-level library exactly as the paper's evaluation does:
control wells and unannotated treatments are not in the library; treatments are keyed by the tuple
of the treatment columns (e.g. compound and dose); a treatment profile is the mean of its wells
(after well-level sphering, fitted on the control wells, when ``sphere_lambda`` is given). Every
well or treatment left out is counted in ``accounting``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.evaluate.metrics import (
    DEFAULT_SEP,
    FOE_PERCENTILE,
    Evaluation,
    average_precision,
    cosine_similarity,
    evaluate_profiles,
    first_hits_in_top,
    folds_of_enrichment,
    map_paper,
    match_matrix,
    precision_at_k,
    recall_at_k,
)
from raycp.profiles.io import NA_CUTOFF

__all__ = [
    "EvaluationRun",
    "Evaluation",
    "average_precision",
    "control_mask_from_query",
    "cosine_similarity",
    "evaluate",
    "evaluate_profiles",
    "first_hits_in_top",
    "folds_of_enrichment",
    "map_paper",
    "match_matrix",
    "precision_at_k",
    "recall_at_k",
    "control_eigens",
    "sweep_lambdas",
    "treatment_library",
]


@dataclass
class EvaluationRun:
    """``evaluation``: metrics and per-query tables; ``library``: the treatment profiles evaluated
    (keys, annotation, ``Metadata_n_wells``, features); ``accounting``: what was left out and why."""

    evaluation: Evaluation
    library: pd.DataFrame
    accounting: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """Summary metrics and accounting in one JSON-ready dict."""
        return {**self.evaluation.summary, "accounting": self.accounting}


_TEXT_HINT = ("metadata read from CSV is text: compare with quotes, e.g. Metadata_dose == '0' "
              "or Metadata_pert_type == 'control'")


def control_mask_from_query(wells: pd.DataFrame, query: str, source: str = "wells", *,
                            require: bool = False, what: str = "control query") -> np.ndarray:
    """Boolean mask of the wells selected by a pandas query (e.g. ``Metadata_pert_type == 'control'``).

    Raises :class:`InputError` for an invalid query, and with ``require`` when it selects no
    well (the message says that CSV metadata is text, the usual reason a numeric comparison
    selects nothing); ``what`` names the query in the message (a recipe's ``samples`` query)."""
    try:
        selected = wells.query(query)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a bad expression
        raise InputError(f"{source}: {what} {query!r} is invalid ({' '.join(str(exc).split())})",
                         fix=f"write a pandas query over the Metadata_ columns; {_TEXT_HINT}") from None
    mask = wells.index.isin(selected.index)
    if require and not mask.any():
        raise InputError(f"{source}: {what} {query!r} matched no well",
                         fix=f"check the query against the Metadata_ columns; {_TEXT_HINT}")
    return mask


def _prepare(
    wells: pd.DataFrame,
    treatment_cols: Sequence[str],
    annotation_col: str,
    control_mask: np.ndarray | None,
    features: Sequence[str] | None,
    source: str,
    na_cutoff: float = NA_CUTOFF,
):
    from raycp.profiles.io import feature_matrix_na, require_columns

    treatment_cols = list(treatment_cols)
    if not treatment_cols:
        raise InputError("no treatment column given", fix="pass --treatment-cols, e.g. Metadata_broad_sample,Metadata_mmoles_per_liter")
    require_columns(wells, treatment_cols, source, "treatment column")
    require_columns(wells, [annotation_col], source, "annotation column")
    if features is not None:
        require_columns(wells, list(features), source, "feature column")
    fm = feature_matrix_na(wells, features, na_cutoff=na_cutoff, source=source)
    ctrl = np.zeros(len(wells), dtype=bool) if control_mask is None else np.asarray(control_mask, dtype=bool)
    if ctrl.shape != (len(wells),):
        raise ValueError("control_mask must have one entry per well")
    return treatment_cols, fm, ctrl


def treatment_library(
    wells: pd.DataFrame,
    X: np.ndarray,
    treatment_cols: Sequence[str],
    annotation_col: str,
    control_mask: np.ndarray,
    features: Sequence[str],
    sep: str = DEFAULT_SEP,
) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Aggregate the treated wells (rows of ``X``) into the annotated treatment library.

    Returns the library table (keys, annotation, ``Metadata_n_wells``), its profiles and the
    accounting: wells with NaN features or a missing treatment key are dropped; treatments whose
    wells were all dropped have no wells; treatments without annotation are left out; treatments
    whose wells disagree on the annotation get the union of their tokens (counted)."""
    from raycp.profiles.aggregate import N_WELLS_COL, group_codes, group_mean

    treatment_cols = list(treatment_cols)
    treated = ~np.asarray(control_mask, dtype=bool)
    nan_wells = np.isnan(X).any(axis=1)
    key_missing = wells[treatment_cols].isna().any(axis=1).to_numpy()
    all_keys = wells.loc[treated & ~key_missing, treatment_cols].drop_duplicates()
    use = treated & ~key_missing & ~nan_wells
    sub = wells.loc[use, [*treatment_cols, annotation_col]].reset_index(drop=True)
    codes, keys = group_codes(sub, treatment_cols)
    all_codes = np.full(len(wells), -1, dtype=np.int64)
    all_codes[use] = codes
    profiles, counts = group_mean(X, all_codes, len(keys))

    ann = sub[annotation_col]
    ann = ann.where(ann.notna(), None)
    pairs = pd.DataFrame({"code": codes, "ann": ann.astype(object)})
    pairs = pairs[pairs["ann"].notna() & (pairs["ann"].astype(str).str.strip() != "")].drop_duplicates()
    pairs["ann"] = pairs["ann"].astype(str)
    n_per = pairs.groupby("code")["ann"].nunique()
    inconsistent = n_per[n_per > 1].index.to_numpy()

    def union(values: pd.Series) -> str:
        if len(values) == 1:
            return values.iloc[0]
        toks = sorted({t.strip() for v in values for t in v.split(sep) if t.strip() != ""})
        return sep.join(toks)

    merged = pairs.groupby("code")["ann"].agg(union)
    annotation = pd.Series([None] * len(keys), dtype=object)
    annotation.iloc[merged.index.to_numpy()] = merged.to_numpy()
    annotated = annotation.notna().to_numpy()

    library = keys.loc[annotated].reset_index(drop=True)
    library[annotation_col] = annotation[annotated].to_numpy()
    library[N_WELLS_COL] = counts[annotated]
    accounting = {
        "wells": int(len(wells)),
        "control_wells": int((~treated).sum()),
        "treated_wells": int(treated.sum()),
        "wells_dropped_nan": int((nan_wells & treated).sum()),
        "control_wells_dropped_nan": int((nan_wells & ~treated).sum()),
        "wells_missing_treatment": int((treated & key_missing).sum()),
        "treatments_seen": int(len(all_keys)),
        "treatments_without_wells": int(len(all_keys) - len(keys)),
        "treatments_unannotated": int((~annotated).sum()),
        "treatments_inconsistent_annotation": int(len(inconsistent)),
        "treatments_in_library": int(annotated.sum()),
    }
    return library, profiles[annotated], accounting


def evaluate(
    wells: pd.DataFrame,
    treatment_cols: Sequence[str],
    annotation_col: str,
    control_query: str | None = None,
    *,
    control_mask: np.ndarray | None = None,
    sep: str = DEFAULT_SEP,
    sphere_lambda: float | None = None,
    sphere_scope_col: str | None = None,
    sphere_eigen: dict | None = None,
    harmony_batch_col: str | None = None,
    harmony_clusters: int | None = None,
    features: Sequence[str] | None = None,
    percentile: float = FOE_PERCENTILE,
    ks: Sequence[int] = (1, 5, 10),
    na_cutoff: float = NA_CUTOFF,
    source: str = "wells",
) -> EvaluationRun:
    """The paper's biological matching evaluation of well profiles.

    ``control_query`` (or ``control_mask``) selects the control wells: they fit the sphering
    (``sphere_lambda``; per ``sphere_scope_col`` group if given, else the whole screen) and are
    not in the library. ``harmony_batch_col``: run Harmony with that column as batches (after
    sphering if both are asked). Then treated wells → treatment means → metrics.

    ``sphere_eigen``: a dict caching the controls' eigendecomposition per sphering scope
    (:func:`raycp.profiles.sphere.sphere`); a λ sweep shares one between its λs (same result).

    NaN, per feature then per well: features NaN in more than ``na_cutoff`` of the wells are
    dropped first (listed in ``accounting['features_dropped_na']``), then wells holding a NaN
    among the rest are left out and counted. Queries are the treatments with ≥ 1 other match
    (FoE, mAP) and ≥ 2 (``map_paper``, NaN when there is none); their counts are in the summary.
    Raises :class:`InputError` when fewer than 3 treatments are annotated or none has a match."""
    from raycp.profiles.harmony import harmony
    from raycp.profiles.sphere import sphere

    if control_query is not None:
        control_mask = control_mask_from_query(wells, control_query, source, require=True)
    treatment_cols, fm, ctrl = _prepare(wells, treatment_cols, annotation_col, control_mask, features, source, na_cutoff)
    feats, X = fm.features, fm.X
    if sphere_lambda is not None or harmony_batch_col is not None:
        if sphere_scope_col is not None:
            from raycp.profiles.io import require_columns

            require_columns(wells, [sphere_scope_col], source, "sphering scope column")
        ok = ~np.isnan(X).any(axis=1)
        if sphere_lambda is not None:
            groups = _sphering_groups(wells, ctrl, ok, sphere_scope_col, source)
            Xs = X.copy()
            Xs[ok] = sphere(X[ok], ctrl[ok], sphere_lambda, groups, eigen=sphere_eigen)
            X = Xs
        if harmony_batch_col is not None:
            from raycp.profiles.io import require_columns

            require_columns(wells, [harmony_batch_col], source, "Harmony batch column")
            Xh = np.full(X.shape, np.nan, dtype=X.dtype)
            Xh[ok] = harmony(X[ok], wells[harmony_batch_col].to_numpy()[ok], n_clusters=harmony_clusters)
            X = Xh
    library, profiles, accounting = treatment_library(wells, X, treatment_cols, annotation_col, ctrl, feats, sep)
    accounting.update(na_cutoff=fm.na_cutoff, features=len(feats), features_dropped_na=fm.dropped_na)
    if len(library) < 3:
        a = accounting
        raise InputError(
            f"{source}: only {len(library)} annotated treatments to evaluate (need ≥ 3): {a['wells']} wells, "
            f"{a['control_wells']} controls, {a['wells_dropped_nan']} treated wells left out for NaN features, "
            f"{a['wells_missing_treatment']} without a treatment, {a['treatments_unannotated']} treatments without "
            f"an annotation in {annotation_col!r}",
            fix="check --treatment-cols, --annotation-col and --control-query (and --na-cutoff for NaN features)",
        )
    ev = evaluate_profiles(profiles, library[annotation_col].tolist(), sep=sep, percentile=percentile, ks=ks)
    if ev.summary["n_queries_foe"] == 0:
        raise InputError(
            f"{source}: no treatment shares an annotation with another, nothing to evaluate",
            fix=f"check --annotation-col and --annotation-sep {sep!r}",
        )
    ev.queries = pd.concat([library.reset_index(drop=True), ev.queries], axis=1)
    accounting["sphere_lambda"] = sphere_lambda
    accounting["sphere_scope"] = sphere_scope_col or ("screen" if sphere_lambda is not None else None)
    accounting["harmony_batch_col"] = harmony_batch_col
    lib = pd.concat([library, pd.DataFrame(profiles, columns=feats)], axis=1)
    return EvaluationRun(evaluation=ev, library=lib, accounting=accounting)


def _sphering_groups(wells: pd.DataFrame, ctrl: np.ndarray, ok: np.ndarray, scope_col: str | None,
                     source: str) -> np.ndarray | None:
    """The sphering scope label of each usable (NaN-free) well, None for the whole screen; raises
    :class:`InputError` when no usable control well is selected."""
    if not (ctrl & ok).any():
        raise InputError(f"{source}: sphering needs control wells, none selected", fix="pass --control-query")
    return None if scope_col is None else wells[scope_col].to_numpy()[ok]


def control_eigens(
    wells: pd.DataFrame,
    treatment_cols: Sequence[str],
    annotation_col: str,
    control_query: str,
    *,
    sep: str = DEFAULT_SEP,
    sphere_scope_col: str | None = None,
    features: Sequence[str] | None = None,
    na_cutoff: float = NA_CUTOFF,
    source: str = "wells",
) -> dict:
    """The controls' eigendecomposition per sphering scope, exactly as :func:`evaluate` fits it
    (same features, same wells): pass it as ``sphere_eigen`` to evaluate many λs. ``sep`` is
    accepted so that a λ sweep passes :func:`evaluate`'s keywords unchanged."""
    from raycp.profiles.io import require_columns
    from raycp.profiles.sphere import scope_eigens

    mask = control_mask_from_query(wells, control_query, source, require=True)
    _, fm, ctrl = _prepare(wells, treatment_cols, annotation_col, mask, features, source, na_cutoff)
    if sphere_scope_col is not None:
        require_columns(wells, [sphere_scope_col], source, "sphering scope column")
    ok = ~np.isnan(fm.X).any(axis=1)
    groups = _sphering_groups(wells, ctrl, ok, sphere_scope_col, source)
    return scope_eigens(fm.X[ok], ctrl[ok], groups)


def sweep_lambdas(
    wells: pd.DataFrame,
    treatment_cols: Sequence[str],
    annotation_col: str,
    control_query: str,
    lambdas: Sequence[float],
    sep: str = DEFAULT_SEP,
    sphere_scope_col: str | None = None,
    na_cutoff: float = NA_CUTOFF,
    source: str = "wells",
) -> pd.DataFrame:
    """mAP (paper's and standard) and folds of enrichment without correction and for each λ
    (the paper's Fig. 6B sweep). Row 0 is no correction (``sphere_lambda`` NaN)."""
    rows = []
    for lam in [None, *sorted(lambdas, reverse=True)]:
        run = evaluate(wells, treatment_cols, annotation_col, control_query, sep=sep, sphere_lambda=lam,
                       sphere_scope_col=sphere_scope_col, na_cutoff=na_cutoff, source=source)
        s = run.evaluation.summary
        rows.append({"sphere_lambda": np.nan if lam is None else float(lam), "map_paper": s["map_paper"], "map": s["map"],
                     "folds_of_enrichment": s["folds_of_enrichment"]})
    return pd.DataFrame(rows)
