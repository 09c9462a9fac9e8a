"""Real users' profile files (issue 12, kinds 6, 7, 9): NaN per feature then per row, an evaluation
that never crashes on a valid library, and DeepProfiler feature folders aggregated in one command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raycp.errors import InputError
from raycp.evaluate import evaluate
from raycp.evaluate.metrics import evaluate_profiles
from raycp.io.npz import encode_npz
from raycp.profiles.aggregate import aggregate_cells
from raycp.profiles.cli import app
from raycp.profiles.io import feature_matrix_na, na_features

from .conftest import LINCS_CONTROLS, LINCS_TREATMENT

runner = CliRunner()


# -- 6. NaN per feature, then per row ---------------------------------------------------------------

def test_na_cutoff_is_pycytominers_drop_na_columns_rule():
    feats = ["a", "b", "c", "d"]
    # 100 rows: a never NaN, b 5 % (= cutoff: kept), c 6 % (dropped), d always (dropped)
    assert na_features(np.array([0, 5, 6, 100]), 100, feats, 0.05) == ["c", "d"]
    assert na_features(np.array([0, 5, 6, 100]), 100, feats, 1.0) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        na_features(np.zeros(4), 100, feats, 1.5)


def test_an_all_nan_fibrosis_column_is_dropped_and_listed_not_every_cell(fibrosis_files, tmp_path):
    """A real plate of 607 cells with one column NaN everywhere: 8 wells, the column listed."""
    cells = pd.read_parquet(fibrosis_files[0])
    assert len(cells) == 607
    column = [c for c in cells.columns if not c.startswith("Metadata_")][3]
    clean = aggregate_cells(cells.copy())
    cells[column] = np.nan
    path = tmp_path / "cells.parquet"
    cells.to_parquet(path)
    result = runner.invoke(app, ["aggregate", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["wells"] == 8 and printed["features_dropped_na"] == [column] and printed["cells_dropped_nan"] == 0
    acct = json.loads((tmp_path / "out" / "aggregation.json").read_text())
    assert acct["features_dropped_na"] == [column] and acct["passes"] == 2
    wells = pd.read_parquet(tmp_path / "out" / "wells.parquet")
    assert len(wells) == 8 and column not in wells.columns
    rest = [c for c in clean.features if c != column]
    np.testing.assert_allclose(wells[rest].to_numpy(), clean.wells[rest].to_numpy(), rtol=1e-6)


def test_rows_are_dropped_only_for_the_nans_left_and_counted():
    rng = np.random.default_rng(0)
    cells = pd.DataFrame({"Metadata_Plate": ["P"] * 40, "Metadata_Well": ["A01"] * 20 + ["A02"] * 20,
                          "Metadata_Site": [1] * 40, "f1": rng.normal(size=40), "f2": rng.normal(size=40),
                          "f3": np.nan})
    cells.loc[[3, 30], "f1"] = np.nan  # 5 % of the cells: kept as a feature, those 2 cells dropped
    res = aggregate_cells(cells)
    a = res.accounting
    assert a["features_dropped_na"] == ["f3"] and a["cells_dropped_nan"] == 2
    assert a["cells_dropped_nan_per_site"] == {"P/A01/1": 1, "P/A02/1": 1}
    assert res.features == ["f1", "f2"]
    with pytest.raises(InputError, match="every cell is NaN in every feature"):
        aggregate_cells(cells[["Metadata_Plate", "Metadata_Well", "Metadata_Site", "f3"]])
    half = cells.assign(f1=np.where(np.arange(40) < 10, np.nan, cells.f1), f2=np.where(np.arange(40) < 10, 0.0, np.nan))
    with pytest.raises(InputError, match="every feature column is NaN in more than 0.05 of the cells"):
        aggregate_cells(half[["Metadata_Plate", "Metadata_Well", "Metadata_Site", "f1", "f2"]])


def test_an_all_nan_lincs_column_keeps_the_320_treatments_and_is_listed(lincs_path, lincs, tmp_path):
    column = [c for c in lincs.columns if not c.startswith("Metadata_")][5]
    broken = lincs.copy()
    broken[column] = np.nan
    path = tmp_path / "lincs_nan.csv.gz"
    broken.to_csv(path, index=False)
    result = runner.invoke(app, ["evaluate", str(path), "--treatment-cols", ",".join(LINCS_TREATMENT),
                                 "--annotation-col", "Metadata_moa", "--control-query", LINCS_CONTROLS,
                                 "--output", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["n_treatments"] == 320 and printed["features_dropped_na"] == [column]
    without = evaluate(lincs.drop(columns=[column]), LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS)
    assert printed["map_paper"] == pytest.approx(without.evaluation.summary["map_paper"], abs=1e-12)
    acct = json.loads((tmp_path / "ev" / "metrics.json").read_text())["accounting"]
    assert acct["features_dropped_na"] == [column] and acct["treatments_in_library"] == 320


def test_effect_lists_the_dropped_column(lincs, tmp_path):
    column = [c for c in lincs.columns if not c.startswith("Metadata_")][0]
    broken = lincs.assign(**{column: np.nan, "Metadata_Plate": "SQ00015054"})
    path = tmp_path / "w.parquet"
    broken.to_parquet(path)
    result = runner.invoke(app, ["effect", str(path), "--treatment-cols", ",".join(LINCS_TREATMENT),
                                 "--control-query", LINCS_CONTROLS, "--output", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["features_dropped_na"] == [column]


def test_feature_matrix_na_on_a_table():
    df = pd.DataFrame({"Metadata_x": ["a", "b", "c"], "f1": [1.0, np.nan, 3.0], "f2": [np.nan] * 3, "f3": [1.0, 2.0, 3.0]})
    fm = feature_matrix_na(df, na_cutoff=0.5)
    assert fm.features == ["f1", "f3"] and fm.dropped_na == ["f2"] and fm.ok.tolist() == [True, False, True]
    assert fm.accounting()["rows_dropped_nan"] == 1


# -- 7. the evaluation never crashes on a valid library -----------------------------------------------

def _library(n_moas: int, per_moa: int, seed: int = 0, dim: int = 6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_moas, dim))
    X = np.vstack([centres[m] + 0.5 * rng.normal(size=dim) for m in range(n_moas) for _ in range(per_moa)])
    return X, [f"moa{m}" for m in range(n_moas) for _ in range(per_moa)]


@pytest.mark.parametrize(("n_moas", "per_moa"), [(5, 2), (8, 1), (1, 3)])
def test_libraries_without_map_queries_score_the_valid_queries(n_moas, per_moa):
    """MoAs of 2 compounds (no query has 2 other matches), every MoA unique, one MoA of 3."""
    X, ann = _library(n_moas, per_moa)
    s = evaluate_profiles(X, ann).summary
    assert s["n_queries_map"] == (len(ann) if per_moa >= 3 else 0)
    assert s["n_queries_foe"] == (len(ann) if per_moa >= 2 else 0)
    if per_moa < 3:
        assert np.isnan(s["map_paper"])
    if per_moa >= 2:
        assert 0 <= s["map"] <= 1


def test_every_block_size_gives_the_same_numbers():
    """A block of query rows with no mAP query once crashed; the result cannot depend on blocking."""
    rng = np.random.default_rng(1)
    for trial in range(12):
        n = int(rng.integers(4, 40))
        ann = [f"m{int(v)}" for v in rng.integers(0, max(2, n // 2), size=n)]
        ann = [a if rng.random() > 0.15 else f"{a}|m{int(rng.integers(0, 5))}" for a in ann]
        X = rng.normal(size=(n, 5))
        reference = evaluate_profiles(X, ann, block_elements=1 << 21)
        for block in (n, 2 * n, 3 * n + 1, n * n // 2):
            other = evaluate_profiles(X, ann, block_elements=max(block, 1))
            for key, value in reference.summary.items():
                got = other.summary[key]
                assert (np.isnan(value) and np.isnan(got)) or got == pytest.approx(value, abs=1e-12), (trial, block, key)
            pd.testing.assert_frame_equal(other.queries, reference.queries)
            np.testing.assert_allclose(other.pr_curve.to_numpy(), reference.pr_curve.to_numpy(), atol=1e-12)


def test_blanks_around_the_annotation_separator_are_stripped():
    X, ann = _library(3, 3, seed=2)
    spaced = [a if i % 2 else f" {a} | other{i} " for i, a in enumerate(ann)]
    tight = [a if i % 2 else f"{a}|other{i}" for i, a in enumerate(ann)]
    assert evaluate_profiles(X, spaced).summary == evaluate_profiles(X, tight).summary


def test_evaluate_cli_warns_when_map_paper_is_undefined(tmp_path):
    X, ann = _library(4, 2, seed=3)
    wells = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    wells.insert(0, "Metadata_moa", ann)
    wells.insert(0, "Metadata_cpd", [f"c{i}" for i in range(len(ann))])
    wells.insert(0, "Metadata_ctl", "no")
    wells.loc[len(wells)] = ["yes", "dmso", None, *np.zeros(X.shape[1])]
    path = tmp_path / "w.parquet"
    wells.to_parquet(path)
    result = runner.invoke(app, ["evaluate", str(path), "--treatment-cols", "Metadata_cpd", "--annotation-col",
                                 "Metadata_moa", "--control-query", "Metadata_ctl == 'yes'", "--output", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "map_paper is undefined" in result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["map_paper"] is None and printed["n_queries_map"] == 0 and printed["n_queries_foe"] == 8


# -- 9. DeepProfiler users switch in one command ---------------------------------------------------

def _write_npz_layouts(root, rng):
    """The same 2 plates × 2 wells × 2 sites in DeepProfiler's three layouts."""
    sites = {}
    for plate in ("P1", "000123"):
        for well in ("A01", "B02"):
            for site in (1, 2):
                sites[(plate, well, str(site))] = rng.normal(size=(int(rng.integers(3, 9)), 12)).astype(np.float32)
    for (plate, well, site), feats in sites.items():
        meta = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": int(site), "Metadata_Model": "efficientnet"}
        nested = root / "nested" / plate / well / f"{site}.npz"
        nested.parent.mkdir(parents=True, exist_ok=True)
        nested.write_bytes(encode_npz(feats, meta, np.zeros((len(feats), 2))))
        flat = root / "flat" / plate / f"{well}_{site}.npz"
        flat.parent.mkdir(parents=True, exist_ok=True)
        flat.write_bytes(encode_npz(feats, meta, np.zeros((len(feats), 2))))
        (root / "old").mkdir(exist_ok=True)
        np.savez_compressed(root / "old" / f"{plate}_{well}_{site}.npz", f=feats)  # the earliest profiling.py
    return sites


