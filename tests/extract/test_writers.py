"""Feature files without a cluster: per-site writes are byte-stable, the median file marks a finished
site, and the compacted site table is what the profiles stage reads."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycp.extract import writers
from raycp.extract.models import feature_names
from raycp.layout import RunLayout
from raycp.profiles.io import feature_columns


def _site(n: int, seed: int):
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame({"Metadata_Plate": ["P1"] * n, "Metadata_Well": ["B02"] * n,
                         "Metadata_Site": np.full(n, seed, dtype=np.int64), "Metadata_CellId": np.arange(1, n + 1),
                         "Metadata_X": rng.uniform(0, 1080, n), "Metadata_Y": rng.uniform(0, 1080, n),
                         "Metadata_TouchesBorder": np.zeros(n, bool), "Metadata_Treatment": ["DMSO"] * n,
                         "Metadata_IsControl": np.ones(n, bool)})
    return meta, rng.normal(size=(n, 672)).astype(np.float32)


def test_site_files_are_byte_stable_and_the_median_marks_a_finished_site(tmp_path):
    layout = RunLayout(str(tmp_path / "run")).features("cnn")
    names = feature_names(672)
    keys = []
    for site, n in ((1, 5), (2, 8)):
        meta, feats = _site(n, site)
        key = {"Metadata_Plate": "P1", "Metadata_Well": "B02", "Metadata_Site": site}
        writers.write_site(layout, key, meta, feats, names, npz=True)
        first = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.*")}
        writers.write_site(layout, key, meta, feats, names, npz=True)  # a re-run of the same site
        assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.*")} == first
        keys.append(key)
    (tmp_path / "run" / "features" / "cnn" / "sites" / "P1" / ".B02_3.parquet.x.tmp").write_bytes(b"")
    assert writers.list_finished(layout) == {("P1", "B02", 1), ("P1", "B02", 2)}  # temp files are not sites

    counts = writers.compact_sites(layout, keys)
    assert counts == {("P1", "B02", 1): 5, ("P1", "B02", 2): 8}
    sites = pd.read_parquet(layout.sites_table)
    assert feature_columns(sites) == names  # the profiles stage sees exactly the 672 features
    assert sites["Metadata_Treatment"].tolist() == ["DMSO", "DMSO"] and "Metadata_CellId" not in sites
    for i, (site, n) in enumerate(((1, 5), (2, 8))):
        np.testing.assert_array_equal(sites[names].to_numpy()[i], np.median(_site(n, site)[1], axis=0))
    meta, feats, got = writers.read_cells(layout.cells("P1", "B02", 2))
    assert got == names and feats.dtype == np.float32 and len(meta) == 8


def test_a_cell_with_a_missing_value_is_left_out_of_the_median_as_the_profiles_stage_does():
    feats = np.array([[1, 1], [2, np.nan], [3, 3], [5, 5]], dtype=np.float32)
    median, used = writers.site_median(feats)
    assert used == 3 and median.tolist() == [3.0, 3.0]
