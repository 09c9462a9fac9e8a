"""Treatments and plate maps: which treatment, with which known truth, goes in which well.

Mirrors the benchmark designs of the paper (Methods, "Datasets"; "Image-based profiling"): 96- or
384-well plates, 5 replicate wells per treatment spread over plates, negative controls (DMSO for
compounds, EMPTY for gene overexpression) on every plate — the controls that sphering is fitted on
(Methods, "Batch correction with the sphering transform") — and several sites per well.

Strength classes follow the paper's treatment-effect split (Fig. 3, Methods "Measuring treatment
effect"): ~20 % strong, the rest median, weak or null (no phenotype at all: paper Methods, WSL
assumption 2, "there is no certainty that all treatments produce a phenotypic outcome").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io.index import IS_CONTROL, PLATE, SITE, TREATMENT, WELL
from raycp.screens.confounders import STREAM_LAYOUT, STREAM_TREATMENTS, rng_for, well_edge

MOA, STRENGTH, STRENGTH_CLASS, RESPONDING = (
    "Metadata_MoA", "Metadata_Strength", "Metadata_StrengthClass", "Metadata_RespondingFraction")
PLATE_FORMATS = {96: (8, 12), 384: (16, 24)}
CLASSES = ("strong", "median", "weak", "null")
CONTROL_NAMES = {"compound": "DMSO", "gene": "EMPTY"}


def well_name(row: int, col: int) -> str:
    """0-based (row, col) -> ``A01`` (rows beyond Z are not used by 96/384-well plates)."""
    return f"{chr(ord('A') + row)}{col + 1:02d}"


def plate_names(prefix: str, n: int) -> list[str]:
    width = max(2, len(str(n)))
    return [f"{prefix}{i + 1:0{width}d}" for i in range(n)]


def class_counts(n: int, strong: float, weak: float, null: float) -> dict[str, int]:
    """How many treatments of each strength class (rounded; median takes the rest)."""
    counts = {"strong": int(round(strong * n)), "weak": int(round(weak * n)), "null": int(round(null * n))}
    while sum(counts.values()) > n:  # rounding overshoot: trim the largest class
        counts[max(counts, key=counts.get)] -= 1
    counts["median"] = n - sum(counts.values())
    return {c: counts[c] for c in CLASSES}


def design_treatments(cfg, *, perturbation: str, seed: int) -> pd.DataFrame:
    """The treatment table with its ground truth (one row per treatment, control last).

    ``cfg`` is a :class:`raycp.screens.config.TreatmentConfig`. MoAs are dealt round-robin so each
    gets ``n / len(moas)`` treatments; strength classes are dealt in the order strong → null over
    that sequence, so every MoA spans several classes; names are shuffled so that neither the
    name nor its number reveals the MoA or the strength.
    """
    rng = rng_for(seed, STREAM_TREATMENTS)
    n, moas = cfg.n, list(cfg.moas)
    moa_order = [moas[i] for i in rng.permutation(len(moas))]
    counts = class_counts(n, cfg.strong_fraction, cfg.weak_fraction, cfg.null_fraction)
    classes = [c for c in CLASSES for _ in range(counts[c])]
    prefix = "cpd" if perturbation == "compound" else "orf"
    width = max(3, len(str(n)))
    names = [f"{prefix}{k + 1:0{width}d}" for k in rng.permutation(n)]
    n_multi = int(round(cfg.multi_moa_fraction * n)) if len(moas) > 1 else 0
    multi = set(rng.choice(n, size=n_multi, replace=False).tolist()) if n_multi else set()
    lo_f, hi_f = cfg.responding_fraction
    rows = []
    for i in range(n):
        primary = moa_order[i % len(moa_order)]
        moa = [primary]
        if i in multi:
            others = [m for m in moa_order if m != primary]
            moa.append(others[int(rng.integers(len(others)))])
        cls = classes[i]
        lo, hi = cfg.strength_ranges[cls]
        rows.append({
            TREATMENT: names[i],
            MOA: "|".join(moa),
            STRENGTH: float(round(rng.uniform(lo, hi), 4)),
            STRENGTH_CLASS: cls,
            RESPONDING: float(round(rng.uniform(lo_f, hi_f), 4)),
            IS_CONTROL: False,
        })
    rows.sort(key=lambda r: r[TREATMENT])
    rows.append({TREATMENT: CONTROL_NAMES[perturbation], MOA: None, STRENGTH: 0.0, STRENGTH_CLASS: "control",
                 RESPONDING: 0.0, IS_CONTROL: True})
    return pd.DataFrame(rows)


def design_plates(treatments: pd.DataFrame, cfg, *, seed: int, source: str = "layout") -> pd.DataFrame:
    """The plate maps: one row per used well (``Metadata_Plate``, ``Metadata_Well``, row/col, treatment).

    Replicate ``r`` of treatment ``i`` goes to plate ``(i + r) mod plates`` so replicates spread over
    plates; each plate holds ``controls_per_plate`` control wells; positions are shuffled per plate.
    ``cfg`` is a :class:`raycp.screens.config.LayoutConfig`.
    """
    n_rows, n_cols = PLATE_FORMATS[cfg.wells]
    plates = plate_names(cfg.plate_prefix, cfg.plates)
    treated = treatments.loc[~treatments[IS_CONTROL], TREATMENT].tolist()
    control = treatments.loc[treatments[IS_CONTROL], TREATMENT].iloc[0]
    per_plate: list[list[tuple[str, int]]] = [[] for _ in plates]
    for i, name in enumerate(treated):
        for r in range(cfg.replicates):
            per_plate[(i + r) % cfg.plates].append((name, r + 1))
    need = max(len(p) for p in per_plate) + cfg.controls_per_plate
    if need > cfg.wells:
        raise InputError(
            f"{source}: the plate map needs {need} wells on a plate ({len(treated)} treatments × "
            f"{cfg.replicates} replicates over {cfg.plates} plate(s) + {cfg.controls_per_plate} controls) "
            f"but a {cfg.wells}-well plate has {cfg.wells}",
            fix="use more plates (layout.plates), 384-well plates (layout.wells=384), "
                "or fewer treatments/replicates/controls")
    rows = []
    for p, plate in enumerate(plates):
        rng = rng_for(seed, STREAM_LAYOUT, p)
        positions = rng.permutation(n_rows * n_cols)
        content = [(control, 0)] * cfg.controls_per_plate + [per_plate[p][k] for k in rng.permutation(len(per_plate[p]))]
        for (name, rep), pos in zip(content, positions):
            row, col = divmod(int(pos), n_cols)
            rows.append({PLATE: plate, WELL: well_name(row, col), "row": row, "col": col,
                         TREATMENT: name, "replicate": rep,
                         "edge": well_edge(row, col, n_rows, n_cols)})
    out = pd.DataFrame(rows)
    out = out.merge(treatments, on=TREATMENT, how="left", validate="many_to_one")
    return out.sort_values([PLATE, "row", "col"], kind="stable").reset_index(drop=True)


def sites_table(plate_map: pd.DataFrame, sites_per_well: int) -> pd.DataFrame:
    """One row per site (``Metadata_Site`` 1..sites_per_well) of every used well."""
    reps = plate_map.loc[plate_map.index.repeat(sites_per_well)].copy()
    reps[SITE] = np.tile(np.arange(1, sites_per_well + 1), len(plate_map))
    return reps.reset_index(drop=True)
