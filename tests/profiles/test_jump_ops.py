"""The JUMP recipe's and pycytominer's profile operations (raycp.profiles.ops) give the reference
numbers on real profiles: pycytominer 1.7.1 itself where it has the operation, and the recipe's
own formulas (scipy / statsmodels calls as jump-profiling-recipe makes them) where only the recipe
has it. Every operation to 1e-6 relative."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.profiles import ops

pycytominer = pytest.importorskip("pycytominer", reason="pycytominer (dev extra) is the reference")
NEG = "Metadata_pert_type == 'control'"


def _feats(df):
    return [c for c in df.columns if not c.startswith("Metadata_")]


def _close(got, ref, rtol=1e-6):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.nanmax(np.abs(ref)))


@pytest.fixture(scope="module")
def fibrosis_wells(fibrosis_files):
    from raycp.profiles.aggregate import aggregate_cells

    return aggregate_cells(fibrosis_files).wells


@pytest.fixture(scope="module")
def fibrosis_sites(fibrosis_files):
    from raycp.profiles.aggregate import aggregate_cells

    return aggregate_cells(fibrosis_files).sites


@pytest.mark.parametrize("method", ["standardize", "robustize", "mad_robustize"])
@pytest.mark.parametrize("samples", ["all", NEG])
def test_normalize_equals_pycytominer_on_lincs(lincs, method, samples):
    feats = _feats(lincs)
    meta = [c for c in lincs.columns if c.startswith("Metadata_")]
    ref = pycytominer.normalize(lincs, features=feats, meta_features=meta, samples=samples, method=method)
    got = ops.normalize(lincs, method=method, samples=samples).wells
    assert list(got.columns) == list(ref.columns)
    assert (got[feats].dtypes == np.float32).all()
    _close(got[feats], ref[feats])


@pytest.mark.parametrize("method", ["standardize", "mad_robustize"])
def test_normalize_per_plate_equals_pycytominer_plate_by_plate(fibrosis_wells, method):
    feats = _feats(fibrosis_wells)
    got = ops.normalize(fibrosis_wells, method=method, by="Metadata_Plate").wells
    for _plate, rows in fibrosis_wells.groupby("Metadata_Plate").groups.items():
        ref = pycytominer.normalize(fibrosis_wells.loc[rows], features=feats, method=method)
        _close(got.loc[np.asarray(rows), feats], ref[feats])


def test_mad_scalings(lincs):
    """pycytominer's MAD is scaled to a normal sd (×1.4826); the JUMP recipe's is raw."""
    feats = _feats(lincs)
    normal = ops.normalize(lincs, method="mad_robustize", mad_scale="normal").wells[feats].to_numpy(np.float64)
    raw = ops.normalize(lincs, method="mad_robustize", mad_scale="raw").wells[feats].to_numpy(np.float64)
    _close(raw / ops.MAD_NORMAL_SCALE, normal)
    from scipy.stats import median_abs_deviation

    x = lincs[feats[0]].to_numpy(np.float64)
    _close(raw[:, 0], (x - np.median(x)) / median_abs_deviation(x))  # the recipe's mad step


@pytest.mark.parametrize("method", ["ZCA", "ZCA-cor"])
@pytest.mark.parametrize("samples", ["all", NEG])
def test_spherize_equals_pycytominer(lincs, method, samples):
    feats = _feats(lincs)
    meta = [c for c in lincs.columns if c.startswith("Metadata_")]
    ref = pycytominer.normalize(lincs, features=feats, meta_features=meta, samples=samples, method="spherize",
                                spherize_method=method, spherize_epsilon=1e-6)
    got = ops.spherize(lincs, method=method, samples=samples, epsilon=1e-6).wells
    assert list(got.columns) == list(ref.columns)
    _close(got[feats], ref[feats])


def test_pca_spherize_equals_pycytominer_up_to_sign(lincs):
    """PCA components are defined up to sign (LAPACK's choice), as in pycytominer."""
    feats = _feats(lincs)
    ref = pycytominer.normalize(lincs, features=feats, samples="all", method="spherize", spherize_method="PCA-cor")
    got = ops.spherize(lincs, method="PCA-cor").wells
    pcs = [c for c in got.columns if c.startswith("PC")]
    assert pcs == [c for c in ref.columns if c.startswith("PC")]
    r = 383  # rank of 384 centred wells
    _close(np.abs(got[pcs[:r]]), np.abs(ref[pcs[:r]]))


@pytest.mark.parametrize("operation", ["variance_threshold", "frequency_threshold", "correlation_threshold",
                                       "drop_na_columns", "blocklist", "drop_outliers"])
def test_feature_select_equals_pycytominer(fibrosis_sites, operation):
    sites = fibrosis_sites.copy()
    feats = _feats(sites)
    sites.loc[sites.index[:10], feats[3]] = np.nan  # a real table with holes: 10 of 96 sites NaN in one feature
    ref = pycytominer.feature_select(sites, features=feats, operation=[operation])
    got = ops.feature_select(sites, operations=[operation])
    assert set(got.wells.columns) == set(ref.columns)
    assert got.info["features_dropped"] == [f for f in feats if f not in ref.columns]


def test_feature_select_chain_equals_pycytominer(fibrosis_sites):
    chain = ["variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist"]
    feats = _feats(fibrosis_sites)
    ref = pycytominer.feature_select(fibrosis_sites, features=feats, operation=chain)
    got = ops.feature_select(fibrosis_sites, operations=chain)
    assert set(got.wells.columns) == set(ref.columns)
    assert len(got.info["excluded"]["correlation_threshold"]) >= 10  # the chain really removes correlated features (12)


def test_variant_features_is_the_recipe_rule(fibrosis_wells):
    """jump-profiling-recipe get_plate_stats + select_variant_features, with scipy's MAD per plate."""
    from scipy.stats import median_abs_deviation

    feats = _feats(fibrosis_wells)
    w = fibrosis_wells.copy()
    w[feats[0]] = 1.0  # an invariant feature
    w.loc[w.Metadata_Plate == w.Metadata_Plate.iloc[0], feats[1]] = 0.25  # invariant on one plate only
    keep = set(feats)
    for _, g in w.groupby("Metadata_Plate"):
        mad = median_abs_deviation(g[feats].to_numpy(np.float64), axis=0, nan_policy="omit")
        med = g[feats].median().to_numpy()
        cv = np.nan_to_num(np.abs(mad / med), nan=0, posinf=0)
        keep &= {f for f, m, c in zip(feats, mad, cv) if m != 0 and c > 1e-3}
    got = ops.variant_features(w, by="Metadata_Plate")
    assert set(_feats(got.wells)) == keep
    assert {feats[0], feats[1]} <= set(got.info["features_dropped"])


def test_variant_features_quarantines_plates_without_reference_rows(lincs):
    w = pd.concat([lincs, lincs[lincs.Metadata_pert_type != "control"].assign(Metadata_Plate="no_dmso")], ignore_index=True)
    res = ops.variant_features(w, samples=NEG)
    q = res.info["rows_quarantined"]
    assert q["rows"] == 360 and q["plates"] == ["no_dmso"] and "no row matching" in q["reason"]
    assert len(res.wells) + q["rows"] == len(w)


def test_rank_int_is_the_recipe_transform(lincs):
    """The recipe's rank_int_array: seeded shuffle, ordinal ranks, Blom c = 3/8, norm.ppf."""
    import scipy.stats as ss

    feats = _feats(lincs)[:20]
    w = lincs[[*[c for c in lincs.columns if c.startswith("Metadata_")], *feats]].copy()
    w[feats[0]] = np.round(w[feats[0]], 1)  # ties
    got = ops.rank_int(w).wells
    for f in feats:
        x = w[f].to_numpy(np.float64)
        ix = np.random.default_rng(0).permutation(len(x))
        rank = ss.rankdata(x[ix], method="ordinal")[np.argsort(ix)]
        _close(got[f], ss.norm.ppf((rank - 3 / 8) / (len(rank) - 2 * 3 / 8 + 1)))
    z = got[feats].to_numpy(np.float64)
    assert np.abs(z.mean(axis=0)).max() < 1e-6 and np.abs(z.std(axis=0) - 1).max() < 0.02
    holed = w.copy()
    holed.loc[holed.index[:7], feats[1]] = np.nan  # NaN stays NaN; the other wells are ranked among themselves
    h = ops.rank_int(holed).wells[feats[1]].to_numpy(np.float64)
    assert np.isnan(h[:7]).all()
    x = holed[feats[1]].to_numpy(np.float64)
    ix = np.random.default_rng(0).permutation(len(x))
    ok = ~np.isnan(x[ix])
    rank = np.empty(len(x))
    rank[ix[ok]] = ss.rankdata(x[ix][ok], method="ordinal")  # ties in the same shuffled order
    _close(h[7:], ss.norm.ppf((rank[7:] - 3 / 8) / (ok.sum() - 2 * 3 / 8 + 1)))


def test_cell_count_regression_is_statsmodels_ols(fibrosis_sites):
    from statsmodels.formula.api import ols

    feats = _feats(fibrosis_sites)[:8]
    w = fibrosis_sites[["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_n_cells", *feats]].copy()
    got = ops.cell_count(w, count_col="Metadata_n_cells", min_unique=10)
    assert got.info["features_regressed"] == len(feats)
    for f in feats:
        d = pd.DataFrame({"y": w[f].to_numpy(np.float64), "cc": w["Metadata_n_cells"].to_numpy(np.float64)})
        _close(got.wells[f], ols("y ~ cc", data=d).fit().resid)


def test_well_position_and_outlier_steps(fibrosis_wells, fibrosis_sites):
    feats = _feats(fibrosis_wells)
    wp = ops.well_position(fibrosis_wells).wells
    means = wp.groupby("Metadata_Well")[feats].mean().to_numpy(np.float64)
    assert np.abs(means).max() < 1e-5  # every position centred across plates
    feats = _feats(fibrosis_sites)
    big = fibrosis_sites.copy()
    big[feats[0]] *= 1e4  # beyond 100 at the 99th percentile: dropped
    big.loc[big.index[0], feats[1]] = 500.0  # one value beyond 100: clipped (the recipe's lost clip)
    res = ops.outlier_features(big)
    assert feats[0] in res.info["features_dropped"] and res.wells[feats[1]].max() == 100.0
    assert res.info["values_clipped"] >= 1


def test_bad_steps_are_one_line_errors(lincs):
    with pytest.raises(InputError, match="normalize method 'zscore' is unknown"):
        ops.normalize(lincs, method="zscore")
    with pytest.raises(InputError, match="matched no well"):
        ops.normalize(lincs, samples="Metadata_pert_type == 'negcon'")
    with pytest.raises(InputError, match="has MAD 0"):
        ops.normalize(lincs.assign(Cells_AreaShape_Compactness=1.0), mad_scale="raw")
    with pytest.raises(InputError, match="operation 'variance' is unknown"):
        ops.feature_select(lincs, operations=["variance"])
