"""Single-cell crops (paper Methods): 128×128 boxes centred on each nucleus, no resizing, cells
kept in context; boxes leaving the image zero-padded and flagged; Parquet shards readable by
Ray Data and by plain pyarrow; DeepProfiler-compatible export."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from scipy import ndimage as ndi

from raycp.errors import InputError
from raycp.io.images import read_image, read_site
from raycp.io.index import validate
from raycp.preprocess import compress as cc
from raycp.preprocess import crops as cr
from raycp.preprocess import pipeline as pl
from raycp.preprocess import tasks
from raycp.preprocess.nuclei import X, Y, detect_nuclei
from tests.preprocess.conftest import pediatric_index, run_config, save_index

S = 128


def _u8_site(run, index):
    """The real site as the crops stage sees it: corrected and stretched to 8 bits (= the PNGs)."""
    return np.stack([read_image(str(run / "compressed" / "BR00143976" / "C03" / "3" / f"{ch}.png"))
                     for ch in index.channels])


def test_crop_is_centred_on_the_nucleus_and_padded_at_the_border(site_5ch, pediatric_cp_locations):
    site = read_site(pediatric_index(site_5ch).planes(pediatric_index(site_5ch).table.iloc[0]))
    u8, _, _ = cc.compress_site(site)
    xs = np.append(pediatric_cp_locations[X].to_numpy(), [3.2, 1075.0])  # + two points at the edges
    ys = np.append(pediatric_cp_locations[Y].to_numpy(), [1070.6, 40.0])
    crops, border = cr.crop_cells(u8, xs, ys, S)
    assert crops.shape == (7, 5, S, S) and crops.dtype == np.uint8
    assert border.tolist() == [False] * 5 + [True, True]
    for i, (x, y) in enumerate(zip(xs, ys)):
        cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        np.testing.assert_array_equal(crops[i, :, S // 2, S // 2], u8[:, cy, cx])  # nucleus on the centre pixel
        if not border[i]:
            np.testing.assert_array_equal(crops[i], u8[:, cy - 64:cy + 64, cx - 64:cx + 64])
    # (3, 1071): the left 61 columns and the bottom 55 rows fall outside: zeros
    assert not crops[5, :, :, :61].any() and not crops[5, :, 64 + 9:, :].any()
    np.testing.assert_array_equal(crops[5, :, :64 + 9, 61:], u8[:, 1071 - 64:, :64 + 3])


def test_crops_stage_centres_each_cellprofiler_nucleus(pediatric_run, pediatric_cp_locations, ray_cluster):
    """Crops from the CellProfiler locations of the real site: one 5×128×128 crop per nucleus,
    equal to the 8-bit site cut around (round(x), round(y)), with the index's metadata."""
    run, index = pediatric_run["run"], pediatric_run["index"]
    shard = run / "crops" / "BR00143976" / "C03_3.parquet"
    # plain pyarrow, as the module's docstring shows: raw C×S×S bytes per row, the shape in the schema
    table = pq.read_table(shard)
    shape = json.loads(table.schema.metadata[b"raycp.crop_shape"])
    col = table.column(cr.CROP).combine_chunks()
    assert shape == [5, S, S] and col.type.byte_width == 5 * S * S
    crops = np.frombuffer(col.buffers()[1], np.uint8)[col.offset * col.type.byte_width:][
        : len(col) * col.type.byte_width].reshape(-1, *shape)
    meta = table.drop_columns([cr.CROP]).to_pandas()
    assert crops.shape == (5, 5, S, S) and crops.dtype == np.uint8
    assert json.loads(table.schema.metadata[b"raycp.channels"]) == list(index.channels)
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_CellId", "Metadata_X", "Metadata_Y",
                "Metadata_Treatment", "Metadata_IsControl", "Metadata_TouchesBorder", "Metadata_Label"):
        assert col in meta.columns
    np.testing.assert_allclose(meta.Metadata_X, pediatric_cp_locations[X])
    np.testing.assert_allclose(meta.Metadata_Y, pediatric_cp_locations[Y])
    assert set(meta.Metadata_Treatment) == {"DMSO"} and meta.Metadata_IsControl.all()
    assert (meta.Metadata_Label == 0).all() and not meta.Metadata_TouchesBorder.any()
    u8 = _u8_site(run, index)
    for crop, x, y in zip(crops, meta.Metadata_X, meta.Metadata_Y):
        cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        np.testing.assert_array_equal(crop, u8[:, cy - 64:cy + 64, cx - 64:cx + 64])
    # Ray Data reads the same tensors; the reader API streams (metadata, N×C×S×S)
    ds = ray_cluster.data.read_parquet(str(shard)).map_batches(cr.crops_batch_to_numpy, fn_kwargs={"shape": shape})
    ray_batch = ds.take_batch(10)
    np.testing.assert_array_equal(ray_batch[cr.CROP], crops)
    np.testing.assert_array_equal(ray_batch["Metadata_CellId"], meta.Metadata_CellId)
    (meta2, crops2), = list(cr.read_crops(str(run / "crops")))
    np.testing.assert_array_equal(crops2, crops)
    assert meta2.Metadata_CellId.tolist() == meta.Metadata_CellId.tolist()
    manifest = pd.read_parquet(run / "crops" / "manifest.parquet")
    assert manifest.path.tolist() == ["BR00143976/C03_3.parquet"] and manifest.n_cells.tolist() == [5]


