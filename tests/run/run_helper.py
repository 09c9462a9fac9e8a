"""Data makers for ``raycp run``: a tiny labelled screen of real cells and a run config over it."""

from __future__ import annotations

from pathlib import Path

PEDIATRIC = "images/pediatric_5ch_BR00143976_C03_s3/images/orig"

#: 2 plates × (6 compounds × 2 replicates + 3 DMSO) wells, one 160-px site each, 8 real cells a site;
#: 3 MoAs, so every compound shares its MoA with another (the evaluation needs matches).
TINY_SCREEN = ["layout.plates=2", "layout.controls_per_plate=3", "layout.replicates=2", "layout.sites_per_well=1",
               "treatments.n=6", "treatments.moas=[nuclear_enlargement,mitochondrial_stress,er_stress]",
               "image.size=160", "image.cells_per_site=8", "batch_sites=4"]


def run_overrides(screen: Path, output: Path, **extra: str) -> list[str]:
    """A run small enough for the default test tier: 32-px crops, 1 epoch of 2 steps, and the
    random-init and CellProfiler feature sets beside the trained CNN."""
    sets = {
        "data.index": str(screen / "index" / "sites.parquet"), "data.output": str(output),
        "crops.size": "32", "train.model.arch": "efficientnet_lite0", "train.optim.epochs": "1",
        "train.optim.batch_size": "8", "train.split.val_max_cells": "32", "train.compute.num_workers": "1",
        "train.compute.cpus_per_worker": "1", "train.compute.max_steps_per_epoch": "2",
        "features": "[{kind: trained}, {kind: random, arch: efficientnet_lite0}, {kind: cellprofiler}]",
        "cellprofiler.measurements": "[intensity, sizeshape]", "inference.batch_size": "64",
        "profiles.lambdas": "[1.0, 0.01]", "profiles.umap": "false",
        "compute.num_cpus": "2", "compute.object_store_memory_gb": "0.5",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]