@pytest.mark.parametrize("layout", ["nested", "flat", "old"])
def test_a_deepprofiler_features_folder_gives_site_medians_and_well_means(tmp_path, layout):
    sites = _write_npz_layouts(tmp_path, np.random.default_rng(4))
    out = tmp_path / f"agg-{layout}"
    result = runner.invoke(app, ["aggregate", str(tmp_path / layout), "--output", str(out)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["sites"] == 8 and printed["wells"] == 4 and printed["cells_read"] == sum(map(len, sites.values()))
    got = pd.read_parquet(out / "sites.parquet")
    feats = [c for c in got.columns if not c.startswith("Metadata_")]
    assert len(feats) == 12
    for row in got.itertuples(index=False):
        key = (row.Metadata_Plate, row.Metadata_Well, str(row.Metadata_Site))
        np.testing.assert_allclose(np.asarray([getattr(row, f) for f in feats], dtype=np.float32),
                                   np.median(sites[key], axis=0), rtol=1e-6)
    wells = pd.read_parquet(out / "wells.parquet")
    assert sorted(wells.Metadata_Plate.unique()) == ["000123", "P1"]  # the plate stays text
    expected = np.mean([np.median(sites[("P1", "B02", s)], axis=0) for s in ("1", "2")], axis=0)
    row = wells[(wells.Metadata_Plate == "P1") & (wells.Metadata_Well == "B02")][feats].to_numpy()[0]
    np.testing.assert_allclose(row, expected, rtol=1e-6)


def test_the_real_deepprofiler_outputs_aggregate(shared_data, tmp_path):
    root = shared_data / "interop" / "deepprofiler_example" / "SQ00014812_and_SQ00014813" / "outputs" / "results" / "features"
    res = aggregate_cells(root)
    assert res.accounting["input"] == "deepprofiler_npz"
    assert res.accounting["cells_read"] == 158 + 179 and len(res.wells) == 1 and len(res.features) == 6400
    assert res.sites.Metadata_Site.tolist() == ["5", "8"]


def test_a_well_without_cells_is_a_missing_row_not_a_reason_to_drop_every_feature():
    rng = np.random.default_rng(5)
    df = pd.DataFrame(rng.normal(size=(40, 3)), columns=["f1", "f2", "f3"])
    df.loc[[0, 1, 2, 3, 4, 6], :] = np.nan  # 15 % of the wells have no profile at all
    df.loc[5, "f2"] = np.nan  # 1 of the 34 others: 3 %
    fm = feature_matrix_na(df)
    assert fm.features == ["f1", "f2", "f3"] and fm.dropped_na == []
    assert fm.ok.sum() == 33  # 6 empty wells and 1 with a NaN left out
    with pytest.raises(InputError, match="every row is NaN in every feature"):
        feature_matrix_na(df.iloc[:5])


def test_an_aggregation_that_keeps_no_well_is_an_error(fibrosis_files, tmp_path):
    cells = pd.read_parquet(fibrosis_files[0])
    column = [c for c in cells.columns if not c.startswith("Metadata_")][0]
    cells[column] = np.nan
    path = tmp_path / "c.parquet"
    cells.to_parquet(path)
    result = runner.invoke(app, ["aggregate", str(path), "--na-cutoff", "1", "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and isinstance(result.exception, InputError)
    assert "no well profile: of 607 cells, 0 have no" in str(result.exception) and "607 have a NaN feature" in str(result.exception)


def test_the_lambda_sweep_lists_the_dropped_column(lincs, tmp_path):
    column = [c for c in lincs.columns if not c.startswith("Metadata_")][2]
    path = tmp_path / "w.parquet"
    lincs.assign(**{column: np.nan}).to_parquet(path)
    result = runner.invoke(app, ["sweep", str(path), "--treatment-cols", ",".join(LINCS_TREATMENT), "--annotation-col",
                                 "Metadata_moa", "--control-query", LINCS_CONTROLS, "--lambdas", "0.01",
                                 "--output", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["features_dropped_na"] == [column]
    assert "1 feature(s) NaN in more than 0.05 of the wells were dropped" in result.output
