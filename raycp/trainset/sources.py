"""A source of the combined training set: a raycp run's crop shards and treatment-effect ranking."""

from __future__ import annotations

from raycp.errors import InputError
from raycp.io import urls
from raycp.layout import RunLayout
from raycp.trainset.combine import CROPS_FILE, KEYS, Source


def read_source(run: str, *, label: str = "Metadata_Treatment", control_col: str = "Metadata_IsControl") -> Source:
    """The run's crops (metadata only: one row per crop with its shard) and ``effect/effect.parquet``."""
    from raycp.io.outputs import read_parquet
    from raycp.train.data import read_crop_metadata

    layout = RunLayout(run)
    effect_url = layout.effect
    if not urls.exists(effect_url):
        raise InputError(f"{effect_url}: not found (the run has no treatment-effect ranking)",
                         fix="run its effect stage: raycp run CONFIG --to effect")
    crops = read_crop_metadata(layout.folder("crops"), label=label)
    cells = crops.meta[[c for c in (*KEYS, label, control_col) if c in crops.meta.columns]].copy()
    cells[CROPS_FILE] = [crops.files[i] for i in crops.meta["_file"].to_numpy()]
    return Source(cells=cells, effect=read_parquet(effect_url))
