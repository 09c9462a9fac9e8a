"""Given real single cells, streaming aggregation equals a direct pandas groupby (median per site,
mean per well) to 1e-9, on both the partitioned and the contiguous path; NaN cells are dropped and
counted; inf is an error naming the column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.profiles.aggregate import SITE_COLS, WELL_COLS, aggregate_cells, aggregate_treatments

from .conftest import LINCS_TREATMENT


@pytest.fixture(scope="module")
def cells(fibrosis_files):
    return pd.concat([pd.read_parquet(f) for f in fibrosis_files], ignore_index=True)


def _direct(cells, feats):
    cells = cells[[*SITE_COLS, *feats]].copy()
    site = cells.groupby(list(SITE_COLS))[feats].median().reset_index()
    well = site.groupby(list(WELL_COLS))[feats].mean().reset_index()
    return site, well


def _assert_equal(res, site, well, feats):
    assert res.sites[list(SITE_COLS)].astype(str).equals(site[list(SITE_COLS)].astype(str))
    assert res.wells[list(WELL_COLS)].astype(str).equals(well[list(WELL_COLS)].astype(str))
    np.testing.assert_allclose(res.sites[feats].to_numpy(), site[feats].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.wells[feats].to_numpy(), well[feats].to_numpy(), rtol=0, atol=1e-9)


def test_streaming_partitioned_equals_groupby(fibrosis_files, cells):
    """The real files are not sorted by site: cells are hash-partitioned on disk, then reduced."""
    res = aggregate_cells(fibrosis_files, batch_rows=100, memory_budget_bytes=1 << 20)
    assert res.accounting["path"] == "partitioned" and res.accounting["partitions"] > 1
    assert res.accounting["cells_read"] == len(cells) == 1992
    assert len(res.features) == 474 and res.accounting["features_dropped"]
    site, well = _direct(cells, res.features)
    assert len(site) == res.accounting["sites"] and len(well) == res.accounting["wells"] == 32
    _assert_equal(res, site, well, res.features)
    assert (res.wells["Metadata_n_cells"].sum(), res.wells["Metadata_n_sites"].sum()) == (1992, len(site))


def test_streaming_contiguous_equals_groupby(fibrosis_files, cells, tmp_path):
    """Sorted by site, one pass reduces each site when it ends, across batch boundaries."""
    feats = [c for c in cells.columns if not c.startswith("Metadata_") and cells[c].notna().all()]
    path = tmp_path / "sorted.parquet"
    cells.sort_values(list(SITE_COLS)).to_parquet(path)
    res = aggregate_cells(path, features=feats, batch_rows=37, sites_out=tmp_path / "sites.parquet")
    assert res.accounting["path"] == "contiguous"
    assert res.sites is None
    res.sites = pd.read_parquet(tmp_path / "sites.parquet").sort_values(list(SITE_COLS)).reset_index(drop=True)
    site, well = _direct(cells, feats)
    _assert_equal(res, site, well, feats)


def test_nan_cells_dropped_and_counted(cells):
    feats = [c for c in cells.columns if not c.startswith("Metadata_") and c != "__index_level_0__"]
    feats = [c for c in feats if cells[c].notna().all()][:50]
    dirty = cells[[*SITE_COLS, *feats]].copy()
    hit = dirty.index[::97]
    dirty.loc[hit, feats[3]] = np.nan
    res = aggregate_cells(dirty, features=feats, batch_rows=128)
    assert res.accounting["cells_dropped_nan"] == len(hit)
    assert sum(res.accounting["cells_dropped_nan_per_site"].values()) == len(hit)
    site, well = _direct(dirty.drop(index=hit), feats)
    _assert_equal(res, site, well, feats)


def test_inf_is_an_error_naming_the_column(cells):
    feats = [c for c in cells.columns if not c.startswith("Metadata_")][:20]
    bad = cells[[*SITE_COLS, *feats]].copy()
    bad.loc[5, feats[7]] = np.inf
    with pytest.raises(InputError, match=feats[7]):
        aggregate_cells(bad, features=feats)


def test_treatment_means_keep_float32(lincs):
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    wells = lincs[[*LINCS_TREATMENT, *feats]].copy()
    wells[feats] = wells[feats].astype(np.float32)
    out = aggregate_treatments(wells, LINCS_TREATMENT)
    assert all(out[f].dtype == np.float32 for f in feats)
    ref = wells.groupby(LINCS_TREATMENT)[feats].mean()
    np.testing.assert_allclose(out[feats].to_numpy(), ref.to_numpy(dtype=np.float64), rtol=1e-5, atol=1e-6)
    assert out["Metadata_n_wells"].sum() == len(wells)


def test_wells_with_a_missing_treatment_key_are_left_out(lincs):
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")][:30]
    wells = lincs[[*LINCS_TREATMENT, *feats]].copy()
    wells.loc[wells.index[:10], LINCS_TREATMENT[1]] = np.nan
    out = aggregate_treatments(wells, LINCS_TREATMENT)
    assert out["Metadata_n_wells"].sum() == len(wells) - 10
    ref = wells.dropna(subset=LINCS_TREATMENT).groupby(LINCS_TREATMENT)[feats].mean()
    np.testing.assert_allclose(out[feats].to_numpy(), ref.to_numpy(), rtol=0, atol=1e-12)
