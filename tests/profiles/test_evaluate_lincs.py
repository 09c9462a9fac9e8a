"""Given the real LINCS plate, the evaluation gives the paper's published numbers (±1e-6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from raycp.evaluate import evaluate
from raycp.profiles.cli import app

from .conftest import LINCS_CONTROLS, LINCS_TREATMENT

# The paper's published evaluation code run on this file. The issue quotes map_paper to 6
# decimals and FoE to 4 (73.6621, 62.6238); the full values of that code are below. Both are
# checked: the full value to 1e-6, and the quoted rounding exactly.
PUBLISHED = {
    None: {"map_paper": (0.262665, 0.26266549643224735), "folds_of_enrichment": (73.6621, 73.662109375)},
    0.01: {"map_paper": (0.244790, 0.24479016491306296), "folds_of_enrichment": (62.6238, 62.623828125)},
}


def _check(value, quoted, full, decimals):
    assert value == pytest.approx(full, abs=1e-6)
    assert round(value, decimals) == quoted
    assert abs(value - quoted) <= 0.5 * 10**-decimals


@pytest.mark.parametrize("lam", [None, 0.01])
def test_lincs_published_numbers(lincs, lam):
    run = evaluate(lincs, LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS, sphere_lambda=lam)
    s = run.evaluation.summary
    assert s["n_treatments"] == 320
    assert s["n_queries_foe"] == 320
    assert s["n_queries_map"] == 318
    _check(s["map_paper"], *PUBLISHED[lam]["map_paper"], decimals=6)
    _check(s["folds_of_enrichment"], *PUBLISHED[lam]["folds_of_enrichment"], decimals=4)


def test_full_values_are_the_published_codes(lincs):
    """The full reference values above are what the transcribed published code gives (no sphering)."""
    from raycp.evaluate.metrics import cosine_similarity

    from .conftest import published_foe, published_map, published_match_matrix

    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    t = lincs[(lincs.Metadata_pert_type != "control") & lincs.Metadata_moa.notna()]
    g = t.groupby(LINCS_TREATMENT)
    S = cosine_similarity(g[feats].mean().to_numpy())
    M = published_match_matrix(g["Metadata_moa"].first().tolist())
    assert np.nanmean(published_map(S, M)) == pytest.approx(PUBLISHED[None]["map_paper"][1], abs=1e-12)
    assert np.nanmean(published_foe(S, M)) == pytest.approx(PUBLISHED[None]["folds_of_enrichment"][1], abs=1e-9)


def test_lincs_library_accounting(lincs):
    """Controls (DMSO, no MoA) and the 18 unannotated compound × dose treatments are not in the library."""
    run = evaluate(lincs, LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS)
    a = run.accounting
    assert a["control_wells"] == 24
    assert a["treatments_seen"] == 338
    assert a["treatments_unannotated"] == 18
    assert a["treatments_in_library"] == 320
    assert len(run.library) == 320
    assert run.library["Metadata_n_wells"].sum() == 342  # the annotated treated wells


def test_cli_evaluate_writes_metrics_and_tables(lincs_path, tmp_path):
    out = tmp_path / "ev"
    result = CliRunner().invoke(
        app,
        [
            "evaluate", str(lincs_path),
            "--treatment-cols", ",".join(LINCS_TREATMENT),
            "--annotation-col", "Metadata_moa",
            "--control-query", LINCS_CONTROLS,
            "--sphere-lambda", "0.01",
            "--output", str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("map_paper", "map", "folds_of_enrichment", "n_treatments", "n_queries_map", "n_queries_foe"):
        assert key in metrics
    _check(metrics["map_paper"], *PUBLISHED[0.01]["map_paper"], decimals=6)
    _check(metrics["folds_of_enrichment"], *PUBLISHED[0.01]["folds_of_enrichment"], decimals=4)
    import pandas as pd

    qmap = pd.read_parquet(out / "queries_map.parquet")
    qfoe = pd.read_parquet(out / "queries_foe.parquet")
    assert len(qmap) == 318 and len(qfoe) == 320
    assert qmap["ap_paper"].mean() == pytest.approx(metrics["map_paper"], abs=1e-12)
    assert qfoe["odds_ratio"].mean() == pytest.approx(metrics["folds_of_enrichment"], abs=1e-9)
    assert {"Metadata_broad_sample", "Metadata_mmoles_per_liter", "Metadata_moa"} <= set(qmap.columns)
