"""The ``effect`` stage: treatment effect (paper Methods, "Treatment effect"): per plate, the
distance of each treated well to the median control well, z-scored on the control wells'
distances, averaged per treatment, on sphered well profiles of one feature set; then the
weakest/median/strongest subsets (paper Table 1: 20 %)."""

from __future__ import annotations

from raycp.io.outputs import jsonable, write_parquet
from raycp.stages.base import Context, Stage
from raycp.stages.profiles import read_wells, sphere_scope


def effect_feature_set(cfg) -> str:
    """``profiles.effect_features`` when it is a feature set of the run, else the first set."""
    names = [f.folder_name for f in cfg.features]
    want = cfg.profiles.effect_features
    return want if want in names else names[0]


def run_effect(ctx: Context) -> dict:
    """``effect/effect.parquet`` (the ranking) and ``effect/subsets/<name>.parquet``; a well whose
    profile has NaN features is quarantined."""
    from raycp.evaluate import control_mask_from_query
    from raycp.profiles.effect import effect_of_wells, select_subsets

    p = ctx.cfg.profiles
    name = effect_feature_set(ctx.cfg)
    wells = read_wells(ctx, name)
    ctrl = control_mask_from_query(wells, p.control_query)
    res = effect_of_wells(wells, p.treatment_cols, ctrl, sphere_lambda=p.sphere_lambda,
                          sphere_scope_col=sphere_scope(ctx.cfg), na_cutoff=p.na_cutoff, source=f"{name} wells")
    dropped = res.accounting["wells_dropped_nan"]
    write_parquet(res.treatments, ctx.layout.effect)
    subsets = select_subsets(res.treatments, p.effect_fraction)
    for sub, table in subsets.items():
        write_parquet(table, ctx.layout.effect_subset(sub))
    n = int(len(wells))
    return jsonable({"total": n, "processed": n - dropped, "quarantined": dropped,
                     "reasons": {"well profile has NaN features": dropped} if dropped else {},
                     "feature_set": name, "treatments": len(res.treatments), **res.accounting,
                     "subset_sizes": {k: len(v) for k, v in subsets.items()}})


def _science(cfg) -> dict:
    return cfg.profiles.model_dump(mode="json")


STAGE = Stage("effect", "treatment effect (wells)", run_effect, _science, section="profiles")
