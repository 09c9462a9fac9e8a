"""``raycp sweep ...``: the paper's sweeps as Ray Tune experiments (issue 15).

``raycp sweep lambda``: the sphering λ curve (paper Fig. 6B) of one or more feature sets' well
profiles, one Tune trial per (feature set, λ), and the λ each selection rule picks.

``raycp sweep subsets``: one CNN trained per subset of a run's treatments by effect (weakest,
median, strongest 20 %, all; paper Fig. 3C), each extracted, profiled and evaluated over the whole
run; one Tune trial (driving a Ray Train run) per subset × other axes."""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer

from raycp.errors import InputError

app = typer.Typer(help="The paper's sweeps as Ray Tune experiments (resumable, on the cluster).",
                  no_args_is_help=True)


def _wells_args(items: list[str]) -> dict[str, str]:
    """``[NAME=]PATH`` → {name: url}; the name defaults to the file's folder (``profiles/<set>/wells.parquet``)."""
    out: dict[str, str] = {}
    for item in items:
        named = "=" in item and "/" not in item.split("=", 1)[0]
        name, _, url = item.partition("=") if named else ("", "", item)
        if not name:
            parts = url.rstrip("/").rsplit("/", 2)
            name = parts[-2] if parts[-1] == "wells.parquet" and len(parts) > 1 else parts[-1]
            name = re.sub(r"(\.csv|\.tsv|\.parquet)?(\.gz|\.bz2|\.zip|\.xz)?$", "", name) or name
        if name in out:
            raise InputError(f"two well tables are named {name!r}", fix="name them: NAME=PATH")
        out[name] = url
    return out


@app.command("lambda")
def lambda_cmd(
    wells: Annotated[Optional[list[str]], typer.Argument(help="well profiles, [NAME=]PATH (CSV or Parquet, any URL)")] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="a raycp run: every feature set's profiles/<set>/wells.parquet "
                                                "and its profiles settings as defaults")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="sweep folder (default <run>/sweeps/lambda)")] = None,
    treatment_cols: Annotated[Optional[str], typer.Option("--treatment-cols", help="columns whose tuple keys a treatment, comma-separated")] = None,
    annotation_col: Annotated[Optional[str], typer.Option("--annotation-col", help="MoA/pathway column: a match shares ≥ 1 annotation")] = None,
    annotation_sep: Annotated[Optional[str], typer.Option("--annotation-sep", help="separator of several annotations (default |)")] = None,
    control_query: Annotated[Optional[str], typer.Option("--control-query", help="pandas query selecting the control wells (they fit the sphering)")] = None,
    sphere_scope_col: Annotated[Optional[str], typer.Option("--sphere-scope-col", help="one sphering per value of this column (default: the whole screen)")] = None,
    na_cutoff: Annotated[Optional[float], typer.Option("--na-cutoff", help="drop a feature NaN in more than this fraction of wells (default 0.05)")] = None,
    lambdas: Annotated[Optional[str], typer.Option("--lambdas", help="λs, comma-separated: the grid (default: 1, 0.1 … 1e-8), or added to --preset's")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="paper (1 … 1e-8, the default grid) or jump (25 log-uniform in 1e-5…1e3)")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="saturation: the largest λ (weakest sphering) whose map_paper is within this (absolute) of the best")] = 0.01,
    resume: Annotated[bool, typer.Option("--resume", help="finish an interrupted sweep (only its missing trials)")] = False,
    num_cpus: Annotated[Optional[int], typer.Option("--num-cpus", help="CPUs of a local Ray cluster (default: all)")] = None,
) -> None:
    """The λ curve of each feature set: map_paper, mAP and FoE without correction and per λ (Ray Tune
    trials), the curves (PNG) and the selected λ (paper rule; JUMP rule when its metrics exist)."""
    from raycp import runtime
    from raycp.config import ComputeConfig
    from raycp.layout import RunLayout
    from raycp.sweep.lambdas import EvaluationSpec, lambda_grid
    from raycp.sweep.writers import read_sets, write_lambda_sweep

    defaults = _run_defaults(run) if run else {}
    sets = _wells_args(wells or [])
    if run:
        sets = {**{name: RunLayout(run).wells(name) for name in defaults.pop("feature_sets")}, **sets}
    if not sets:
        raise InputError("no well profiles to sweep", fix="give WELLS files or --run RUN")
    given = {"treatment_cols": treatment_cols and [c.strip() for c in treatment_cols.split(",") if c.strip()],
             "annotation_col": annotation_col, "annotation_sep": annotation_sep, "control_query": control_query,
             "sphere_scope_col": sphere_scope_col, "na_cutoff": na_cutoff}
    merged = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    for key in ("treatment_cols", "annotation_col", "control_query"):
        if not merged.get(key):
            raise InputError(f"no {key.replace('_', '-')} for the evaluation", fix=f"pass --{key.replace('_', '-')} (or --run RUN)")
    spec = EvaluationSpec(treatment_cols=tuple(merged["treatment_cols"]), annotation_col=merged["annotation_col"],
                          control_query=merged["control_query"], annotation_sep=merged.get("annotation_sep", "|"),
                          sphere_scope_col=merged.get("sphere_scope_col"), na_cutoff=merged.get("na_cutoff", 0.05))
    try:
        values = [float(v) for v in lambdas.split(",") if v.strip()] if lambdas else None
    except ValueError:
        raise InputError(f"--lambdas {lambdas!r} is not a list of numbers", fix="e.g. --lambdas 1,0.1,0.01") from None
    grid = lambda_grid(values, preset)
    out = output or (RunLayout(run).sweep("lambda") if run else None)
    if out is None:
        raise InputError("no output folder", fix="pass --output DIR (or --run RUN)")
    runtime.use(ComputeConfig(num_cpus=num_cpus))
    frames = read_sets(sets)
    result = write_lambda_sweep(frames, spec, grid, out, tolerance=tolerance, resume=resume, echo=typer.echo)
    for name, sel in result["selection"].items():
        none = "n/a" if sel["none"] is None else f"{sel['none']:.4f}"
        typer.echo(f"  {name}: best λ={sel['best_lambda']:g} (map_paper {sel['best']:.4f}, none {none}); "
                   f"saturated λ={sel['saturated_lambda']:g} (within {sel['tolerance']:g}); jump: "
                   f"{'n/a' if sel['jump_lambda'] is None else format(sel['jump_lambda'], 'g')}")
    a = result["accounting"]
    typer.echo(f"sweep lambda: {a['total']} trial(s) = {a['processed']} done + {a['failed']} failed "
               f"({a['restored']} restored) → {out}")
    if a["failed"]:
        raise typer.Exit(3)


