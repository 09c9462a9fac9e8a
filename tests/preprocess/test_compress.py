"""Compression (paper Methods): corrected images stretched to their own 0.05/99.95 percentiles,
8 bits, lossless PNG — the paper reports ~6× smaller than the 16-bit originals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raycp.io.images import read_image
from raycp.io.index import read_index
from raycp.preprocess import compress as cc
from raycp.preprocess import illumination as il


def test_stretch_limits_are_numpy_percentiles(site_5ch):
    plane = read_image(str(site_5ch / "images/orig/r03c03f03p01-ch5sk1fk1fl1.tiff")).astype(np.float32)
    lo, hi = cc.stretch_limits(plane, 0.05, 99.95)
    ref = np.percentile(plane, [0.05, 99.95])
    assert lo == pytest.approx(ref[0], rel=1e-6) and hi == pytest.approx(ref[1], rel=1e-6)
    u8 = cc.to_uint8(plane, lo, hi)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    # a flat image has nothing to stretch
    assert not cc.to_uint8(np.full((4, 4), 7, np.float32), 7.0, 7.0).any()


@pytest.mark.parametrize("with_function", [False, True])
def test_fused_conversion_equals_numpy_on_the_real_site(site_5ch, with_function):
    """The fused loops give the numpy path's numbers exactly on every real channel (16-bit, and its
    8-bit PNG-like reduction), with a smooth illumination-like function or none: the same float32
    corrected plane, the same ``np.percentile`` limits, the same bytes."""
    files = sorted((site_5ch / "images/orig").glob("*-ch[2-6]*.tiff"))
    assert len(files) == 5
    yy, xx = np.mgrid[0:1080, 0:1080].astype(np.float32)
    function = (1.0 + 0.6 * np.exp(-((xx - 400) ** 2 + (yy - 700) ** 2) / 5e5)).astype(np.float32)
    for path in files:
        raw = read_image(str(path))
        for plane in (raw, (raw >> 8).astype(np.uint8)):
            fn = function if with_function else None
            fast = cc.compress_plane(plane, fn)
            ref = cc.compress_plane_numpy(plane, fn)
            np.testing.assert_array_equal(fast[1], ref[1])
            assert (fast[2], fast[3]) == (ref[2], ref[3])
            assert np.allclose((fast[2], fast[3]), np.percentile(ref[1], [0.05, 99.95]), rtol=1e-6, atol=0)
            np.testing.assert_array_equal(fast[0], ref[0])


def test_fused_conversion_on_ties_and_flat_images():
    """Heavily tied images (half the pixels 0, a saturated block) and flat ones agree too."""
    rng = np.random.default_rng(1)
    plane = rng.integers(0, 4000, (300, 200), dtype=np.uint16)
    plane[:150] = 0
    plane[-20:, -20:] = 65535
    for fn in (None, rng.uniform(1.0, 3.0, plane.shape).astype(np.float32)):
        fast, ref = cc.compress_plane(plane, fn), cc.compress_plane_numpy(plane, fn)
        np.testing.assert_array_equal(fast[0], ref[0])
        assert (fast[2], fast[3]) == (ref[2], ref[3])
    flat = np.full((64, 64), 7, np.uint16)
    u8, _, lo, hi = cc.compress_plane(flat)
    assert lo == hi == 7.0 and not u8.any()
    # values outside the bins (a function below 1, a zero, NaN) take the numpy path, never a stray write
    bad = np.ones(plane.shape, np.float32)
    bad[0, :3] = [0.5, 0.0, np.nan]
    with np.errstate(divide="ignore", invalid="ignore"):
        fast, ref = cc.compress_plane(plane, bad), cc.compress_plane_numpy(plane, bad)
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_array_equal(fast[1], ref[1])
    # other dtypes take the numpy path
    floats = rng.random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(cc.compress_plane(floats)[0], cc.compress_plane_numpy(floats)[0])


def test_compressed_real_site_round_trips_and_keeps_the_stretch(pediatric_run):
    """The 5 PNGs of the real site decode to 1080×1080 uint8 equal to the in-memory conversion
    (lossless); ≤ 0.05 % of pixels sit below/above the stretch (0 / 255 clipping); the ratio to
    the 16-bit originals is measured and printed (paper: ~6×)."""
    run, index = pediatric_run["run"], pediatric_run["index"]
    folder = run / "compressed"
    row = index.table.iloc[0]
    funcs = il.load_plate(str(run / "illum"), "BR00143976", list(index.channels))
    receipt = json.loads((folder / "_sites" / "BR00143976" / "C03_3.json").read_text())
    for c, ch in enumerate(index.channels):
        png = read_image(str(folder / "BR00143976" / "C03" / "3" / f"{ch}.png"))
        assert png.shape == (1080, 1080) and png.dtype == np.uint8
        raw = read_image(row[f"URL_{ch}"])
        expected, corrected, lo, hi = cc.compress_plane(raw, funcs[c])
        np.testing.assert_array_equal(png, expected)
        assert [lo, hi] == pytest.approx(receipt["limits"][c])
        n = corrected.size
        assert (corrected < lo).sum() <= 0.0005 * n + 1 and (corrected > hi).sum() <= 0.0005 * n + 1
        assert (png == 0).sum() >= 0.0005 * n - 1 and (png == 255).sum() >= 0.0004 * n
    summary = json.loads((folder / "_SUCCESS").read_text())
    print(f"\ncompression of the real 5-channel site: {summary['ratio_vs_raw']}x vs 16-bit pixels, "
          f"{summary['ratio_vs_files']}x vs the LZW TIFF files ({summary['png_bytes']} PNG bytes)")
    assert 3.0 < summary["ratio_vs_raw"] < 12.0
    assert summary["raw_bytes"] == 5 * 1080 * 1080 * 2
    # the new index points at the PNGs and reads back as an index
    new = read_index(str(folder / "sites.parquet"))
    assert new.channels == index.channels and len(new) == 1
    assert new.table.URL_DNA.iloc[0].endswith("compressed/BR00143976/C03/3/DNA.png")
    assert read_image(new.table.URL_Mito.iloc[0]).dtype == np.uint8
    # per-channel histograms of the controls (this site is marked as a control)
    hist = pd.read_parquet(folder / "histograms.parquet")
    controls = hist[hist.group == "controls"]
    assert sorted(controls.channel.unique()) == sorted(index.channels)
    assert (controls.groupby("channel")["count"].sum() == 1080 * 1080).all()
    assert summary["control_sites"] == 1


def test_histogram_percentiles():
    counts = np.zeros(256, np.int64)
    counts[[0, 10, 200]] = [1, 97, 2]
    assert cc.histogram_percentiles(counts, (1, 50, 99, 100)) == [0, 10, 200, 200]
