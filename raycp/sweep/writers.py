"""The λ sweep's outputs under its folder (any URL), atomically:

    <out>/lambda/                     the Ray Tune experiment (trials, resumable)
    <out>/lambda_curve.parquet        feature_set, sphere_lambda (NaN: none), map_paper, map, FoE, counts
    <out>/lambda_selection.json       per feature set: the paper's and the JUMP recipe's λ
    <out>/lambda_curve_<set>.png      the curve, no correction leftmost (paper Fig. 6B)
    <out>/sweep.json                  the evaluation settings, the λs and the trial accounting
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from raycp.errors import ConfigError
from raycp.io import urls
from raycp.io.outputs import jsonable, write_json, write_parquet
from raycp.sweep.lambdas import EvaluationSpec, select_lambda


def read_sets(sets: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Each feature set's well table (CSV or Parquet, any URL)."""
    from raycp.profiles.io import read_table

    return {name: read_table(url) for name, url in sets.items()}


def write_lambda_sweep(frames: dict[str, pd.DataFrame], spec: EvaluationSpec, lambdas: list[float], output: str, *,
                       tolerance: float = 0.01, resume: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run the sweep (:func:`raycp.sweep.tuning.run_lambda_sweep`) and write its outputs; returns the
    selection per feature set and the accounting. A resumed sweep must have the same settings."""
    from raycp.evaluate.plots import plot_map_vs_lambda
    from raycp.io.outputs import save_png
    from raycp.sweep.tuning import run_lambda_sweep

    settings = {"evaluation": spec.to_json(), "lambdas": lambdas, "feature_sets": sorted(frames)}
    meta = urls.join(output, "sweep.json")
    if resume and urls.exists(meta):
        import json

        old = json.loads(urls.read_bytes(meta))
        if {k: old.get(k) for k in settings} != jsonable(settings):
            raise ConfigError(f"{meta}: the sweep was started with other settings",
                              fix="resume with the same wells, λs and evaluation options, or use another --output")
    urls.ensure_writable(output)
    write_json(meta, {**settings, "state": "running"})
    result = run_lambda_sweep(frames, spec, lambdas, output, resume=resume, echo=echo)
    curve = result.curve
    write_parquet(curve, urls.join(output, "lambda_curve.parquet"))
    selection = {}
    for name, rows in curve.groupby("feature_set", sort=True):
        selection[name] = select_lambda(rows, tolerance)
        save_png(lambda path, r=rows, n=name, sel=selection[name]["best_lambda"]:
                 plot_map_vs_lambda(r, path, title=f"{n}: map_paper against sphering λ", selected=sel),
                 urls.join(output, f"lambda_curve_{name}.png"))
    write_json(urls.join(output, "lambda_selection.json"), selection)
    accounting = {"total": result.total, "processed": len(curve), "failed": len(result.failed),
                  "restored": result.restored, "failures": result.failed}
    write_json(meta, {**settings, "state": "complete" if not result.failed else "failed", "accounting": accounting})
    return {"selection": selection, "accounting": accounting, "curve": curve}
