"""``raycp sweep ...``: the paper's sweeps as Ray Tune experiments (issue 15).

``raycp sweep lambda``: the sphering λ curve (paper Fig. 6B) of one or more feature sets' well
profiles, one Tune trial per (feature set, λ), and the λ each selection rule picks."""

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
    from raycp.io import urls
    from raycp.run import load
    from raycp.stages.profiles import sphere_scope

    path = urls.join(run, "config.yaml")
    if not urls.exists(path):
        raise InputError(f"{path}: not found (is {run} a raycp run folder?)", fix="pass the run's output folder")
    cfg = load(path)
    p = cfg.profiles
    return {"feature_sets": [m.folder_name for m in cfg.features], "treatment_cols": list(p.treatment_cols),
            "annotation_col": p.annotation_col, "annotation_sep": p.annotation_sep, "control_query": p.control_query,
            "sphere_scope_col": sphere_scope(cfg), "na_cutoff": p.na_cutoff}


