"""Given real control profiles, sphering whitens them: identity covariance as λ → 0, the documented
shrinkage δ/(δ+λ) for λ > 0, also when features outnumber controls, also per plate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.profiles.io import feature_columns
from raycp.profiles.sphere import fit_sphere, sphere


@pytest.fixture(scope="module")
def lincs_controls(lincs):
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    return lincs.loc[lincs.Metadata_pert_type == "control", feats].to_numpy()


@pytest.fixture(scope="module")
def fibrosis_cells(fibrosis_files):
    """All 1,992 real single cells (all DMSO) of the 4 plates, on the 474 features common to all."""
    frames = [pd.read_parquet(f) for f in fibrosis_files]
    common = sorted(set.intersection(*[set(feature_columns(f)) for f in frames]))
    return pd.concat([f[["Metadata_Plate", *common]] for f in frames], ignore_index=True), common


def _cov(Z):
    Zc = Z - Z.mean(axis=0)
    return Zc.T @ Zc / len(Z)


def test_identity_covariance_as_lambda_vanishes_full_rank(fibrosis_cells):
    cells, feats = fibrosis_cells
    X = cells[feats].to_numpy()
    assert X.shape[0] > X.shape[1]
    sp = fit_sphere(X, 1e-10)
    Z = sp.apply(X)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(_cov(Z), np.eye(len(feats)), atol=1e-4)


def test_features_outnumber_controls(lincs_controls):
    """24 DMSO wells × 454 features: the 23-dim span of the controls is whitened, the rest is 0."""
    C = lincs_controls
    n, d = C.shape
    assert d > n
    ev = np.linalg.eigvalsh(_cov(fit_sphere(C, 1e-8).apply(C)))
    np.testing.assert_allclose(ev[-(n - 1):], 1.0, atol=1e-5)
    np.testing.assert_allclose(ev[: d - (n - 1)], 0.0, atol=1e-5)


@pytest.mark.parametrize("lam", [1e-3, 1e-2, 1.0])
def test_documented_shrinkage(lincs_controls, lam):
    """Sphered controls have covariance U Δ(Δ+λ)⁻¹ Uᵀ: eigenvalues δ/(δ+λ)."""
    sp = fit_sphere(lincs_controls, lam)
    cov = _cov(sp.apply(lincs_controls))
    np.testing.assert_allclose(cov, sp.control_covariance(), atol=1e-9)
    delta = np.clip(np.sort(sp.eigenvalues), 0, None)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(cov)), np.sort(delta / (delta + lam)), atol=1e-9)


def test_matches_the_paper_whitening_normalizer(lincs, lincs_controls):
    """Same transform as DeepProfilerExperiments' WhiteningNormalizer (ZCA, Σ = XᵀX/n)."""
    import scipy.linalg

    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    X = lincs[feats].to_numpy()
    mu = lincs_controls.mean(axis=0)
    Xc = lincs_controls - mu
    s, V = scipy.linalg.eigh((1 / Xc.shape[0]) * np.dot(Xc.T, Xc))
    W = np.dot(np.dot(V, np.diag(1.0 / np.sqrt(s + 0.01))), V.T)
    mask = (lincs.Metadata_pert_type == "control").to_numpy()
    np.testing.assert_allclose(sphere(X, mask, 0.01), np.dot(X - mu, W), rtol=0, atol=1e-9)


def test_float32_profiles_stay_float32_with_float64_fit(lincs, lincs_controls):
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    X32 = lincs[feats].to_numpy(dtype=np.float32)
    mask = (lincs.Metadata_pert_type == "control").to_numpy()
    Z32 = sphere(X32, mask, 0.01)
    assert Z32.dtype == np.float32
    Z64 = sphere(X32.astype(np.float64), mask, 0.01)
    assert np.abs(Z32 - Z64).max() < 1e-3 * np.abs(Z64).max()


def test_per_plate_scope_on_real_single_cells(fibrosis_cells):
    """One transform per plate, fitted on that plate: each plate is centred and shrunk as documented."""
    cells, feats = fibrosis_cells
    X = cells[feats].to_numpy()
    plates = cells["Metadata_Plate"].to_numpy()
    Z = sphere(X, np.ones(len(X), dtype=bool), 1e-2, groups=plates)
    assert len(np.unique(plates)) == 4
    for p in np.unique(plates):
        rows = plates == p
        np.testing.assert_allclose(Z[rows].mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(_cov(Z[rows]), fit_sphere(X[rows], 1e-2).control_covariance(), atol=1e-9)
    # a screen-wide transform leaves plate offsets in place; per-plate removes them
    Zs = sphere(X, np.ones(len(X), dtype=bool), 1e-2)
    offsets = [np.linalg.norm(Zs[plates == p].mean(axis=0)) for p in np.unique(plates)]
    assert max(offsets) > 1.0


def test_plate_without_controls_is_an_error(fibrosis_cells):
    cells, feats = fibrosis_cells
    X = cells[feats].to_numpy()
    plates = cells["Metadata_Plate"].to_numpy()
    ctrl = plates != plates[0]
    with pytest.raises(InputError, match=str(plates[0])):
        sphere(X, ctrl, 1e-2, groups=plates)
    with pytest.raises(InputError, match="no control"):
        sphere(X, np.zeros(len(X), dtype=bool), 1e-2)
