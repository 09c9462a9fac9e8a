"""Per-plate standardisation to control wells (the normalisation of the paper's CellProfiler profiles)."""

from __future__ import annotations

import numpy as np
import pytest

from raycp.errors import InputError
from raycp.profiles.normalize import standardize_to_controls


def test_controls_of_every_plate_become_mean_0_sd_1():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(5, 3, (20, 4)), rng.normal(-2, 0.01, (20, 4))]).astype(np.float32)
    X[:, 3] = 7.0  # constant feature: centred only
    plates = np.repeat(["P1", "P2"], 20)
    ctrl = np.tile(np.arange(20) < 8, 2)
    Z = standardize_to_controls(X, ctrl, plates)
    assert Z.dtype == np.float32
    for p in ("P1", "P2"):
        c = Z[(plates == p) & ctrl]
        np.testing.assert_allclose(c[:, :3].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(c[:, :3].std(0), 1, atol=1e-4)
    assert np.all(Z[:, 3] == 0)


def test_a_plate_without_controls_is_named():
    X = np.ones((4, 2))
    with pytest.raises(InputError, match="group 'P2' has no control wells"):
        standardize_to_controls(X, np.array([True, False, False, False]), ["P1", "P1", "P2", "P2"])
