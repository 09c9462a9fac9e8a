"""Treatments and plate maps: the paper's designs (5 replicates over plates, controls on every plate)."""

from __future__ import annotations

import pytest

from raycp.errors import InputError
from raycp.io.index import IS_CONTROL, PLATE, TREATMENT, WELL
from raycp.screens import layout as lay
from raycp.screens.config import LayoutConfig, TreatmentConfig


def test_strength_classes_follow_the_papers_20_percent_split():
    t = lay.design_treatments(TreatmentConfig(n=40), perturbation="compound", seed=3)
    treated = t[~t[IS_CONTROL]]
    counts = treated[lay.STRENGTH_CLASS].value_counts().to_dict()
    assert counts == {"strong": 8, "median": 12, "weak": 12, "null": 8}
    assert (treated.loc[treated[lay.STRENGTH_CLASS] == "null", lay.STRENGTH] == 0).all()
    strong = treated.loc[treated[lay.STRENGTH_CLASS] == "strong", lay.STRENGTH]
    weak = treated.loc[treated[lay.STRENGTH_CLASS] == "weak", lay.STRENGTH]
    assert strong.min() > weak.max()
    f = treated[lay.RESPONDING]
    assert f.between(0.5, 0.9).all() and f.nunique() > 30


def test_several_treatments_per_moa_spanning_strengths_and_some_with_two_moas():
    t = lay.design_treatments(TreatmentConfig(n=40), perturbation="compound", seed=3)
    treated = t[~t[IS_CONTROL]]
    primary = treated[lay.MOA].str.split("|").str[0]
    assert primary.value_counts().min() >= 6
    for _, grp in treated.groupby(primary):
        assert grp[lay.STRENGTH_CLASS].nunique() >= 3
    multi = treated[treated[lay.MOA].str.contains("|", regex=False)]
    assert len(multi) == 4
    assert all(len(set(m.split("|"))) == 2 for m in multi[lay.MOA])
    control = t[t[IS_CONTROL]]
    assert control[TREATMENT].tolist() == ["DMSO"] and control[lay.MOA].isna().all()
    genes = lay.design_treatments(TreatmentConfig(n=4), perturbation="gene", seed=3)
    assert genes[TREATMENT].iloc[-1] == "EMPTY" and genes[TREATMENT].iloc[0].startswith("orf")


def test_plate_maps_spread_5_replicates_over_plates_with_controls_on_every_plate():
    t = lay.design_treatments(TreatmentConfig(n=12), perturbation="compound", seed=0)
    m = lay.design_plates(t, LayoutConfig(plates=2, controls_per_plate=8), seed=0)
    assert not m.duplicated([PLATE, WELL]).any()
    assert m[WELL].str.fullmatch(r"[A-H](0[1-9]|1[0-2])").all()
    per = m[~m[IS_CONTROL]].groupby(TREATMENT)[PLATE].agg(["size", "nunique"])
    assert (per["size"] == 5).all() and (per["nunique"] == 2).all()
    assert m[m[IS_CONTROL]].groupby(PLATE).size().to_dict() == {"SCR01": 8, "SCR02": 8}
    again = lay.design_plates(t, LayoutConfig(plates=2, controls_per_plate=8), seed=0)
    other = lay.design_plates(t, LayoutConfig(plates=2, controls_per_plate=8), seed=1)
    assert again.equals(m) and not other[WELL].equals(m[WELL])
    assert set(m["edge"]) <= {0.0, 0.5, 1.0} and (m["edge"] == 1.0).any()


def test_384_well_plates_and_sites():
    t = lay.design_treatments(TreatmentConfig(n=100), perturbation="compound", seed=0)
    m = lay.design_plates(t, LayoutConfig(plates=2, wells=384, controls_per_plate=32), seed=0)
    assert m[WELL].str.fullmatch(r"[A-P](0[1-9]|1[0-9]|2[0-4])").all()
    assert len(m) == 100 * 5 + 64
    s = lay.sites_table(m, 4)
    assert len(s) == 4 * len(m) and set(s["Metadata_Site"]) == {1, 2, 3, 4}


def test_more_treatments_than_wells_is_a_clear_error():
    t = lay.design_treatments(TreatmentConfig(n=40), perturbation="compound", seed=0)
    with pytest.raises(InputError, match=r"preset mini: the plate map needs 108 wells on a plate .* "
                                         r"but a 96-well plate has 96 \(fix: use more plates"):
        lay.design_plates(t, LayoutConfig(plates=2, controls_per_plate=8), seed=0, source="preset mini")
