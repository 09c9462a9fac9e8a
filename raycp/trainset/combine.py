"""Build the combined training set from several sources (paper: "Combined training set", Fig. 4).

Per source (a raycp run: its crop shards and its treatment-effect ranking):

1. **Strong treatments**: the strongest ``strongest`` share of the source's treatments by treatment
   effect (``effect.parquet`` rank 1 = strongest; at least one).
2. **Shared treatments first**: with ``shared_first``, a treatment ranked in two or more sources
   is kept in every source that has it, whatever its rank there (the paper prioritised compounds
   present in several datasets).
3. **Controls as their own classes**: control wells keep their label (e.g. DMSO and EMPTY are two
   classes); ``controls_per_plate`` wells of each control type are drawn per plate (seeded; the
   paper kept 3 per plate for its largest source), all their cells kept.
4. **Small classes dropped**: a class (label) with fewer than ``min_cells`` cells, summed over the
   sources, is dropped (paper: 100), listed with its count.

Two sources that read the same crop shards (the same run given twice) list the same cells twice;
the accounting names them (``sources_sharing_shards``), since a cell listed twice can then be in
both the training and the validation split.

The result is one row per cell: ``Metadata_Source``, plate/well/site/cell, the class label,
``Metadata_IsControl`` and ``crops_file`` (the shard holding the crop), plus a summary table of
cells per source × kind (treatment / each control type) — Fig. 4's counts. ``raycp train`` reads
the index as its ``crops`` (``raycp.train.data.read_crop_metadata``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError

KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_CellId"]
SOURCE = "Metadata_Source"
CROPS_FILE = "crops_file"


@dataclass(frozen=True)
class CombineSettings:
    strongest: float = 0.2
    shared_first: bool = True
    controls_per_plate: int | None = 3
    min_cells: int = 100
    seed: int = 0
    label: str = "Metadata_Treatment"
    control_col: str = "Metadata_IsControl"


@dataclass
class Source:
    """One source: ``cells`` (one row per crop: KEYS, label, control flag, ``crops_file``) and
    ``effect`` (label, ``rank``; treatments only)."""

    cells: pd.DataFrame
    effect: pd.DataFrame


@dataclass
class CombinedSet:
    index: pd.DataFrame
    summary: pd.DataFrame
    accounting: dict = field(default_factory=dict)


def _derive(seed: int, *parts: str) -> int:
    import hashlib

    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def combine(sources: dict[str, Source], settings: CombineSettings | None = None) -> CombinedSet:
    """The combined training index (see the module docstring). Raises :class:`InputError` when a
    source lacks a column, has no ranked treatment, or nothing is left."""
    settings = settings or CombineSettings()
    if not 0 < settings.strongest <= 1:
        raise InputError(f"strongest share {settings.strongest} is not in (0, 1]", fix="e.g. --strongest 0.2")
    label, ctrl = settings.label, settings.control_col
    ranked: dict[str, pd.DataFrame] = {}
    for name, src in sources.items():
        for col in (*KEYS, label, ctrl, CROPS_FILE):
            if col not in src.cells.columns:
                raise InputError(f"source {name}: its crops have no {col!r} column", fix="crop the screen with raycp preprocess")
        if not {label, "rank"} <= set(src.effect.columns) or src.effect.empty:
            raise InputError(f"source {name}: no treatment-effect ranking ({label}, rank)",
                             fix="run the effect stage of that run (raycp run ... --to effect)")
        ranked[name] = src.effect[[label, "rank"]].astype({label: str}).sort_values("rank")
    seen = pd.Series([t for r in ranked.values() for t in r[label].unique()]).value_counts()
    shared = set(seen[seen >= 2].index)
    parts, summary, accounting = [], [], {"sources": {}, "shared_treatments": sorted(shared)}
    for name, src in sources.items():
        r = ranked[name]
        n_keep = max(1, math.ceil(settings.strongest * len(r)))
        strong = set(r[label].head(n_keep))
        keep = strong | ((shared & set(r[label])) if settings.shared_first else set())
        cells = src.cells.copy()
        cells[label] = cells[label].astype(str)
        is_ctrl = cells[ctrl].astype(bool).to_numpy()
        treated = cells[~is_ctrl & cells[label].isin(keep).to_numpy()]
        controls = cells[is_ctrl]
        if settings.controls_per_plate is not None and len(controls):
            wells = controls[["Metadata_Plate", "Metadata_Well", label]].drop_duplicates()
            picked = []
            for (plate, ctype), group in wells.groupby(["Metadata_Plate", label], sort=True):
                rng = np.random.default_rng(_derive(settings.seed, name, str(plate), str(ctype)))
                order = rng.permutation(len(group))[: settings.controls_per_plate]
                picked.append(group.iloc[np.sort(order)])
            chosen = pd.concat(picked, ignore_index=True)[["Metadata_Plate", "Metadata_Well"]]
            controls = controls.merge(chosen, on=["Metadata_Plate", "Metadata_Well"], how="inner")
        part = pd.concat([treated, controls], ignore_index=True)
        part.insert(0, SOURCE, name)
        parts.append(part)
        accounting["sources"][name] = {
            "treatments_ranked": int(len(r)), "strongest": int(n_keep), "kept_for_sharing": int(len(keep - strong)),
            "treatments_kept": int(len(keep)), "control_wells": int(controls[["Metadata_Plate", "Metadata_Well"]]
                                                                     .drop_duplicates().shape[0]),
            "cells": int(len(part))}
    files = {name: set(src.cells[CROPS_FILE]) for name, src in sources.items()}
    names = sorted(files)
    accounting["sources_sharing_shards"] = {f"{a}+{b}": len(files[a] & files[b]) for i, a in enumerate(names)
                                            for b in names[i + 1:] if files[a] & files[b]}
    combined = pd.concat(parts, ignore_index=True)
    counts = combined[label].value_counts()
    small = counts[counts < settings.min_cells]
    accounting["classes_dropped"] = {str(k): int(v) for k, v in small.sort_index().items()}
    combined = combined[~combined[label].isin(small.index)].reset_index(drop=True)
    if combined.empty or combined[label].nunique() < 2:
        raise InputError(f"the combined set has {combined[label].nunique()} class(es) with ≥ {settings.min_cells} cells",
                         fix="lower --min-cells or raise --strongest")
    kind = np.where(combined[ctrl].astype(bool), combined[label], "treatment")
    summary = (combined.assign(kind=kind, _well=combined["Metadata_Plate"].astype(str) + "/" + combined["Metadata_Well"])
               .groupby([SOURCE, "kind"], sort=True)
               .agg(classes=(label, "nunique"), wells=("_well", "nunique"), cells=(label, "size")).reset_index())
    accounting.update(classes=int(combined[label].nunique()), cells=int(len(combined)))
    cols = [SOURCE, *KEYS, label, ctrl, CROPS_FILE]
    return CombinedSet(index=combined[cols], summary=summary, accounting=accounting)
