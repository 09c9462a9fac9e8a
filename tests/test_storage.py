"""Storage: the same arrays from local disk, a multi-page TIFF and a real S3 API (moto_server)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycp.errors import StorageError
from raycp.io import importers, urls
from raycp.io.images import ImageReadError, read_image, read_site
from raycp.io.index import read_index, write_index
from raycp.sites import map_sites
from tests.conftest import PHENIX_5CH_MAP
from tests.test_index import nf1_loaddata

pytestmark = pytest.mark.s3


def _upload(fs, local_dir, prefix: str) -> str:
    for path in sorted(local_dir.iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.name}")
    return f"s3://{prefix}"


def test_phenix_site_from_s3_equals_disk(site_5ch, s3_server, tmp_path):
    local = site_5ch / "images" / "orig"
    remote = _upload(s3_server["fs"], local, f"{s3_server['bucket']}/pediatric/orig")
    disk = importers.from_phenix_folder(str(local), plate="BR00143976", channel_map=PHENIX_5CH_MAP)
    cloud = importers.from_phenix_folder(remote, plate="BR00143976", channel_map=PHENIX_5CH_MAP)
    assert cloud.table.URL_DNA.iloc[0].startswith("s3://")
    # the index itself round-trips through S3 too
    index_url = f"s3://{s3_server['bucket']}/runs/a/index/sites.parquet"
    write_index(cloud, index_url)
    cloud = read_index(index_url, check_files=True)
    a = read_site(disk.planes(disk.table.iloc[0]))
    b = read_site(cloud.planes(cloud.table.iloc[0]))
    assert a.dtype == b.dtype == np.uint16
    np.testing.assert_array_equal(a, b)


def test_multipage_tiff_frames_equal_single_channel_files(site_5ch, s3_server, tmp_path):
    local = site_5ch / "images" / "orig"
    files = [local / f"r03c03f03p01-ch{n}sk1fk1fl1.tiff" for n in PHENIX_5CH_MAP]
    stack = np.stack([tifffile.imread(f) for f in files])
    multi = tmp_path / "site_stack.tiff"
    tifffile.imwrite(multi, stack, compression="zlib")  # 5 pages, one per channel
    s3_multi = f"s3://{s3_server['bucket']}/multipage/site_stack.tiff"
    s3_server["fs"].put_file(str(multi), s3_multi[5:])
    for frame, f in enumerate(files):
        single = read_image(str(f))
        np.testing.assert_array_equal(read_image(str(multi), frame=frame), single)
        np.testing.assert_array_equal(read_image(s3_multi, frame=frame), single)
    with pytest.raises(ImageReadError, match="frame 5 asked for but the TIFF has 5 page"):
        read_image(s3_multi, frame=5)


def test_loaddata_index_on_s3_through_ray_gives_the_disk_arrays(shared_data, s3_server, ray_cluster, tmp_path):
    nf1 = shared_data / "images" / "nf1_3ch_plate2"
    remote = _upload(s3_server["fs"], nf1 / "Plate_2_images", f"{s3_server['bucket']}/nf1/Plate_2_images")
    table = nf1_loaddata(remote.rsplit("/", 1)[0])
    csv_url = f"s3://{s3_server['bucket']}/nf1/load_data.csv"
    s3_server["fs"].pipe_file(csv_url[5:], table.to_csv(index=False).encode())
    index = importers.from_loaddata(csv_url, channel_map={"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"})
    # one file goes missing after indexing: that site is quarantined, the others finish
    gone = index.table.URL_RFP.iloc[2]
    s3_server["fs"].rm_file(gone[5:])
    sums = {}
    reasons = {}
    for key, result, reason in map_sites(index, lambda site, row: [int(x) for x in site.sum(axis=(1, 2))]):
        (reasons if reason else sums)[key["Metadata_Well"]] = reason or result
    assert set(sums) == {"B07", "D06", "F07", "H12"}
    assert list(reasons) == ["D07"] and "file not found" in reasons["D07"] and gone in reasons["D07"]
    well = "F07"
    files = [nf1 / "Plate_2_images" / f"F7_01_{i}_2_{c}_001.tif" for i, c in ((1, "DAPI"), (2, "GFP"), (3, "RFP"))]
    assert sums[well] == [int(tifffile.imread(f).sum()) for f in files]


def test_unwritable_output_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # root ignores permission bits
            target = "/proc/raycp-cannot-write-here"
        else:
            target = str(locked / "run")
        with pytest.raises(StorageError, match="not writable"):
            urls.ensure_writable(target)
    finally:
        locked.chmod(0o700)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "table.bin"
    urls.atomic_write_bytes(str(target), b"x" * 1000)
    urls.atomic_write_bytes(str(target), b"y" * 10)
    assert target.read_bytes() == b"y" * 10
    assert [p.name for p in target.parent.iterdir()] == ["table.bin"]
    assert pd.isna(None)