def test_deepprofiler_export_has_one_strip_per_cell(pediatric_run):
    run = pediatric_run["run"]
    folder = run / "crops" / "deepprofiler"
    sc = pd.read_csv(folder / "sc-metadata.csv")
    assert len(sc) == 5
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site", "Nuclei_Location_Center_X",
            "Nuclei_Location_Center_Y", "Key", "Target", "Image_Name"} <= set(sc.columns)
    _, crops = cr.read_shard(str(run / "crops" / "BR00143976" / "C03_3.parquet"))
    for i, name in enumerate(sc.Image_Name):
        assert name.startswith("BR00143976/C03/3/0@")
        strip = read_image(str(folder / name))
        assert strip.shape == (S, 5 * S)
        np.testing.assert_array_equal(strip[:, 2 * S:3 * S], crops[i, 2])  # channel k = k-th block


def test_crops_from_detection_flag_border_cells(site_5ch, pediatric_cp_locations, ray_cluster, tmp_path):
    """From raw images alone (no locations, illumination off): one crop per detected nucleus,
    including CellProfiler's 5 cells, boxes leaving the image flagged and zero-padded."""
    index = pediatric_index(site_5ch)
    run = run_config(tmp_path / "run", save_index(index, tmp_path), "illumination.enabled=false")
    result = pl.run_crops(run, index)
    assert result.summary["processed"] == 1 and result.figures["locate"] == "detect"
    meta, crops = cr.read_shard(str(tmp_path / "run" / "crops" / "BR00143976" / "C03_3.parquet"))
    dna = tifffile.imread(site_5ch / "images/orig/r03c03f03p01-ch5sk1fk1fl1.tiff")
    found = detect_nuclei(dna)
    assert len(meta) == len(found) == crops.shape[0] and crops.shape[1:] == (5, S, S)
    top, left = cr.box_origin(meta.Metadata_X, meta.Metadata_Y, S)
    outside = (top < 0) | (left < 0) | (top + S > 1080) | (left + S > 1080)
    assert meta.Metadata_TouchesBorder.tolist() == outside.tolist() and outside.sum() >= 3
    for i in np.flatnonzero(outside):
        rows_out = -min(top[i], 0), max(top[i] + S - 1080, 0)
        if rows_out[0]:
            assert not crops[i, :, :rows_out[0]].any()
        if rows_out[1]:
            assert not crops[i, :, S - rows_out[1]:].any()
    cp = pediatric_cp_locations[[X, Y]].to_numpy()
    dist = np.linalg.norm(cp[:, None] - meta[["Metadata_X", "Metadata_Y"]].to_numpy()[None], axis=2).min(axis=1)
    assert (dist <= 3).sum() == 4 and dist.max() < 15  # see test_nuclei: CellProfiler split the 5th


