"""`raycp profile recipe` and `raycp profile map` on the real LINCS plate: every step written with
its parameters, rows accounted for, a re-run reuses the steps and gives the same bytes; copairs'
column names; bad recipes and inputs are one-line errors (exit 2) before anything is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from raycp.cli import main
from raycp.profiles.recipe import PRESETS, load_recipe

CONF = Path(__file__).resolve().parents[1] / "conf" / "recipe_lincs.yaml"


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    recipe = load_recipe(preset)
    assert recipe.negcon and recipe.steps[-1].op == "harmony"


def test_recipe_on_lincs_then_map(lincs_path, tmp_path, capsys):
    out = tmp_path / "recipe"
    assert main(["profile", "recipe", str(CONF), str(lincs_path), "-o", str(out)]) == 0
    record = json.loads((out / "recipe.json").read_text())
    assert [s["op"] for s in record["steps"]] == ["variant_features", "normalize", "rank_int", "feature_select"]
    acct = record["accounting"]
    assert acct["rows_input"] == 384 == acct["rows_output"] + acct["rows_quarantined"]
    final = pd.read_parquet(out / record["output"])
    from raycp.profiles.io import read_table

    source = read_table(lincs_path)
    meta = [c for c in source.columns if c.startswith("Metadata_")]
    assert list(final.columns[: len(meta)]) == meta  # Metadata_* first and unchanged (text stays text)
    pd.testing.assert_frame_equal(final[meta], source[meta])
    assert (final.dtypes[len(meta):] == "float32").all()
    assert record["steps"][3]["features_out"] < record["steps"][3]["features_in"]  # featselect removed features
    assert (out / "config.yaml").exists()
    first, record_bytes = _digests(out), (out / "recipe.json").read_bytes()
    capsys.readouterr()
    assert main(["profile", "recipe", str(CONF), str(lincs_path), "-o", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"step"' in line]
    assert [p["reused"] for p in printed] == [True] * 4
    assert _digests(out) == first and (out / "recipe.json").read_bytes() == record_bytes  # the same bytes

    maps = tmp_path / "map"
    capsys.readouterr()
    assert main(["profile", "map", str(out / record["output"]), "--pert-col", "Metadata_broad_sample",
                 "--control-query", "Metadata_pert_type == 'control'", "--target-col", "Metadata_moa",
                 "--null-size", "2000", "-o", str(maps)]) == 0
    act = pd.read_parquet(maps / "activity_map.parquet")
    assert list(act.columns) == ["Metadata_broad_sample", "mean_average_precision", "mean_normalized_average_precision",
                                 "p_value", "corrected_p_value", "below_p", "below_corrected_p"]
    assert len(act) == 58  # every treated compound
    ap = pd.read_parquet(maps / "activity_ap.parquet")
    assert {"average_precision", "normalized_average_precision", "n_pos_pairs", "n_total_pairs"} <= set(ap.columns)
    summary = json.loads((maps / "map.json").read_text())
    assert summary["accounting"]["wells"] == 384 == summary["accounting"]["wells_used"] + summary["accounting"]["wells_quarantined_nan"]
    assert 0 < summary["phenotypic_consistency"]["groups"]
    assert (maps / "map_pvalue.png").stat().st_size > 10_000


def test_bad_recipes_are_one_line_errors(lincs_path, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - op: normalize\n    methd: standardize\n")
    assert main(["profile", "recipe", str(bad), str(lincs_path), "-o", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "methd" in err[0]
    out = tmp_path / "o2"
    assert main(["profile", "recipe", "jump_compound", str(lincs_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Metadata_Batch'" in err[0] and "harmony" in err[0]
    assert not list(out.glob("*.parquet"))  # refused before any step ran
    assert main(["profile", "recipe", "jump_nope", str(lincs_path), "-o", str(out)]) == 2
    assert main(["profile", "map", str(lincs_path), "--pert-col", "Metadata_broad_sample", "--control-query",
                 "Metadata_pert_type == 'negcon'", "-o", str(tmp_path / "m")]) == 2
    assert "matched no well" in capsys.readouterr().err


def test_missing_values_stale_steps_and_step_overrides(lincs_path, tmp_path, capsys):
    """The NaN rule runs before the steps (features, then wells, all counted); a changed recipe
    leaves no step file of the old one; --set steps.N.KEY reaches a preset's step."""
    from raycp.profiles.io import read_table

    wells = read_table(lincs_path)
    feats = [c for c in wells.columns if not c.startswith("Metadata_")]
    wells.loc[wells.index[:40], feats[0]] = float("nan")  # 10 % NaN: the feature goes
    wells.loc[wells.index[100:103], feats[1]] = float("nan")  # 3 wells: quarantined
    table = tmp_path / "holes.parquet"
    wells.to_parquet(table)
    out = tmp_path / "r"
    assert main(["profile", "recipe", str(CONF), str(table), "-o", str(out)]) == 0
    record = json.loads((out / "recipe.json").read_text())
    assert record["na_rule"]["features_dropped_na"] == [feats[0]] and record["na_rule"]["rows_quarantined"] == 3
    assert record["accounting"]["rows_output"] == 381 and record["accounting"]["rows_quarantined"] == 3
    assert "quarantined" in capsys.readouterr().err
    short = tmp_path / "short.yaml"
    short.write_text("negcon: \"Metadata_pert_type == 'control'\"\nsteps:\n  - op: rank_int\n")
    assert main(["profile", "recipe", str(short), str(table), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == ["01_rank_int.parquet"]
    plates = read_table(lincs_path).copy()
    plates["Metadata_Batch"] = plates["Metadata_Well"].str[0]  # 16 batches
    batched = tmp_path / "batched.parquet"
    plates.to_parquet(batched)
    recipe = load_recipe("jump_compound", ["steps.5.batch=Metadata_Batch", "steps.5.n_clusters=5",
                                           "negcon=Metadata_pert_type == 'control'"])
    assert recipe.steps[4].batch == "Metadata_Batch" and recipe.steps[4].n_clusters == 5
    assert main(["profile", "recipe", "jump_compound", str(batched), "-o", str(tmp_path / "jc"),
                 "--set", "negcon=Metadata_pert_type == 'control'", "--set", "steps.5.n_clusters=5"]) == 0
    capsys.readouterr()
    assert main(["profile", "recipe", "jump_compound", str(lincs_path), "-o", str(tmp_path / "one"),
                 "--set", "steps.5.batch=Metadata_Plate"]) == 2  # one plate: refused before any step
    err = capsys.readouterr().err
    assert "step 5 (harmony) needs at least 2 values of 'Metadata_Plate'" in err and not list((tmp_path / "one").glob("*.parquet"))
    assert main(["profile", "recipe", "jump_compound", str(lincs_path), "-o", str(tmp_path / "x"),
                 "--set", "steps.9.batch=B"]) == 2
    assert "the recipe has 5 steps" in capsys.readouterr().err
