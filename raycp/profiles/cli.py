"""``raycp profile ...``: aggregation, treatment effect, the paper's evaluation and the λ sweep.

Thin commands: parse → call the stage → write files. Bad input raises ``InputError`` (the main CLI
prints it as one line, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd
import typer

from raycp.errors import InputError
from raycp.io.outputs import jsonable, write_json, write_parquet
from raycp.io.urls import make_local_folder
from raycp.profiles.io import NA_CUTOFF

app = typer.Typer(
    help="Profiles: cells → sites → wells → treatments, sphering, treatment effect and the paper's evaluation.",
    no_args_is_help=True,
)


NaCutoffOpt = typer.Option(
    NA_CUTOFF, "--na-cutoff",
    help="Drop a feature NaN in more than this fraction of the rows before dropping rows with NaN "
         "(pycytominer's drop_na_columns rule and default; 1 keeps every feature).")


def _cols(text: str, option: str) -> list[str]:
    cols = [c.strip() for c in text.split(",") if c.strip()]
    if not cols:
        raise InputError(f"{option} is empty", fix=f"pass {option} COL[,COL...]")
    return cols


def _read_wells(path: Path) -> pd.DataFrame:
    from raycp.profiles.io import read_table

    return read_table(path)


@app.command("evaluate")
def evaluate_cmd(
    wells: Path = typer.Argument(..., help="Well-level profiles: CSV, CSV.GZ or Parquet (features: numeric non-Metadata_ columns)."),
    treatment_cols: str = typer.Option(..., "--treatment-cols", help="Columns whose tuple keys a treatment, comma-separated."),
    annotation_col: str = typer.Option(..., "--annotation-col", help="Annotation (MoA/pathway) column; matches share ≥1 token."),
    annotation_sep: str = typer.Option("|", "--annotation-sep", help="Separator of several annotations in one cell."),
    control_query: str = typer.Option(..., "--control-query", help="pandas query selecting the control wells."),
    sphere_lambda: Optional[float] = typer.Option(None, "--sphere-lambda", help="Sphere the wells with this λ (fit on controls)."),
    sphere_scope_col: Optional[str] = typer.Option(None, "--sphere-scope-col", help="Fit one sphering per value of this column (e.g. Metadata_Plate); default: whole screen."),
    harmony_col: Optional[str] = typer.Option(None, "--harmony-col", help="Run Harmony with this column (e.g. Metadata_Plate) as batches, after sphering if asked."),
    harmony_clusters: Optional[int] = typer.Option(None, "--harmony-clusters", help="Harmony clusters (paper: 300 for compound screens)."),
    plate_col: str = typer.Option("Metadata_Plate", "--plate-col", help="Plate column (UMAP colouring)."),
    output: Path = typer.Option(Path("evaluation"), "--output", help="Output folder."),
    plots: bool = typer.Option(False, "--plots/--no-plots", help="Also write the PR curve and UMAP PNGs + plots.html."),
    na_cutoff: float = NaCutoffOpt,
) -> None:
    """Sphere (optional), aggregate wells to treatments, and score them as the paper does."""
    from raycp.evaluate import evaluate

    df = _read_wells(wells)
    run = evaluate(
        df,
        _cols(treatment_cols, "--treatment-cols"),
        annotation_col,
        control_query,
        sep=annotation_sep,
        sphere_lambda=sphere_lambda,
        sphere_scope_col=sphere_scope_col,
        harmony_batch_col=harmony_col,
        harmony_clusters=harmony_clusters,
        na_cutoff=na_cutoff,
        source=str(wells),
    )
    make_local_folder(output)
    q = run.evaluation.queries
    write_parquet(q[q["is_query_map"]].reset_index(drop=True), output / "queries_map.parquet")
    write_parquet(q[q["is_query_foe"]].reset_index(drop=True), output / "queries_foe.parquet")
    write_parquet(run.library, output / "treatments.parquet")
    write_parquet(run.evaluation.pr_curve, output / "pr_curve.parquet")
    metrics = {
        **run.evaluation.summary,
        "input": str(wells),
        "treatment_cols": _cols(treatment_cols, "--treatment-cols"),
        "annotation_col": annotation_col,
        "annotation_sep": annotation_sep,
        "control_query": control_query,
        "sphere_lambda": sphere_lambda,
        "accounting": run.accounting,
    }
    if plots:
        metrics["plots"] = _evaluation_plots(df, control_query, sphere_lambda, sphere_scope_col, plate_col, run, output,
                                             na_cutoff)
    write_json(output / "metrics.json", metrics)
    s = run.evaluation.summary
    _warn_no_map_queries(s)
    _warn_dropped(run.accounting["features_dropped_na"], na_cutoff, "wells")
    typer.echo(json.dumps(jsonable({**{k: s[k] for k in ("map_paper", "map", "folds_of_enrichment", "n_treatments",
                                                         "n_queries_map", "n_queries_foe")},
                                    "features_dropped_na": run.accounting["features_dropped_na"]})))


def _warn_dropped(dropped: list[str], cutoff: float, rows: str) -> None:
    from raycp.console import warn

    if dropped:
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warn(f"{len(dropped)} feature(s) NaN in more than {cutoff:g} of the {rows} were dropped: {shown}")


def _warn_no_map_queries(summary: dict) -> None:
    from raycp.console import warn

    if summary["n_queries_map"] == 0:
        warn(f"no treatment has 2 or more other matches, so map_paper is undefined (null); mAP and folds of "
             f"enrichment use the {summary['n_queries_foe']} treatments with 1 or more")


def _evaluation_plots(df, control_query, sphere_lambda, scope_col, plate_col, run, output: Path,
                      na_cutoff: float = NA_CUTOFF) -> list[str]:
    from raycp.evaluate.plots import plot_pr_curve, plot_well_umaps, write_html

    images = [plot_pr_curve(run.evaluation.pr_curve, output / "pr_curve.png"),
              plot_well_umaps(df, output / "umap.png", control_query=control_query, sphere_lambda=sphere_lambda,
                              scope_col=scope_col, plate_col=plate_col, na_cutoff=na_cutoff)]
    write_html(output, images, run.evaluation.summary)
    return [p.name for p in images] + ["plots.html"]


@app.command("sweep")
def sweep_cmd(
    wells: Path = typer.Argument(..., help="Well-level profiles: CSV, CSV.GZ or Parquet."),
    treatment_cols: str = typer.Option(..., "--treatment-cols"),
    annotation_col: str = typer.Option(..., "--annotation-col"),
    annotation_sep: str = typer.Option("|", "--annotation-sep"),
    control_query: str = typer.Option(..., "--control-query"),
    lambdas: str = typer.Option("1,0.1,0.01,0.001,0.0001", "--lambdas", help="Sphering λ values, comma-separated."),
    sphere_scope_col: Optional[str] = typer.Option(None, "--sphere-scope-col"),
    na_cutoff: float = NaCutoffOpt,
    output: Path = typer.Option(Path("evaluation"), "--output"),
) -> None:
    """mAP and folds of enrichment without correction and for each λ; writes sweep.parquet and map_vs_lambda.png."""
    from raycp.evaluate import sweep_lambdas
    from raycp.evaluate.plots import plot_map_vs_lambda

    try:
        lams = [float(v) for v in _cols(lambdas, "--lambdas")]
    except ValueError as exc:
        raise InputError(f"--lambdas {lambdas!r} is not a list of numbers", fix="e.g. --lambdas 1,0.1,0.01") from exc
    df = _read_wells(wells)
    table = sweep_lambdas(df, _cols(treatment_cols, "--treatment-cols"), annotation_col, control_query, lams,
                          sep=annotation_sep, sphere_scope_col=sphere_scope_col, na_cutoff=na_cutoff,
                          source=str(wells))
    make_local_folder(output)
    write_parquet(table, output / "sweep.parquet")
    from raycp.profiles.io import feature_matrix_na

    fm = feature_matrix_na(df, na_cutoff=na_cutoff, source=str(wells))
    write_json(output / "sweep.json", {"input": str(wells), "lambdas": lams, **fm.accounting()})
    _warn_dropped(fm.dropped_na, na_cutoff, "wells")
    plot_map_vs_lambda(table, output / "map_vs_lambda.png")
    for row in table.to_dict("records"):
        typer.echo(json.dumps(jsonable(row)))


@app.command("aggregate")
def aggregate_cmd(
    cells: list[Path] = typer.Argument(..., help="Single-cell tables (Parquet files/folders or CSV), or a DeepProfiler "
                                                 "features folder of per-site .npz files."),
    site_cols: str = typer.Option("Metadata_Plate,Metadata_Well,Metadata_Site", "--site-cols"),
    well_cols: str = typer.Option("Metadata_Plate,Metadata_Well", "--well-cols"),
    batch_rows: int = typer.Option(65_536, "--batch-rows", help="Rows read per batch."),
    memory_mb: int = typer.Option(512, "--memory-mb", help="Target size of one on-disk partition when sites are not contiguous."),
    na_cutoff: float = NaCutoffOpt,
    output: Path = typer.Option(Path("profiles"), "--output"),
) -> None:
    """Cells → site medians → well means, streaming; writes sites.parquet, wells.parquet, aggregation.json.

    A DeepProfiler features folder (<plate>/<well>/<site>.npz, <plate>/<well>_<site>.npz, or the
    earliest <plate>_<well>_<site>.npz with key 'f') is read as it is."""
    from raycp.profiles.aggregate import aggregate_cells

    make_local_folder(output)
    res = aggregate_cells(
        cells,
        site_cols=_cols(site_cols, "--site-cols"),
        well_cols=_cols(well_cols, "--well-cols"),
        batch_rows=batch_rows,
        memory_budget_bytes=memory_mb << 20,
        spill_dir=output,
        sites_out=output / "sites.parquet",
        na_cutoff=na_cutoff,
    )
    write_parquet(res.wells, output / "wells.parquet")
    write_json(output / "aggregation.json", res.accounting)
    a = res.accounting
    _warn_dropped(a["features_dropped_na"], na_cutoff, "cells")
    typer.echo(json.dumps(jsonable({k: a[k] for k in ("cells_read", "cells_missing_key", "cells_dropped_nan", "sites",
                                                      "wells", "path", "features", "features_dropped_na")})))


@app.command("effect")
def effect_cmd(
    wells: Path = typer.Argument(..., help="Well-level profiles (CellProfiler features in the paper)."),
    treatment_cols: str = typer.Option(..., "--treatment-cols"),
    control_query: str = typer.Option(..., "--control-query"),
    plate_col: str = typer.Option("Metadata_Plate", "--plate-col"),
    sphere_lambda: float = typer.Option(0.01, "--sphere-lambda", help="Sphering λ before the distances (paper: 1e-2)."),
    no_sphere: bool = typer.Option(False, "--no-sphere", help="Use the profiles as given (already corrected)."),
    fraction: float = typer.Option(0.2, "--fraction", help="Size of each subset (paper: 20%)."),
    na_cutoff: float = NaCutoffOpt,
    output: Path = typer.Option(Path("effect"), "--output"),
) -> None:
    """Treatment effect (mean z-scored distance to the plate's median control) and the weakest/median/strongest subsets."""
    from raycp.evaluate import control_mask_from_query
    from raycp.profiles.effect import effect_of_wells, select_subsets

    df = _read_wells(wells)
    ctrl = control_mask_from_query(df, control_query, str(wells), require=True)
    res = effect_of_wells(df, _cols(treatment_cols, "--treatment-cols"), ctrl,
                          sphere_lambda=None if no_sphere else sphere_lambda, plate_col=plate_col,
                          na_cutoff=na_cutoff, source=str(wells))
    make_local_folder(output)
    write_parquet(res.treatments, output / "effect.parquet")
    make_local_folder(output / "subsets")
    subsets = select_subsets(res.treatments, fraction)
    for name, table in subsets.items():
        table.to_csv(output / "subsets" / f"{name}.csv", index=False)
    acct = {**res.accounting, "subset_sizes": {k: len(v) for k, v in subsets.items()}}
    write_json(output / "effect.json", acct)
    _warn_dropped(acct["features_dropped_na"], na_cutoff, "wells")
    typer.echo(json.dumps(jsonable({"treatments": len(res.treatments), **acct["subset_sizes"],
                                    "features_dropped_na": acct["features_dropped_na"]})))


@app.command("recipe")
def recipe_cmd(
    config: str = typer.Argument(..., help="Recipe YAML, or a preset: jump_compound, jump_orf, jump_crispr."),
    wells: Path = typer.Argument(..., help="Well-level profiles: CSV, CSV.GZ or Parquet."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: one Parquet per step, recipe.json, config.yaml."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set negcon=\"Metadata_pert_type == 'control'\"."),
) -> None:
    """Run a profile recipe (the JUMP chain or your own list of steps) on a wells table."""
    from raycp.console import warn
    from raycp.profiles.recipe import load_recipe, run_recipe

    recipe = load_recipe(config, overrides)
    res = run_recipe(recipe, wells, output).record
    na = res["na_rule"]
    if na["features_dropped_na"] or na["rows_quarantined"]:
        warn(f"before the steps: {len(na['features_dropped_na'])} feature(s) NaN in more than {na['na_cutoff']:g} of the "
             f"wells dropped, {na['rows_quarantined']} well(s) with a NaN feature quarantined (listed in recipe.json)")
    for s in res["steps"]:
        for w in s["info"].get("warnings", []):
            warn(f"step {s['step']} ({s['op']}): {w}")
        typer.echo(json.dumps(jsonable({k: s[k] for k in ("step", "op", "rows_out", "rows_quarantined", "features_in",
                                                           "features_out", "reused")})))
    typer.echo(json.dumps(jsonable({"output": str(output / res["output"]), **res["accounting"]})))


@app.command("map")
def map_cmd(
    wells: Path = typer.Argument(..., help="Well-level profiles: CSV, CSV.GZ or Parquet (e.g. a recipe's last step)."),
    pert_col: str = typer.Option(..., "--pert-col", help="Perturbation column (replicate wells share its value)."),
    control_query: Optional[str] = typer.Option(None, "--control-query", help="pandas query of the negative-control wells: phenotypic activity."),
    plate_col: str = typer.Option("Metadata_Plate", "--plate-col", help="Plate column: activity ranks replicates against the controls of the same plate."),
    target_col: Optional[str] = typer.Option(None, "--target-col", help="Target/MoA column: phenotypic consistency of the perturbations' consensus profiles."),
    target_sep: str = typer.Option("|", "--target-sep", help="Separator of several targets in one cell."),
    consistency_on: str = typer.Option("active", "--consistency-on", help="active (phenotypically active perturbations, as JUMP) or all."),
    null_size: int = typer.Option(10_000, "--null-size", help="copairs' null size per configuration (JUMP recipe: 10000)."),
    threshold: float = typer.Option(0.05, "--threshold", help="p-value threshold of below_p / below_corrected_p."),
    seed: int = typer.Option(0, "--seed", help="copairs' null seed."),
    use_ray: bool = typer.Option(False, "--ray", help="Split the plates / query blocks and the nulls across a Ray "
                                                      "cluster (RAY_ADDRESS, else a local one); the same numbers."),
    output: Path = typer.Option(Path("map"), "-o", "--output", help="Output folder."),
) -> None:
    """copairs' mAP and p-values: phenotypic activity, phenotypic consistency and the fraction retrieved."""
    from raycp.evaluate.copairs_map import retrieval_of_wells
    from raycp.evaluate.plots import plot_map_pvalue

    backend = None
    if use_ray:
        from raycp import runtime
        from raycp.evaluate import copairs_ray as backend

        runtime.use()
    df = _read_wells(wells)
    res = retrieval_of_wells(df, pert_col=pert_col, control_query=control_query, plate_col=plate_col,
                             target_col=target_col, target_sep=target_sep or None, consistency_on=consistency_on,
                             null_size=null_size, threshold=threshold, seed=seed, backend=backend, source=str(wells))
    make_local_folder(output)
    summary = {"input": str(wells), "pert_col": pert_col, "control_query": control_query, "plate_col": plate_col,
               "target_col": target_col, "consistency_on": consistency_on, "accounting": res.accounting}
    tables = {}
    for name, r in (("phenotypic_activity", res.activity), ("phenotypic_consistency", res.consistency)):
        if r is None:
            continue
        short = name.split("_")[1]
        write_parquet(r.ap, output / f"{short}_ap.parquet")
        write_parquet(r.map, output / f"{short}_map.parquet")
        summary[name] = r.summary
        tables[name] = r.map
        typer.echo(json.dumps(jsonable({k: r.summary[k] for k in ("metric", "groups", "fraction_retrieved",
                                                                   "mean_average_precision")})))
    plot_map_pvalue(tables, output / "map_pvalue.png", threshold)
    write_json(output / "map.json", summary)
