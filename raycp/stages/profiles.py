"""The ``profiles`` stage: site medians (written by extraction) → well means (paper Methods,
"Feature aggregation"), annotated with the index's well metadata; one ``wells.parquet`` per
feature set. Classical feature sets are first standardised to the control wells."""

from __future__ import annotations

import pandas as pd

from raycp.io.outputs import jsonable, read_parquet, write_parquet
from raycp.ledger import Ledger
from raycp.stages.base import Context, Stage, sum_summaries


def well_annotations(index_table: pd.DataFrame) -> pd.DataFrame:
    """One row per well: the index's Metadata_ columns that are constant within a well."""
    from raycp.io.index import KEYS, PLATE, WELL

    meta = [c for c in index_table.columns
            if c.startswith("Metadata_") and c not in KEYS and not c.startswith("Metadata_Frame")]
    return index_table[[PLATE, WELL, *meta]].drop_duplicates([PLATE, WELL]).reset_index(drop=True)


def run_profiles(ctx: Context) -> dict:
    """``profiles/<set>/wells.parquet`` per feature set; a well none of whose sites has features
    is quarantined (its sites were quarantined upstream)."""
    from raycp.io.index import PLATE, WELL
    from raycp.preprocess.pipeline import load_index
    from raycp.profiles.aggregate import aggregate_wells

    index, _ = load_index(ctx.cfg.data.index, channels=list(ctx.cfg.data.channels))
    annotations = well_annotations(index.table)
    all_wells = annotations[[PLATE, WELL]]
    parts, figures = {}, {}
    for model in ctx.cfg.features:
        name = model.folder_name
        sites = read_parquet(ctx.layout.features(name).sites_table)
        feats = [c for c in sites.columns if not c.startswith("Metadata_")]
        wells = aggregate_wells(sites, [PLATE, WELL], feats)
        cells = sites.groupby([PLATE, WELL])["Metadata_n_cells"].sum().rename("Metadata_n_cells").reset_index()
        keep = [c for c in annotations.columns if c not in wells.columns or c in (PLATE, WELL)]
        wells = wells.merge(cells, on=[PLATE, WELL]).merge(annotations[keep], on=[PLATE, WELL], how="left")
        wells = wells[[c for c in wells.columns if c.startswith("Metadata_")] + feats]
        standardized = name in ctx.cfg.profiles.standardize
        if standardized:
            wells = _standardize(ctx, wells, feats)
        write_parquet(wells, ctx.layout.wells(name))
        got = set(map(tuple, wells[[PLATE, WELL]].to_numpy()))
        ledger = Ledger(f"profiles/{name}")
        for key in all_wells.to_dict("records"):
            (ledger.processed(key) if (key[PLATE], key[WELL]) in got
             else ledger.quarantined(key, "no site of this well has features (all quarantined upstream)"))
        ledger.write(ctx.layout.profiles(name))
        parts[name] = ledger.summary()
        figures[name] = {"wells": len(wells), "features": len(feats), "sites": len(sites), "standardized": standardized,
                         "cells": int(sites["Metadata_n_cells"].sum()),
                         "median_cells_per_well": float(wells["Metadata_n_cells"].median())}
    return jsonable({**sum_summaries(parts), "feature_sets": figures})


def _standardize(ctx: Context, wells: pd.DataFrame, feats: list[str]) -> pd.DataFrame:
    """z-scores against the screen's control wells (:mod:`raycp.profiles.normalize`): a change of
    units, not a batch correction (one mean and sd for all plates), so "no correction" stays so."""
    from raycp.evaluate import control_mask_from_query
    from raycp.profiles.io import feature_matrix
    from raycp.profiles.normalize import standardize_to_controls

    ctrl = control_mask_from_query(wells, ctx.cfg.profiles.control_query)
    Z = standardize_to_controls(feature_matrix(wells, feats), ctrl)
    return pd.concat([wells.drop(columns=feats), pd.DataFrame(Z, columns=feats, index=wells.index)], axis=1)


def read_wells(ctx: Context, feature_set: str) -> pd.DataFrame:
    """The stage's output for one feature set (what evaluation and effect read)."""
    return read_parquet(ctx.layout.wells(feature_set))


def sphere_scope(cfg) -> str | None:
    """The column whose groups are sphered apart (``profiles.sphere_scope: plate``), else None."""
    return "Metadata_Plate" if cfg.profiles.sphere_scope == "plate" else None


def _science(cfg) -> dict:
    p = cfg.profiles
    # the standardisation is fitted on the control wells: their query is part of the science
    return {"standardize": list(p.standardize)} | ({"control_query": p.control_query} if p.standardize else {})


STAGE = Stage("profiles", "well profiles (wells × sets)", run_profiles, _science, section="profiles")
