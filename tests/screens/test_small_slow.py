"""The `small` preset (the demo): all six MoAs, and the structure at 4 plates × 40 treatments."""

from __future__ import annotations

import pandas as pd
import pytest

from raycp.io.index import IS_CONTROL, PLATE, SITE, TREATMENT, WELL
from raycp.screens.build import build_screen
from raycp.screens.stats import measure_screen, structure_report

from .conftest import screen_config

pytestmark = pytest.mark.slow


def test_small_screen_has_the_intended_structure(source_folder, ray_cluster, tmp_path):
    result = build_screen(screen_config(source_folder, preset="small"), str(tmp_path / "small"))
    t = result.index.table
    assert len(t) == 792 and t[PLATE].nunique() == 4
    truth = result.treatments
    primary = truth.loc[~truth[IS_CONTROL], "Metadata_MoA"].str.split("|").str[0]
    assert primary.nunique() == 6
    report = structure_report(measure_screen(t, result.index.channels, workers=2), truth)
    assert report["plate_accuracy_raw"] >= 0.8 and report["plate_accuracy_normalised"] < 0.5
    e = report["effect_by_class"]
    assert e["strong"]["min"] > e["null"]["max"]
    assert e["strong"]["mean"] > e["median"]["mean"] > e["weak"]["mean"] > e["null"]["mean"]
    assert report["spearman_strength_effect"] > 0.7
    # the cytotoxic program lowers cell density: strong cytotoxic wells hold fewer cells than controls
    sites = result.sites.merge(truth, on=TREATMENT)
    ctrl = sites.loc[sites[IS_CONTROL], "n_cells"].mean()
    toxic = sites[(sites["Metadata_MoA"].str.contains("cytotoxic", na=False))
                  & (sites["Metadata_StrengthClass"] == "strong")]
    if len(toxic):
        assert toxic["n_cells"].mean() < 0.8 * ctrl and (toxic["n_lost"] > 0).all()
    assert (sites.groupby([PLATE, WELL])[SITE].nunique() == 3).all()
    assert isinstance(result.nuclei, pd.DataFrame) and len(result.nuclei) > 15000
