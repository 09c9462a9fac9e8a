"""The ``evaluate`` stage: the paper's evaluation of every feature set (Methods, "Evaluation"):
treatment profiles matched by cosine similarity, a hit shares ≥1 MoA — map_paper, mAP and folds
of enrichment — without correction and sphered on the control wells, the λ curve (Fig. 6B) and
UMAPs before/after sphering (Fig. 6A/C). ``evaluate/comparison.parquet`` holds the table."""

from __future__ import annotations

import pandas as pd

from raycp.io import urls
from raycp.io.outputs import jsonable, save_png, write_json, write_parquet
from raycp.stages.base import Context, Stage
from raycp.stages.profiles import read_wells, sphere_scope


def evaluate_feature_set(ctx: Context, name: str, wells: pd.DataFrame) -> list[dict]:
    """``evaluate/<name>/{none,sphered}/`` (queries, PR curve, metrics), the λ curve and the UMAPs
    of one feature set's well profiles; returns its two rows of the comparison table."""
    from raycp.evaluate import evaluate, sweep_lambdas
    from raycp.evaluate.plots import plot_map_vs_lambda, plot_pr_curve, plot_well_umaps

    p = ctx.cfg.profiles
    folder = ctx.layout.evaluation(name)
    scope = sphere_scope(ctx.cfg)
    common = dict(treatment_cols=p.treatment_cols, annotation_col=p.annotation_col, sep=p.annotation_sep,
                  sphere_scope_col=scope, na_cutoff=p.na_cutoff, source=f"{name} wells")
    rows = []
    for label, lam in (("none", None), ("sphered", p.sphere_lambda)):
        run = evaluate(wells, control_query=p.control_query, sphere_lambda=lam, **common)
        s = run.evaluation.summary
        rows.append({"feature_set": name, "correction": label if lam is None else f"sphered λ={lam:g}",
                     "map_paper": s["map_paper"], "map": s["map"], "folds_of_enrichment": s["folds_of_enrichment"],
                     "significant_queries": s["n_queries_foe_significant_bh"], "queries": s["n_queries_foe"],
                     "treatments": s["n_treatments"]})
        sub = urls.join(folder, label)
        write_parquet(run.evaluation.queries, urls.join(sub, "queries.parquet"))
        write_parquet(run.evaluation.pr_curve, urls.join(sub, "pr_curve.parquet"))
        write_json(urls.join(sub, "metrics.json"), {**s, "accounting": run.accounting})
        save_png(lambda path, c=run.evaluation.pr_curve, lb=label: plot_pr_curve(c, path, label=f"{name} · {lb}"),
                 urls.join(sub, "pr_curve.png"))
    sweep = sweep_lambdas(wells, p.treatment_cols, p.annotation_col, p.control_query, p.lambdas,
                          sep=p.annotation_sep, sphere_scope_col=scope, na_cutoff=p.na_cutoff,
                          source=f"{name} wells")
    sweep.insert(0, "feature_set", name)
    write_parquet(sweep, urls.join(folder, "lambda_curve.parquet"))
    save_png(lambda path: plot_map_vs_lambda(sweep, path), urls.join(folder, "lambda_curve.png"))
    if p.umap:
        save_png(lambda path: plot_well_umaps(wells, path, control_query=p.control_query,
                                              sphere_lambda=p.sphere_lambda, scope_col=scope,
                                              na_cutoff=p.na_cutoff, source=f"{name} wells"),
                 urls.join(folder, "umap.png"))
    return rows


def run_evaluate(ctx: Context) -> dict:
    """Every feature set, then ``comparison.parquet``; the summary holds the comparison rows."""
    rows = []
    for model in ctx.cfg.features:
        name = model.folder_name
        ctx.echo(f"  evaluating {name}")
        rows += evaluate_feature_set(ctx, name, read_wells(ctx, name))
    write_parquet(pd.DataFrame(rows), ctx.layout.comparison)
    n = len(ctx.cfg.features)
    return jsonable({"total": n, "processed": n, "quarantined": 0, "reasons": {}, "comparison": rows})


def _science(cfg) -> dict:
    return cfg.profiles.model_dump(mode="json")


STAGE = Stage("evaluate", "evaluation (feature sets)", run_evaluate, _science, section="profiles")