def test_skip_border_and_mask_channel_on_nf1(shared_data, tmp_path):
    """In-process (no cluster): ``skip_border`` drops flagged cells; the optional mask channel
    (CellProfiler's binary cell masks as an index channel) is 255 on the cell under the nucleus."""
    nf1 = shared_data / "images" / "nf1_3ch_plate2"
    row = {"Metadata_Plate": "Plate_2", "Metadata_Well": "F7", "Metadata_Site": 2}
    for i, ch in enumerate(("DAPI", "GFP", "RFP"), start=1):
        row[f"URL_{'DNA' if ch == 'DAPI' else ch}"] = str(nf1 / "Plate_2_images" / f"F7_01_{i}_2_{ch}_001.tif")
    row["URL_CellMask"] = str(nf1 / "Plate_2_masks" / "F7_01_3_2_RFP_001_MaskCells.tiff")
    index = validate(pd.DataFrame([row]), ["DNA", "GFP", "RFP", "CellMask"])
    outs = {}
    for skip in (False, True):
        run = run_config(tmp_path / f"run{skip}", "x", "illumination.enabled=false", "crops.mask=true",
                         "crops.mask_channel=CellMask", f"crops.skip_border={str(skip).lower()}")
        spec = pl.stage_spec("crops", run, index, correct=False, locate="detect",
                             metadata_columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site"])
        out = tasks.process_row(tasks.SiteContext(spec), index.table.iloc[0].to_dict())
        assert out["status"] == "processed", out["reason"]
        outs[skip] = cr.read_shard(str(tmp_path / f"run{skip}" / "crops" / "Plate_2" / "F07_2.parquet"))
    meta, crops = outs[False]
    assert crops.shape[1:] == (4, S, S)
    assert cr.channels_of(str(tmp_path / "runFalse" / "crops" / "Plate_2" / "F07_2.parquet"))[-1] == "CellMask"
    cells, _ = ndi.label(tifffile.imread(row["URL_CellMask"]) > 0)
    padded = np.pad(cells, S)
    for crop, x, y in zip(crops, meta.Metadata_X, meta.Metadata_Y):
        cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        cell = cells[cy, cx]
        box = padded[cy + S // 2:cy + S // 2 + S, cx + S // 2:cx + S // 2 + S]  # padded coordinates
        expected = (box == cell) & (cell != 0)
        np.testing.assert_array_equal(crop[3], expected * np.uint8(255))
    # CellProfiler dropped the cells touching the image border, so ~2/3 of the nuclei have one
    assert (crops[:, 3, S // 2, S // 2] == 255).sum() >= 15
    kept, _ = outs[True]
    assert len(kept) == (~meta.Metadata_TouchesBorder).sum() and not kept.Metadata_TouchesBorder.any()
    assert meta.Metadata_TouchesBorder.any()


def test_crops_shard_bytes_do_not_depend_on_the_run(site_5ch, pediatric_cp_locations):
    """Same site, same centres → identical Parquet bytes (re-runs overwrite with the same file)."""
    site = read_site(pediatric_index(site_5ch).planes(pediatric_index(site_5ch).table.iloc[0]))
    u8, _, _ = cc.compress_site(site)
    crops, border = cr.crop_cells(u8, pediatric_cp_locations[X].to_numpy(), pediatric_cp_locations[Y].to_numpy())
    meta = pd.DataFrame({"Metadata_CellId": np.arange(5), "Metadata_TouchesBorder": border})
    a = cr.table_bytes(cr.crops_table(crops, meta, ["DNA", "ER", "RNA", "AGP", "Mito"]))
    b = cr.table_bytes(cr.crops_table(crops.copy(), meta.copy(), ["DNA", "ER", "RNA", "AGP", "Mito"]))
    assert a == b
    back = pq.read_table(io.BytesIO(a))
    np.testing.assert_array_equal(cr.tensor_to_numpy(back.column(cr.CROP), cr.crop_shape(back.schema)), crops)


def test_crops_shards_of_the_tensor_layout_still_read(tmp_path):
    """Shards written before the binary layout (Arrow's fixed_shape_tensor) read to the same array."""
    import pyarrow as pa

    crops = np.random.default_rng(0).integers(0, 256, (3, 2, 8, 8), dtype=np.uint8)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(crops.reshape(-1)), 2 * 8 * 8)
    column = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint8(), [2, 8, 8]), storage)
    table = pa.table({"Metadata_CellId": [1, 2, 3], cr.CROP: column})
    pq.write_table(table, tmp_path / "old.parquet")
    meta, back = cr.read_shard(str(tmp_path / "old.parquet"))
    np.testing.assert_array_equal(back, crops)
    assert meta.Metadata_CellId.tolist() == [1, 2, 3]
    # the binary layout needs its shape, and says so
    with pytest.raises(InputError, match="shape"):
        cr.tensor_to_numpy(cr.crops_table(crops, pd.DataFrame({"Metadata_CellId": [1, 2, 3]}), ["A", "B"]).column(cr.CROP))
