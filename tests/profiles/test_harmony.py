"""Given real site profiles from 4 plates, Harmony (plates as batches) mixes the plates: the share
of a site's nearest neighbours from its own plate falls from above chance to chance level."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.profiles.aggregate import aggregate_cells
from raycp.profiles.harmony import harmony


def _same_plate_neighbours(X, plates, k=10):
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Xn @ Xn.T
    np.fill_diagonal(S, -np.inf)
    nn = np.argsort(-S, axis=1)[:, :k]
    return (plates[nn] == plates[:, None]).mean()


def test_harmony_mixes_plates_of_real_sites(fibrosis_files):
    sites = aggregate_cells(fibrosis_files).sites
    feats = [c for c in sites.columns if not c.startswith("Metadata_")]
    X = sites[feats].to_numpy()
    X = (X - X.mean(0)) / (X.std(0) + 1e-12)
    plates = sites["Metadata_Plate"].to_numpy()
    before = _same_plate_neighbours(X, plates)
    Z = harmony(X, plates, n_components=30)
    after = _same_plate_neighbours(Z, plates)
    counts = pd.Series(plates).value_counts().to_numpy()
    chance = float((counts * (counts - 1)).sum() / (len(plates) * (len(plates) - 1)))
    assert Z.shape == (len(X), 30)
    assert before > chance + 0.03
    assert after < before - 0.05 and after < chance + 0.01


def test_harmony_needs_two_batches(fibrosis_files):
    X = np.random.default_rng(0).normal(size=(50, 5))
    with pytest.raises(InputError, match="at least 2"):
        harmony(X, np.zeros(50))
