"""A source of the combined training set: a raycp run's crop shards and treatment-effect ranking."""

from __future__ import annotations

import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.layout import RunLayout
from raycp.trainset.combine import CROPS_FILE, KEYS, Source


def crop_cells(crops: str, *, label: str = "Metadata_Treatment", control_col: str = "Metadata_IsControl") -> pd.DataFrame:
    """One row per crop of the shards under ``crops`` (metadata only): plate/well/site/cell, the
    label, the control flag and ``crops_file`` (the shard holding it)."""
    from raycp.train.data import read_crop_metadata

    found = read_crop_metadata(crops, label=label)
    cells = found.meta[[c for c in (*KEYS, label, control_col) if c in found.meta.columns]].copy()
    cells[CROPS_FILE] = [found.files[i] for i in found.meta["_file"].to_numpy()]
    return cells


def read_source(run: str, *, label: str = "Metadata_Treatment", control_col: str = "Metadata_IsControl") -> Source:
    """The run's crops (:func:`crop_cells`) and ``effect/effect.parquet``."""
    from raycp.io.outputs import read_parquet

    layout = RunLayout(run)
    effect_url = layout.effect
    if not urls.exists(effect_url):
        raise InputError(f"{effect_url}: not found (the run has no treatment-effect ranking)",
                         fix="run its effect stage: raycp run CONFIG --to effect")
    cells = crop_cells(layout.folder("crops"), label=label, control_col=control_col)
    return Source(cells=cells, effect=read_parquet(effect_url))
