"""The sweeps' outputs under their folder (any URL), atomically. The λ sweep (``raycp sweep lambda``):

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


def _open_sweep(output: str, settings: dict, resume: bool, same: str, experiment: str, what: str) -> str:
    """``<output>/sweep.json``'s URL, once the folder is writable, before anything is written: a new
    sweep needs a folder without one (``experiment``: the Tune experiment's folder name), a resumed
    one an experiment started with ``settings`` (:class:`ConfigError` naming ``same`` otherwise)."""
    import json

    from raycp.sweep.tuning import check_experiment

    check_experiment(output, experiment, resume, what)
    meta = urls.join(output, "sweep.json")
    if resume and urls.exists(meta):
        old = json.loads(urls.read_bytes(meta))
        if {k: old.get(k) for k in settings} != jsonable(settings):
            raise ConfigError(f"{meta}: the sweep was started with other settings",
                              fix=f"resume with {same}, or use another --output")
    urls.ensure_writable(output)
    return meta


def write_lambda_sweep(frames: dict[str, pd.DataFrame], spec: EvaluationSpec, lambdas: list[float], output: str, *,
                       tolerance: float = 0.01, resume: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run the sweep (:func:`raycp.sweep.tuning.run_lambda_sweep`) and write its outputs; returns the
    selection per feature set and the accounting. A resumed sweep must have the same settings."""
    from raycp.evaluate.plots import plot_map_vs_lambda
    from raycp.io.outputs import save_png
    from raycp.sweep.tuning import run_lambda_sweep

    settings = {"evaluation": spec.to_json(), "lambdas": lambdas, "feature_sets": sorted(frames)}
    meta = _open_sweep(output, settings, resume, "the same wells, λs and evaluation options", "lambda", "a λ sweep")
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


# ------------------------------------------------------------------------- training subsets
#
#   <out>/subsets/<name>.parquet       each subset's training index (its treatments' and every control cell)
#   <out>/tune/                        the Ray Tune experiment (resumable)
#   <out>/trials/<trial_id>/           each trial's run: train/, features/cnn/, profiles/, evaluate/
#   <out>/subsets.parquet              one row per trial: subset, axes, state, training and evaluation figures
#   <out>/subsets.png                  map_paper per trained subset (paper Fig. 3C)
#   <out>/sweep.json                   the settings, each subset's treatments and the trial accounting


def subset_indices(run: str, output: str, *, subsets: list[str], fraction: float, label: str,
                   control_col: str = "Metadata_IsControl") -> tuple[dict[str, str], dict[str, list[str]]]:
    """Write each subset's training index (:func:`raycp.sweep.subsets.subset_index`) from the run's
    crops and treatment-effect ranking; returns ``({subset: index URL}, {subset: treatments})``."""
    from raycp.sweep.subsets import subset_index, subset_treatments
    from raycp.trainset.sources import read_source

    source = read_source(run, label=label, control_col=control_col)
    treatments = subset_treatments(source.effect, label, fraction, tuple(subsets))
    indices = {}
    for name, chosen in treatments.items():
        url = indices[name] = urls.join(output, "subsets", f"{name}.parquet")
        write_parquet(subset_index(source.cells, chosen, source="run", label=label, control_col=control_col), url)
    return indices, treatments


def write_subset_sweep(run: str, output: str, *, base, subsets: list[str], fraction: float, axes: list,
                       fixed: dict, search: str = "grid", num_samples: int = 1, seed: int = 0,
                       asha: dict | None = None, trial_cpus: float = 0.0, resume: bool = False,
                       echo: Callable[[str], None] = print) -> dict:
    """Prepare the subsets, run the sweep (:func:`raycp.sweep.tuning.run_subset_sweep`) and write
    its outputs; returns the table and the accounting. ``base``: the run's config with ``fixed``
    (every trial's ``--set`` overrides) applied. A resumed sweep must have the same settings."""

    from raycp import runtime
    from raycp.evaluate.plots import plot_subset_map
    from raycp.io.outputs import save_png
    from raycp.sweep.subsets import max_concurrent, results_table, trial_label
    from raycp.sweep.tuning import SubsetPlan, run_subset_sweep
    from raycp.train.trainer import uses_gpu

    settings = {"run": run, "subsets": list(subsets), "fraction": fraction,
                "axes": [jsonable(vars(a)) for a in axes], "fixed": jsonable(fixed), "search": search,
                "num_samples": num_samples, "seed": seed, "asha": jsonable(asha)}
    meta = _open_sweep(output, settings, resume, "the same run, subsets, --param, --set and search options", "tune",
                       "a subset sweep")
    label = base.train.label
    indices, treatments = subset_indices(run, output, subsets=list(subsets), fraction=fraction, label=label)
    write_json(meta, {**settings, "treatments": treatments, "state": "running"})
    runtime.connection()
    if asha and not runtime.has_state_api():
        raise ConfigError("this Ray cluster has no dashboard: a trial ASHA stops would keep its Train workers' "
                          "CPUs/GPUs and the sweep would hang",
                          fix="start the head node with --include-dashboard=true, or sweep without --asha")
    tcfg = base.train_config()
    c = tcfg.compute
    concurrent = max_concurrent(cpus=runtime.cluster_cpus(), gpus=runtime.cluster_gpus(), num_workers=c.num_workers,
                                cpus_per_worker=c.cpus_per_worker, data_cpus=c.data_cpus, use_gpu=uses_gpu(tcfg))
    plan = SubsetPlan(base=base.model_dump(mode="json"), base_run=run, output=output, indices=indices,
                      treatments=treatments)
    result = run_subset_sweep(plan, list(subsets), axes, search=search, num_samples=num_samples, seed=seed, asha=asha,
                              max_concurrent=concurrent, trial_cpus=trial_cpus, resume=resume, echo=echo)
    keys = [a.key for a in axes]
    table = results_table(result.rows, keys, {a.key: a.values for a in axes if a.values})
    for col in ("classes", "cells_trained", "epochs", "epochs_reported", "queries_unseen", "treatments_evaluated"):
        if col in table.columns:
            table[col] = table[col].astype("Int64")
    if len(table):
        table.insert(2, "label", [trial_label(r["subset"], {k: r[k] for k in keys}) for r in table.to_dict("records")])
    write_parquet(table, urls.join(output, "subsets.parquet"))
    if len(table) and table["map_paper"].notna().any():
        lam = table["sphere_lambda"].dropna()
        title = f"map_paper of the CNN trained on each subset\n(sphered at λ = {lam.iloc[0]:g}; grey: no correction)" \
            if len(lam) else None
        # the run's own CNN is a reference only for trials trained with its recipe
        same_recipe = not any(k.startswith(("train.", "crops.")) for k in [*fixed, *keys])
        baseline = _run_map_paper(run) if same_recipe else None
        save_png(lambda path: plot_subset_map(table, path, baseline=baseline, title=title),
                 urls.join(output, "subsets.png"))
    states = table["state"].value_counts().to_dict() if len(table) else {}
    accounting = {"total": result.total, "processed": int(states.get("done", 0)), "stopped": int(states.get("stopped", 0)),
                  "failed": int(states.get("failed", 0)), "restored": result.restored,
                  "failures": table.loc[table["state"] == "failed", ["trial_id", "subset", "reason"]].to_dict("records")
                  if len(table) else []}
    write_json(meta, {**settings, "treatments": treatments, "concurrent_trials": concurrent,
                      "state": "complete" if not accounting["failed"] else "failed", "accounting": accounting})
    return {"table": table, "accounting": accounting, "treatments": treatments}


def _run_map_paper(run: str) -> float | None:
    """The base run's own CNN (``cnn``), sphered: the bar plot's reference line."""
    from raycp.io.outputs import read_parquet
    from raycp.layout import RunLayout

    url = RunLayout(run).comparison
    if not urls.exists(url):
        return None
    table = read_parquet(url)
    rows = table[(table["feature_set"] == "cnn") & (table["correction"] != "none")]
    return float(rows["map_paper"].iloc[0]) if len(rows) else None
