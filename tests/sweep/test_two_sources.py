"""Issue 15 on two mini screens built with different seeds (two "sources"), each run to its
treatment effect on CellProfiler features: the λ sweep over both equals ``raycp profile evaluate``
at every λ and selects what that curve says; the combined training set of the two counts what a
hand computation from each run's ranking and crops expects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from raycp.cli import main
from raycp.run import load, run
from tests.run.run_helper import PEDIATRIC, TINY_RUN, TINY_SCREEN, run_overrides

PROFILE = ["--treatment-cols", "Metadata_Treatment", "--annotation-col", "Metadata_MoA",
           "--control-query", "Metadata_IsControl == True"]


@pytest.fixture(scope="module")
def sources(shared_data, ray_cluster, tmp_path_factory) -> dict[str, Path]:
    """Two tiny screens (seeds 0 and 1), each run to the effect stage with CellProfiler features."""
    from raycp.screens.build import build_screen
    from raycp.screens.config import load_screen_config

    root = tmp_path_factory.mktemp("two-sources")
    runs = {}
    for name, seed in (("a", 0), ("b", 1)):
        cfg = load_screen_config("mini", TINY_SCREEN, overrides=[f"source.folders=['{shared_data / PEDIATRIC}']",
                                                                  f"seed={seed}", f"name=screen-{name}"])
        build_screen(cfg, str(root / f"screen-{name}"))
        sets = run_overrides(root / f"screen-{name}", root / f"run-{name}", **{"train.enabled": "false"})
        sets.append("features=[{kind: cellprofiler}]")
        run(load(TINY_RUN, sets), stop="effect", echo=lambda line: None)
        runs[name] = root / f"run-{name}"
    return runs


def test_the_screens_differ(sources):
    a, b = (pd.read_parquet(sources[s] / "effect" / "effect.parquet") for s in ("a", "b"))
    assert not a[["Metadata_Treatment", "ate"]].equals(b[["Metadata_Treatment", "ate"]])


def test_the_lambda_sweep_equals_profile_evaluate_at_every_lambda(sources, tmp_path, capsys):
    wells = {s: sources[s] / "profiles" / "cellprofiler" / "wells.parquet" for s in ("a", "b")}
    out = tmp_path / "sweep"
    assert main(["sweep", "lambda", f"a={wells['a']}", f"b={wells['b']}", *PROFILE, "--lambdas", "1,0.01,0.0001",
                 "-o", str(out)]) == 0
    curve = pd.read_parquet(out / "lambda_curve.parquet")
    selection = json.loads((out / "lambda_selection.json").read_text())
    for name, path in wells.items():
        direct = {}
        for lam in (None, 1.0, 0.01, 0.0001):
            folder = tmp_path / f"direct-{name}-{lam}"
            extra = [] if lam is None else ["--sphere-lambda", str(lam)]
            assert main(["profile", "evaluate", str(path), *PROFILE, *extra, "--output", str(folder)]) == 0
            direct[lam] = json.loads((folder / "metrics.json").read_text())
        rows = curve[curve["feature_set"] == name]
        for _, row in rows.iterrows():
            lam = None if math.isnan(row["sphere_lambda"]) else row["sphere_lambda"]
            for metric in ("map_paper", "map", "folds_of_enrichment"):
                assert row[metric] == direct[lam][metric], (name, lam, metric)
        lams = {lam: m["map_paper"] for lam, m in direct.items() if lam is not None}
        top = max(lams.values())
        assert selection[name]["best_lambda"] == max(lam for lam, v in lams.items() if v == top)
        assert selection[name]["saturated_lambda"] == max(lam for lam, v in lams.items() if v >= top - 0.01)
    capsys.readouterr()


def test_the_combined_training_set_counts_what_the_rankings_and_crops_say(sources, tmp_path):
    """Hand computation: per source, the ceil(0.34 × 6) = 3 strongest treatments by the run's own
    ranking (``--no-shared-first``) with all their cells, and 2 DMSO wells per plate with all theirs."""
    from raycp.train.data import read_crop_metadata

    out = tmp_path / "trainset"
    assert main(["trainset", "combine", "--source", f"a={sources['a']}", "--source", f"b={sources['b']}", "-o", str(out),
                 "--strongest", "0.34", "--no-shared-first", "--controls-per-plate", "2", "--min-cells", "1"]) == 0
    index = pd.read_parquet(out / "trainset.parquet")
    for name, folder in sources.items():
        effect = pd.read_parquet(folder / "effect" / "effect.parquet").sort_values("rank")
        strong = set(effect["Metadata_Treatment"].head(3))
        cells = read_crop_metadata(str(folder / "crops"), label="Metadata_Treatment").meta
        mine = index[index["Metadata_Source"] == name]
        treated = mine[~mine["Metadata_IsControl"]]
        assert set(treated["Metadata_Treatment"]) == strong
        assert len(treated) == cells["Metadata_Treatment"].isin(strong).sum()
        controls = mine[mine["Metadata_IsControl"]]
        wells = controls[["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
        assert (wells.groupby("Metadata_Plate").size() == 2).all() and len(wells) == 4    # 2 plates × 2 DMSO wells
        expected = cells.merge(wells, on=["Metadata_Plate", "Metadata_Well"])
        assert len(controls) == len(expected)
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary["cells"].sum() == len(index)
