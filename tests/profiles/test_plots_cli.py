"""The figures and the other profile verbs, on real data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raycp.evaluate.metrics import cosine_similarity, evaluate_profiles
from raycp.evaluate.plots import plot_map_vs_lambda, plot_pr_curve, write_html
from raycp.profiles.cli import app

from .conftest import LINCS_CONTROLS, LINCS_TREATMENT, published_map, published_match_matrix

PNG = b"\x89PNG\r\n\x1a\n"


def test_interpolated_pr_curve_is_the_published_curve(lincs_library, tmp_path):
    X, ann = lincs_library
    ev = evaluate_profiles(X, ann)
    recall, precision = published_map(cosine_similarity(X), published_match_matrix(ann), curve=True)
    np.testing.assert_array_equal(ev.pr_curve["recall"].to_numpy(), recall)
    np.testing.assert_allclose(ev.pr_curve["precision"].to_numpy(), precision, rtol=0, atol=1e-12)
    assert ev.pr_curve["precision"].mean() == pytest.approx(ev.summary["map_paper"], abs=1e-12)
    png = plot_pr_curve(ev.pr_curve, tmp_path / "pr.png")
    assert png.read_bytes()[:8] == PNG
    page = write_html(tmp_path, [png], ev.summary)
    assert "pr.png" in page.read_text() and "map_paper" in page.read_text()


def test_sweep_cli_and_map_vs_lambda(lincs_path, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        app,
        ["sweep", str(lincs_path), "--treatment-cols", ",".join(LINCS_TREATMENT), "--annotation-col", "Metadata_moa",
         "--control-query", LINCS_CONTROLS, "--lambdas", "0.01,1", "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "sweep.parquet")
    assert np.isnan(table["sphere_lambda"].iloc[0]) and table["sphere_lambda"].iloc[1:].tolist() == [1.0, 0.01]
    assert table["map_paper"].iloc[0] == pytest.approx(0.26266549643224735, abs=1e-12)
    assert table["map_paper"].iloc[2] == pytest.approx(0.24479016491306296, abs=1e-12)
    assert (out / "map_vs_lambda.png").read_bytes()[:8] == PNG
    png = plot_map_vs_lambda(table, tmp_path / "again.png", metric="folds_of_enrichment")
    assert png.read_bytes()[:8] == PNG


def test_aggregate_cli_on_real_cells(fibrosis_files, tmp_path):
    out = tmp_path / "agg"
    result = CliRunner().invoke(app, ["aggregate", *map(str, fibrosis_files), "--output", str(out), "--memory-mb", "1"])
    assert result.exit_code == 0, result.output
    wells = pd.read_parquet(out / "wells.parquet")
    sites = pd.read_parquet(out / "sites.parquet")
    acct = json.loads((out / "aggregation.json").read_text())
    assert len(wells) == 32 and len(sites) == acct["sites"] == 485 and acct["cells_read"] == 1992
    assert wells["Metadata_n_cells"].sum() == 1992
    assert not any(p.name.startswith("raycp-sites-") for p in out.iterdir())  # spill cleaned up


def test_effect_cli_writes_subsets(lincs_path, tmp_path):
    out = tmp_path / "effect"
    result = CliRunner().invoke(
        app, ["effect", str(lincs_path), "--treatment-cols", ",".join(LINCS_TREATMENT), "--control-query", LINCS_CONTROLS,
              "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    effect = pd.read_parquet(out / "effect.parquet")
    assert len(effect) == 338
    sizes = {n: len(pd.read_csv(out / "subsets" / f"{n}.csv")) for n in ("weakest", "median", "strongest")}
    assert sizes == {"weakest": 68, "median": 68, "strongest": 68}
    strongest = pd.read_csv(out / "subsets" / "strongest.csv")
    assert strongest["ate"].min() >= pd.read_csv(out / "subsets" / "median.csv")["ate"].max()


@pytest.mark.slow
def test_evaluate_cli_with_umap_plots(lincs_path, tmp_path):
    """UMAP of well profiles before/after sphering, by plate and by control (umap-learn: slow to compile)."""
    out = tmp_path / "ev"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(lincs_path), "--treatment-cols", ",".join(LINCS_TREATMENT), "--annotation-col", "Metadata_moa",
         "--control-query", LINCS_CONTROLS, "--sphere-lambda", "0.01", "--plots", "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    for name in ("umap.png", "pr_curve.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "umap.png" in (out / "plots.html").read_text()
    assert json.loads((out / "metrics.json").read_text())["plots"] == ["pr_curve.png", "umap.png", "plots.html"]
