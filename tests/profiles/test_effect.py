"""Given the real LINCS plate sphered with the paper's λ = 1e-2, the treatment effect is the mean
z-scored distance to the plate's median control, grows with dose, and yields the 20% subsets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.profiles.effect import select_subsets, treatment_effect
from raycp.profiles.sphere import sphere

from .conftest import LINCS_TREATMENT


@pytest.fixture(scope="module")
def sphered(lincs):
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    ctrl = (lincs.Metadata_pert_type == "control").to_numpy()
    wells = lincs.copy()
    wells[feats] = sphere(wells[feats].to_numpy(), ctrl, 1e-2)
    return wells, ctrl, feats


def test_distances_and_z_scores(sphered):
    wells, ctrl, feats = sphered
    res = treatment_effect(wells, LINCS_TREATMENT, ctrl)
    w = res.wells
    med = np.median(wells.loc[ctrl, feats].to_numpy(), axis=0)
    direct = np.linalg.norm(wells[feats].to_numpy() - med, axis=1)
    np.testing.assert_allclose(np.sort(w["distance"].to_numpy()), np.sort(direct), rtol=1e-12)
    zc = w.loc[w.is_control, "z"]
    assert zc.mean() == pytest.approx(0, abs=1e-9) and zc.std(ddof=0) == pytest.approx(1, abs=1e-9)
    t = res.treatments
    assert len(t) == 338 and t["n_wells"].sum() == 360
    assert (np.diff(t["ate"].to_numpy()) <= 0).all() and t["rank"].tolist() == list(range(1, 339))
    first = t.iloc[0]
    sel = (w[LINCS_TREATMENT[0]] == first[LINCS_TREATMENT[0]]) & (w[LINCS_TREATMENT[1]] == first[LINCS_TREATMENT[1]]) & ~w.is_control
    assert first["ate"] == pytest.approx(w.loc[sel, "z"].mean(), rel=1e-12)


def test_effect_grows_with_dose(sphered):
    import scipy.stats

    wells, ctrl, _ = sphered
    t = treatment_effect(wells, LINCS_TREATMENT, ctrl).treatments
    rho, p = scipy.stats.spearmanr(t["Metadata_mmoles_per_liter"], t["ate"])
    assert rho > 0 and p < 1e-3
    subsets = select_subsets(t)
    assert subsets["strongest"]["Metadata_mmoles_per_liter"].median() > subsets["weakest"]["Metadata_mmoles_per_liter"].median()


def test_subsets_are_the_weakest_median_strongest_fifths(sphered):
    wells, ctrl, _ = sphered
    t = treatment_effect(wells, LINCS_TREATMENT, ctrl).treatments
    s = select_subsets(t, 0.2)
    k = round(0.2 * len(t))
    assert [len(s[n]) for n in ("weakest", "median", "strongest")] == [k, k, k]
    assert s["weakest"]["ate"].max() <= s["median"]["ate"].min() <= s["median"]["ate"].max() <= s["strongest"]["ate"].min()
    keys = [set(map(tuple, s[n][LINCS_TREATMENT].to_numpy().tolist())) for n in s]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    assert s["weakest"]["ate"].min() == t["ate"].min() and s["strongest"]["ate"].max() == t["ate"].max()


def test_plate_without_controls_is_skipped_and_counted(sphered):
    wells, ctrl, _ = sphered
    two = pd.concat([wells, wells[~ctrl].assign(Metadata_Plate="NO_CONTROLS")], ignore_index=True)
    mask = np.concatenate([ctrl, np.zeros((~ctrl).sum(), dtype=bool)])
    res = treatment_effect(two, LINCS_TREATMENT, mask)
    assert res.accounting["plates_skipped_no_controls"] == ["NO_CONTROLS"]
    assert res.accounting["wells_skipped_no_controls"] == int((~ctrl).sum())
    assert res.treatments["n_wells"].sum() == int((~ctrl).sum())


def test_no_controls_at_all_is_an_error(sphered):
    wells, _, _ = sphered
    with pytest.raises(InputError, match="no control wells"):
        treatment_effect(wells, LINCS_TREATMENT, np.zeros(len(wells), dtype=bool))
