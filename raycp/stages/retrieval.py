"""The ``retrieval`` stage: the JUMP papers' metrics per feature set — copairs' mAP with p-values
for phenotypic activity (a treatment's wells against the control wells of their plates) and
phenotypic consistency (treatments sharing an annotation), and the fraction retrieved — on the
well profiles, after the profile recipe ``retrieval.recipe`` when one is set
(:mod:`raycp.evaluate.copairs_map`, :mod:`raycp.profiles.recipe`).

Outputs per feature set under ``retrieval/<set>/``: ``activity_ap.parquet``,
``activity_map.parquet``, ``consistency_ap.parquet``, ``consistency_map.parquet`` (copairs'
columns), ``map_pvalue.png`` (mAP vs −log10 p), ``summary.json``; with a recipe, ``recipe/`` holds
its steps. ``retrieval/summary.parquet`` holds one row per feature set."""

from __future__ import annotations

import hashlib
import io

import pandas as pd

from raycp.io import urls
from raycp.io.outputs import jsonable, save_png, write_json, write_parquet
from raycp.stages.base import Context, Stage

PERT_COL = "Metadata_perturbation"


def perturbation_key(wells: pd.DataFrame, treatment_cols: list[str]) -> pd.Series:
    """One text key per treatment (the treatment columns joined with " · "; the column itself
    when there is one), NaN where a treatment column is empty."""
    if len(treatment_cols) == 1:
        return wells[treatment_cols[0]]
    key = wells[treatment_cols].astype(str).agg(" · ".join, axis=1)
    return key.where(wells[treatment_cols].notna().all(axis=1))


def retrieval_of_feature_set(ctx: Context, name: str) -> dict:
    """Recipe (optional), activity and consistency of one feature set; returns its summary row."""
    from raycp.evaluate.copairs_map import retrieval_of_wells
    from raycp.evaluate.plots import plot_map_pvalue

    r, p = ctx.cfg.retrieval, ctx.cfg.profiles
    folder = urls.join(ctx.folder("retrieval"), name)
    raw = urls.read_bytes(ctx.layout.wells(name))  # read once: the table, and the recipe's input digest
    wells = pd.read_parquet(io.BytesIO(raw))
    row: dict = {"feature_set": name, "wells": len(wells)}
    if r.recipe:
        from raycp.profiles.recipe import load_recipe, run_recipe

        recipe = load_recipe(r.recipe).model_copy(update={"negcon": p.control_query})  # the run's controls
        done = run_recipe(recipe, wells, urls.join(folder, "recipe"), input_digest=hashlib.sha256(raw).hexdigest())
        record, wells = done.record, done.wells
        row.update(recipe=recipe.name, recipe_wells_quarantined=record["accounting"]["rows_quarantined"],
                   recipe_features=record["accounting"]["features_output"])
    wells = wells.assign(**{PERT_COL: perturbation_key(wells, p.treatment_cols)})
    backend = None
    if r.ray:
        from raycp.evaluate import copairs_ray as backend
    res = retrieval_of_wells(wells, pert_col=PERT_COL, control_query=p.control_query, plate_col=r.plate_col,
                             target_col=p.annotation_col, target_sep=p.annotation_sep, consistency_on=r.consistency_on,
                             null_size=r.null_size, threshold=r.threshold, seed=r.seed, backend=backend,
                             source=f"{name} wells")
    tables = {}
    for metric, result in (("activity", res.activity), ("consistency", res.consistency)):
        write_parquet(result.ap, urls.join(folder, f"{metric}_ap.parquet"))
        write_parquet(result.map, urls.join(folder, f"{metric}_map.parquet"))
        tables[f"phenotypic_{metric}"] = result.map
        row[f"{metric}_fraction_retrieved"] = result.summary["fraction_retrieved"]
        row[f"{metric}_mean_map"] = result.summary["mean_average_precision"]
        row[f"{metric}_groups"] = result.summary["groups"]
    row["wells_quarantined_nan"] = res.accounting["wells_quarantined_nan"]
    save_png(lambda path: plot_map_pvalue(tables, path, r.threshold), urls.join(folder, "map_pvalue.png"))
    write_json(urls.join(folder, "summary.json"), jsonable({**row, "accounting": res.accounting,
                                                            "activity": res.activity.summary,
                                                            "consistency": res.consistency.summary}))
    return row


def run_retrieval(ctx: Context) -> dict:
    r = ctx.cfg.retrieval
    if not r.enabled:
        return {"total": 0, "processed": 0, "quarantined": 0, "reasons": {}, "skipped": "retrieval.enabled is false"}
    rows = []
    for model in ctx.cfg.features:
        ctx.echo(f"  phenotypic activity and consistency of {model.folder_name}")
        rows.append(retrieval_of_feature_set(ctx, model.folder_name))
    write_parquet(pd.DataFrame(rows), urls.join(ctx.folder("retrieval"), "summary.parquet"))
    wells = sum(row["wells"] for row in rows)
    lost = sum(row["wells_quarantined_nan"] + row.get("recipe_wells_quarantined", 0) for row in rows)
    reasons = {}
    if sum(row["wells_quarantined_nan"] for row in rows):
        reasons["well profile has NaN features"] = sum(row["wells_quarantined_nan"] for row in rows)
    if sum(row.get("recipe_wells_quarantined", 0) for row in rows):
        reasons["recipe step left the well out (see recipe.json)"] = sum(row.get("recipe_wells_quarantined", 0) for row in rows)
    return jsonable({"total": wells, "processed": wells - lost, "quarantined": lost, "reasons": reasons, "feature_sets": rows})


def _science(cfg) -> dict:
    p = cfg.profiles
    recipe = None
    if cfg.retrieval.recipe:  # the recipe's steps, not its file name: an edited file re-runs the stage
        from raycp.profiles.recipe import load_recipe

        recipe = load_recipe(cfg.retrieval.recipe).model_dump(mode="json", exclude={"negcon"})
    return {"retrieval": cfg.retrieval.model_dump(mode="json", exclude={"ray"}), "recipe_steps": recipe,
            "treatment_cols": list(p.treatment_cols),
            "annotation_col": p.annotation_col, "annotation_sep": p.annotation_sep, "control_query": p.control_query,
            "na_cutoff": p.na_cutoff}


STAGE = Stage("retrieval", "phenotypic activity and consistency (copairs mAP)", run_retrieval, _science,
              section="retrieval")
