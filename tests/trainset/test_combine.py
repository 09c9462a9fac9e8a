"""The paper's combined training set (issue 15): strong treatments of several sources, shared
treatments first, control types as classes, a few control wells per plate, small classes dropped."""

from __future__ import annotations

import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.trainset.combine import CombineSettings, Source, combine


def _wells(plate: str, well: str, label: str, control: bool, cells: int = 10) -> list[dict]:
    return [{"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": 1, "Metadata_CellId": i,
             "Metadata_Treatment": label, "Metadata_IsControl": control, "crops_file": f"{plate}/{well}.parquet"}
            for i in range(cells)]


def _source(treatments: dict[str, int], ranks: list[str], controls: dict[str, dict[str, int]]) -> Source:
    """treatments: label -> wells (10 cells each, on plate P1); controls: plate -> {type: wells}."""
    rows, n = [], 0
    for label, wells in treatments.items():
        for _ in range(wells):
            n += 1
            rows += _wells("P1", f"T{n:02d}", label, False)
    for plate, types in controls.items():
        for ctype, wells in types.items():
            for _ in range(wells):
                n += 1
                rows += _wells(plate, f"C{n:02d}", ctype, True)
    return Source(cells=pd.DataFrame(rows), effect=pd.DataFrame({"Metadata_Treatment": ranks,
                                                                 "rank": range(1, len(ranks) + 1)}))


@pytest.fixture
def sources() -> dict[str, Source]:
    a = _source({f"t{i}": (3 if i == 1 else 2) for i in range(1, 11)}, [f"t{i}" for i in range(1, 11)],
                {"P1": {"DMSO": 5, "EMPTY": 1}, "P2": {"DMSO": 5, "EMPTY": 1}})
    b = _source({t: 2 for t in ("t11", "t5", "t12", "t13", "t14")}, ["t11", "t5", "t12", "t13", "t14"],
                {"P9": {"DMSO": 4}})
    return {"A": a, "B": b}


def test_counts_equal_the_hand_computed_expectation(sources):
    """A: 10 treatments → strongest 20 % = t1, t2; t5 is also in B (shared) → kept. B: 5 → t11, and
    t5. Controls: 3 DMSO wells per plate (A: 2 plates, B: 1) and A's one EMPTY well per plate.
    Cells (10 a well): t1 30, t2 20, t5 20 + 20, t11 20, DMSO 60 + 30, EMPTY 20; under 25 cells
    t2, t11 and EMPTY go."""
    got = combine(sources, CombineSettings(strongest=0.2, controls_per_plate=3, min_cells=25))
    a = got.accounting
    assert a["shared_treatments"] == ["t5"]
    assert a["sources"]["A"]["strongest"] == 2 and a["sources"]["A"]["treatments_kept"] == 3
    assert a["sources"]["B"]["strongest"] == 1 and a["sources"]["B"]["treatments_kept"] == 2
    assert a["sources"]["A"]["control_wells"] == 8 and a["sources"]["B"]["control_wells"] == 3
    assert a["classes_dropped"] == {"EMPTY": 20, "t11": 20, "t2": 20}
    assert a["classes"] == 3 and a["cells"] == 160
    expected = pd.DataFrame({"Metadata_Source": ["A", "A", "B", "B"], "kind": ["DMSO", "treatment", "DMSO", "treatment"],
                             "classes": [1, 2, 1, 1], "wells": [6, 5, 3, 2], "cells": [60, 50, 30, 20]})
    pd.testing.assert_frame_equal(got.summary, expected, check_dtype=False)
    assert set(got.index["Metadata_Treatment"]) == {"t1", "t5", "DMSO"}
    assert not got.index.duplicated(["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_Site",
                                     "Metadata_CellId"]).any()


def test_control_wells_are_drawn_by_seed_and_shared_first_can_be_off(sources):
    one = combine(sources, CombineSettings(min_cells=1, seed=0)).index
    again = combine(sources, CombineSettings(min_cells=1, seed=0)).index
    pd.testing.assert_frame_equal(one, again)
    others = [combine(sources, CombineSettings(min_cells=1, seed=s)).index for s in range(1, 6)]
    wells = lambda ix: set(ix.loc[ix.Metadata_IsControl, "Metadata_Well"])  # noqa: E731
    assert any(wells(o) != wells(one) for o in others)
    alone = combine(sources, CombineSettings(min_cells=1, shared_first=False)).accounting
    assert alone["sources"]["A"]["treatments_kept"] == 2 and alone["sources"]["B"]["treatments_kept"] == 1
    every = combine(sources, CombineSettings(min_cells=1, controls_per_plate=None)).accounting
    assert every["sources"]["A"]["control_wells"] == 12


def test_mistakes_are_named(sources):
    with pytest.raises(InputError, match="strongest share"):
        combine(sources, CombineSettings(strongest=0))
    with pytest.raises(InputError, match="class"):
        combine(sources, CombineSettings(min_cells=10_000))
    broken = {"A": sources["A"], "B": Source(cells=sources["B"].cells.drop(columns="crops_file"), effect=sources["B"].effect)}
    with pytest.raises(InputError, match="source B: its crops have no 'crops_file'"):
        combine(broken)
