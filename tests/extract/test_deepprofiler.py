"""Interop with DeepProfiler's per-site feature files (the real ones in ../shared/data/interop)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from raycp.errors import InputError
from raycp.io.npz import encode_npz, read_npz


def test_real_deepprofiler_files_have_the_documented_shapes(shared_data):
    root = shared_data / "interop" / "deepprofiler_example"
    features = root / "SQ00014812_and_SQ00014813" / "outputs" / "results" / "features" / "SQ00014812"
    for site, n_cells in ((5, 158), (8, 179)):
        f = read_npz(str(features / f"A01_{site}.npz"))
        assert f.features.shape == (n_cells, 6400) and f.features.dtype == np.float32  # 5 × 1,280
        assert f.locations.shape == (n_cells, 2)
        assert f.metadata["Metadata_Plate"] == "SQ00014812" and f.metadata["Metadata_Site"] == site
        assert f.metadata["Treatment"] == "DMSO@NA"
        reference = np.load(features / f"A01_{site}.npz", allow_pickle=True)  # the test's own trusted read
        np.testing.assert_array_equal(f.features, reference["features"])
    bbbc021 = read_npz(str(root / "Week1_22123" / "Week1_22123_B02_s1.npz"))
    assert bbbc021.features.shape == (206, 50) and bbbc021.locations is None


def test_written_files_round_trip_and_are_byte_stable(tmp_path):
    rng = np.random.default_rng(0)
    feats, locs = rng.normal(size=(7, 672)).astype(np.float32), rng.uniform(0, 1080, size=(7, 2))
    meta = {"Metadata_Plate": "P1", "Metadata_Well": "A01", "Metadata_Site": 3}
    blob = encode_npz(feats, meta, locs)
    assert blob == encode_npz(feats, meta, locs)
    path = tmp_path / "A01_3.npz"
    path.write_bytes(blob)
    again = read_npz(str(path))
    np.testing.assert_array_equal(again.features, feats)
    assert again.metadata == meta
    legacy = np.load(path, allow_pickle=True)  # what pycytominer users do
    assert legacy["metadata"].item() == meta and legacy["features"].shape == (7, 672)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_crafted_metadata_pickle_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        member = io.BytesIO()
        np.lib.format.write_array(member, np.zeros((2, 3), np.float32))
        zf.writestr("features.npy", member.getvalue())
        member = io.BytesIO()
        np.lib.format.write_array(member, np.array(_Evil(), dtype=object), allow_pickle=True)
        zf.writestr("metadata.npy", member.getvalue())
    path = tmp_path / "evil.npz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(InputError, match="refusing to load builtins.print"):
        read_npz(str(path))
