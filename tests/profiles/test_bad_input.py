"""Bad input gives a one-line InputError naming the problem, or a documented skip that is counted."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from raycp.errors import InputError
from raycp.evaluate import evaluate
from raycp.profiles.cli import app

from .conftest import LINCS_CONTROLS, LINCS_TREATMENT


def _feature(lincs, i=10):
    return [c for c in lincs.columns if not c.startswith("Metadata_")][i]


def test_inf_in_a_feature_names_the_column(lincs):
    bad = lincs.copy()
    col = _feature(lincs)
    bad.loc[7, col] = np.inf
    with pytest.raises(InputError, match=col) as err:
        evaluate(bad, LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS)
    assert "\n" not in str(err.value)


def test_zero_controls_is_an_error(lincs):
    with pytest.raises(InputError, match="matched no well"):
        evaluate(lincs, LINCS_TREATMENT, "Metadata_moa", "Metadata_pert_type == 'nothing'", sphere_lambda=0.01)
    with pytest.raises(InputError, match="invalid"):
        evaluate(lincs, LINCS_TREATMENT, "Metadata_moa", "Metadata_no_such_column == 1")


def test_plate_with_no_control_wells_is_an_error_for_per_plate_sphering(lincs):
    two = lincs.copy()
    two.loc[two.index[:48], "Metadata_Plate"] = "PLATE_B"
    two.loc[two.index[:48], "Metadata_pert_type"] = "trt"
    with pytest.raises(InputError, match="PLATE_B"):
        evaluate(two, LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS, sphere_lambda=0.01, sphere_scope_col="Metadata_Plate")


def test_missing_annotation_column_is_named(lincs):
    with pytest.raises(InputError, match="Metadata_mechanism"):
        evaluate(lincs, LINCS_TREATMENT, "Metadata_mechanism", LINCS_CONTROLS)
    with pytest.raises(InputError, match="Metadata_dose"):
        evaluate(lincs, ["Metadata_broad_sample", "Metadata_dose"], "Metadata_moa", LINCS_CONTROLS)


def test_treatment_with_no_wells_is_counted(lincs):
    """A treatment whose every well has NaN features has no wells left: skipped and counted."""
    bad = lincs.copy()
    trt = bad[(bad.Metadata_pert_type != "control") & bad.Metadata_moa.notna()]
    key = trt[LINCS_TREATMENT].iloc[0]
    rows = (bad[LINCS_TREATMENT[0]] == key.iloc[0]) & (bad[LINCS_TREATMENT[1]] == key.iloc[1])
    bad.loc[rows, _feature(lincs, 3)] = np.nan
    run = evaluate(bad, LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS)
    a = run.accounting
    assert a["treatments_without_wells"] == 1
    assert a["wells_dropped_nan"] == int(rows.sum())
    assert run.evaluation.summary["n_treatments"] == 319


def test_nan_annotations_are_skipped_and_counted(lincs):
    bad = lincs.copy()
    moa_rows = bad.Metadata_moa.notna() & (bad.Metadata_pert_type != "control")
    first = bad.loc[moa_rows, "Metadata_broad_sample"].iloc[0]
    bad.loc[bad.Metadata_broad_sample == first, "Metadata_moa"] = np.nan
    n_lost = bad.loc[bad.Metadata_broad_sample == first, LINCS_TREATMENT].drop_duplicates().shape[0]
    run = evaluate(bad, LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS)
    assert run.accounting["treatments_unannotated"] == 18 + n_lost
    assert run.evaluation.summary["n_treatments"] == 320 - n_lost


def test_cli_raises_input_error_for_the_main_cli(lincs_path, tmp_path):
    """The profile CLI does not catch InputError: raycp's main CLI prints it as one line (exit 2)."""
    result = CliRunner().invoke(
        app,
        ["evaluate", str(lincs_path), "--treatment-cols", ",".join(LINCS_TREATMENT), "--annotation-col", "Metadata_nope",
         "--control-query", LINCS_CONTROLS, "--output", str(tmp_path / "x")],
    )
    assert isinstance(result.exception, InputError)
    assert "Metadata_nope" in str(result.exception)
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "absent.csv"), "--treatment-cols", "A", "--annotation-col", "B",
                                       "--control-query", "A == 1"])
    assert isinstance(missing.exception, InputError) and "not found" in str(missing.exception)