def _run_defaults(run: str) -> dict:
    """The evaluation settings and feature sets of a finished raycp run (its resolved config)."""
    from raycp.stages.profiles import sphere_scope

    cfg = _run_config(run)
    p = cfg.profiles
    return {"feature_sets": [m.folder_name for m in cfg.features], "treatment_cols": list(p.treatment_cols),
            "annotation_col": p.annotation_col, "annotation_sep": p.annotation_sep, "control_query": p.control_query,
            "sphere_scope_col": sphere_scope(cfg), "na_cutoff": p.na_cutoff}




@app.command("subsets")
def subsets_cmd(
    run: Annotated[str, typer.Option("--run", help="a finished raycp run (crops/, effect/ and its config.yaml)")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="sweep folder (default <run>/sweeps/subsets)")] = None,
    subsets: Annotated[str, typer.Option("--subsets", help="subsets to train on, comma-separated: weakest, median, "
                                         "strongest (by treatment effect) and all")] = "weakest,median,strongest,all",
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="size of the weakest/median/strongest subsets "
                                                      "(default: the run's profiles.effect_fraction; paper 0.2)")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="another axis, KEY=V1,V2 (e.g. train.optim.lr="
                                                       "0.01,0.001); random search also KEY=log:LO:HI or uniform:LO:HI")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE for every trial (train, profiles or "
                                                      "inference keys, e.g. train.optim.epochs=10)")] = None,
    search: Annotated[str, typer.Option("--search", help="grid (every combination) or random (--num-samples draws)")] = "grid",
    num_samples: Annotated[int, typer.Option("--num-samples", help="random search: draws per subset")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random search")] = 0,
    asha: Annotated[bool, typer.Option("--asha", help="stop weak trials early (ASHA on the validation metric per epoch)")] = False,
    asha_metric: Annotated[str, typer.Option("--asha-metric", help="ASHA's metric: val_loss (min) or val_macro_f1 / "
                                             "val_accuracy (max)")] = "val_loss",
    max_t: Annotated[Optional[int], typer.Option("--max-t", help="ASHA: reports a trial may make (default: its epochs + "
                                                 "the evaluation; lower stops every trial before it is evaluated)")] = None,
    grace_period: Annotated[int, typer.Option("--grace-period", help="ASHA: epochs before a trial may be stopped")] = 1,
    reduction_factor: Annotated[int, typer.Option("--reduction-factor", help="ASHA: keep 1/this of the trials per rung")] = 2,
    trial_cpus: Annotated[float, typer.Option("--trial-cpus", help="CPUs a trial's own process reserves (0: memory only; "
                                              "its Train workers and extraction ask for their own)")] = 0.0,
    resume: Annotated[bool, typer.Option("--resume", help="finish an interrupted sweep (only its missing trials)")] = False,
) -> None:
    """Train one CNN per subset of the run's treatments ranked by effect (weakest, median, strongest
    20 %, all: paper Fig. 3C), extract, profile and evaluate each over the whole run → a table and a
    bar plot. Each trial is a Ray Train run inside a Ray Tune trial; other axes by --param."""
    from raycp import runtime
    from raycp.config import apply_overrides, parse_value
    from raycp.errors import ConfigError
    from raycp.io import urls
    from raycp.layout import RunLayout
    from raycp.sweep.subsets import check_key, parse_axis
    from raycp.sweep.writers import write_subset_sweep

    run = urls.input_url(run)  # trials do not run in this folder
    output = urls.input_url(output) if output else None
    base = _run_config(run)
    names = [s.strip() for s in subsets.split(",") if s.strip()]
    if search not in ("grid", "random"):
        raise InputError(f"--search {search!r}", fix="use grid or random")
    if num_samples < 1 or (search == "grid" and num_samples > 1):
        raise InputError(f"--num-samples {num_samples} with --search {search}",
                         fix="a grid runs each combination once (replicates: --param train.seed=0,1,2); "
                             "draws are for --search random")
    axes = [parse_axis(p) for p in param or []]
    if search == "grid" and any(a.distribution for a in axes):
        raise InputError("a distribution (log:/uniform:) needs --search random", fix="add --search random, or list values")
    if len({a.key for a in axes}) != len(axes):
        raise InputError("an axis is given twice", fix="give each --param KEY once")
    fixed = {}
    for item in set_ or []:
        if "=" not in item:
            raise InputError(f"--set {item!r} is not KEY=VALUE", fix="e.g. --set train.optim.epochs=10")
        key, raw = item.split("=", 1)
        fixed[check_key(key.strip(), "--set")] = parse_value(raw)
    base = apply_overrides(base, fixed)
    for axis in axes:  # every listed value must be a valid config value, before any trial starts
        for value in axis.values:
            try:
                apply_overrides(base, {axis.key: value})
            except ConfigError as exc:
                raise InputError(f"--param {axis.key}={value!r}: {exc.message}",
                                 fix=f"give {axis.key} valid values") from None
    epochs = max([base.train.optim.epochs, *[int(v) for a in axes if a.key == "train.optim.epochs"
                                             for v in (a.values or (a.high,))]])
    asha_cfg = None
    if asha:
        if asha_metric not in ("val_loss", "val_macro_f1", "val_accuracy", "train_loss", "train_macro_f1"):
            raise InputError(f"--asha-metric {asha_metric!r}", fix="use val_loss, val_macro_f1 or val_accuracy")
        asha_cfg = {"metric": asha_metric, "mode": "min" if asha_metric.endswith("loss") else "max",
                    "max_t": max_t or epochs + 1, "grace_period": grace_period, "reduction_factor": reduction_factor}
        if asha_cfg["max_t"] <= epochs:
            runtime.notice(f"--max-t {asha_cfg['max_t']}: a trial reports each of its {epochs} epoch(s) and then its "
                           "evaluation, so ASHA stops every trial that trains longer before it is evaluated")
    elif max_t is not None:
        raise InputError("--max-t is ASHA's", fix="add --asha")
    fraction = base.profiles.effect_fraction if fraction is None else fraction
    out = output or RunLayout(run).sweep("subsets")
    # Tune stops trials (ASHA) by killing their process; the Train run inside leaves its workers'
    # placement group to Ray Train's cleaner, which polls the State API that the dashboard serves
    runtime.use(base.compute.model_copy(update={"include_dashboard": True}))
    result = write_subset_sweep(run, out, base=base, subsets=names, fraction=fraction, axes=axes, fixed=fixed,
                                search=search, num_samples=num_samples, seed=seed, asha=asha_cfg,
                                trial_cpus=trial_cpus, resume=resume, echo=typer.echo)
    table = result["table"]
    if len(table):
        cols = [c for c in ("label", "state", "classes", "cells_trained", "val_macro_f1", "map_paper", "map_paper_none",
                            "map_paper_unseen", "folds_of_enrichment") if c in table.columns]
        lam = table["sphere_lambda"].dropna()
        if len(lam):
            typer.echo(f"map_paper: sphered at λ = {lam.iloc[0]:g}; map_paper_none: no correction; map_paper_unseen: "
                       "sphered, queries of treatments the model did not train on")
        typer.echo(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="—"))
    a = result["accounting"]
    typer.echo(f"sweep subsets: {a['total']} trial(s) = {a['processed']} evaluated + {a['stopped']} stopped early + "
               f"{a['failed']} failed ({a['restored']} restored) → {out}")
    if a["failed"]:
        raise typer.Exit(3)


def _run_config(run: str):
    """The resolved config of a finished raycp run (``<run>/config.yaml``), its local paths made
    absolute: trials run in Ray Tune's trial folders, not in the folder the run was started from."""
    from raycp.io import urls
    from raycp.run import load

    path = urls.join(run, "config.yaml")
    if not urls.exists(path):
        raise InputError(f"{path}: not found (is {run} a raycp run folder?)", fix="pass the run's output folder")
    cfg = load(path)

    def absolute(value: str | None) -> str | None:
        return urls.input_url(value) if value and "://" not in value and not value.startswith("/") else value

    fixed = {k: absolute(v) for k, v in {
        "data.index": cfg.data.index, "data.output": cfg.data.output, "source_run": cfg.source_run,
        "imagenet_weights": cfg.imagenet_weights, "train.model.init": cfg.train.model.init,
        "train.model.imagenet_weights": cfg.train.model.imagenet_weights}.items() if v}
    features = [m.model_dump(mode="json") for m in cfg.features]
    for f in features:
        f["path"] = absolute(f["path"])
    from raycp.config import apply_overrides

    return apply_overrides(cfg, {**fixed, "features": features})
