"""The sphering λ sweep's core (paper Fig. 6B; JUMP profiling recipe's λ selection), numpy only.

One trial = one feature set's well profiles evaluated at one λ (or without correction) by
:func:`raycp.evaluate.evaluate`, the function ``raycp profile evaluate`` calls, so a trial's numbers
are those of a direct evaluation at that λ. The control wells' covariance is eigendecomposed once
per feature set and sphering scope (:func:`control_eigens`); a λ only rescales its eigenvalues.

Selection rules (:func:`select_lambda`):

- **paper** (Methods, "Batch correction with the sphering transform"): the λ with the best
  ``map_paper``; where the curve saturates, the largest λ whose ``map_paper`` is within
  ``tolerance`` of the best (the weakest correction that gets there).
- **jump** (broadinstitute/jump-profiling-recipe): the best mean of the negative-control and
  non-replicate mAPs (copairs' phenotypic activity). It needs copairs-exact metrics (issue 18),
  which the evaluation does not compute yet: the rule reports ``None`` with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from raycp.errors import InputError

#: The default grid: no correction, then 1, 1e-1, …, 1e-8 (the paper's Fig. 6B range and beyond).
PAPER_LAMBDAS: tuple[float, ...] = tuple(10.0 ** -k for k in range(0, 9))
#: The JUMP recipe's grid: 25 log-uniform values from 1e-5 to 1e3.
JUMP_LAMBDAS: tuple[float, ...] = tuple(float(v) for v in np.logspace(-5, 3, 25))
PRESETS = {"paper": PAPER_LAMBDAS, "jump": JUMP_LAMBDAS}
NONE = "none"
METRICS = ("map_paper", "map", "folds_of_enrichment", "n_queries_map", "n_queries_foe", "n_treatments")


@dataclass(frozen=True)
class EvaluationSpec:
    """How the wells are evaluated (the ``profiles`` section's evaluation keys)."""

    treatment_cols: tuple[str, ...]
    annotation_col: str
    control_query: str
    annotation_sep: str = "|"
    sphere_scope_col: str | None = None
    na_cutoff: float = 0.05

    def kwargs(self, source: str) -> dict:
        return dict(treatment_cols=list(self.treatment_cols), annotation_col=self.annotation_col,
                    control_query=self.control_query, sep=self.annotation_sep,
                    sphere_scope_col=self.sphere_scope_col, na_cutoff=self.na_cutoff, source=source)

    def to_json(self) -> dict:
        return {**asdict(self), "treatment_cols": list(self.treatment_cols)}


def lambda_grid(values: Sequence[float] | None = None, preset: str | None = None) -> list[float]:
    """The λs of a sweep, descending (no correction is always evaluated too). Raises
    :class:`InputError` for an unknown preset, a λ ≤ 0 or an empty grid."""
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown λ preset {preset!r}", fix=f"use one of {', '.join(PRESETS)}")
        values = list(PRESETS[preset]) + list(values or [])
    values = list(PAPER_LAMBDAS if values is None else values)
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad or not values:
        raise InputError(f"sphering λs must be finite numbers > 0, got {bad or 'none'}",
                         fix="e.g. --lambdas 1,0.1,0.01 (no correction is always evaluated)")
    return sorted(set(float(v) for v in values), reverse=True)


def control_eigens(wells: pd.DataFrame, spec: EvaluationSpec, source: str = "wells") -> dict:
    """Each sphering scope's :class:`~raycp.profiles.sphere.ControlEigen` for these wells, as
    :func:`raycp.evaluate.evaluate` fits them (:func:`raycp.evaluate.control_eigens`)."""
    from raycp.evaluate import control_eigens as fit

    return fit(wells, **spec.kwargs(source))


def trial_metrics(wells: pd.DataFrame, spec: EvaluationSpec, lam: float | str, eigen: dict | None = None,
                  source: str = "wells") -> dict:
    """One trial: the evaluation summary at ``lam`` (``"none"``: no correction)."""
    from raycp.evaluate import evaluate

    lam_value = None if lam == NONE else float(lam)
    run = evaluate(wells, sphere_lambda=lam_value, sphere_eigen=None if lam_value is None else eigen,
                   **spec.kwargs(source))
    s = run.evaluation.summary
    return {"sphere_lambda": math.nan if lam_value is None else lam_value, **{k: s[k] for k in METRICS}}


def select_lambda(curve: pd.DataFrame, tolerance: float = 0.01, metric: str = "map_paper") -> dict:
    """The paper's and the JUMP recipe's choices of λ on one feature set's curve (rows: λ, NaN = no
    correction). ``best``: the λ with the highest ``metric`` (ties: the larger λ); ``saturated``:
    the largest λ within ``tolerance`` (absolute) of the best; ``sphering_helps``: the best λ beats
    no correction."""
    lam = curve[curve["sphere_lambda"].notna()].sort_values("sphere_lambda", ascending=False)
    if lam.empty:
        raise InputError("the sweep has no λ", fix="give at least one λ")
    top = lam[metric].max()
    best = float(lam.loc[lam[metric] == top, "sphere_lambda"].max())
    saturated = float(lam.loc[lam[metric] >= top - tolerance, "sphere_lambda"].max())
    none = curve.loc[curve["sphere_lambda"].isna(), metric]
    jump_cols = {"map_negcon", "map_nonrep"}
    jump = None
    if jump_cols <= set(curve.columns):
        score = (lam["map_negcon"] + lam["map_nonrep"]) / 2
        jump = float(lam.loc[score.idxmax(), "sphere_lambda"])
    return {"metric": metric, "best_lambda": best, "best": float(top), "tolerance": tolerance,
            "saturated_lambda": saturated, "saturated": float(lam.loc[lam["sphere_lambda"] == saturated, metric].iloc[0]),
            "none": float(none.iloc[0]) if len(none) else None,
            "sphering_helps": bool(len(none) == 0 or top > float(none.iloc[0])),
            "jump_lambda": jump,
            "jump_rule": "best mean of the negative-control and non-replicate mAPs" if jump is not None else
                         "needs copairs' negative-control and non-replicate mAPs (issue 18): not computed"}
