"""The extraction stage on Ray, on the real 5-channel site: every nucleus profiled, features equal to a
single-process forward, site medians that the profiles stage reads unchanged, the two baselines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from raycp.extract.writers import read_cells
from tests.extract.conftest import CHANNELS, PLATE, RAY, real_index, save_index, write_crops_shards

CELLS = f"features/cnn/cells/{PLATE}/C03_3.parquet"


def test_every_nucleus_gets_672_features_equal_to_a_direct_forward(trained_run, checkpoint, real_crops):
    run, result = trained_run
    table, crops = real_crops
    assert result.summary["processed"] == 1 and result.summary["quarantined"] == 0
    meta, feats, names = read_cells(str(run / CELLS))
    assert feats.shape == (len(table), 672) == (38, 672) and feats.dtype == np.float32
    assert names[0] == "efn_0000" and names[-1] == "efn_0671"
    np.testing.assert_allclose(meta["Metadata_X"], table["Nuclei_Location_Center_X"])
    assert meta["Metadata_TouchesBorder"].sum() == table["border"].sum() > 0  # border cells kept, flagged

    from raycp.models.export import load_model
    from raycp.models.network import FeatureModel
    from raycp.models.normalize import normalize

    model, _ = load_model(str(checkpoint))
    with torch.inference_mode():  # the same crops, one process, one batch, no channels_last
        direct = FeatureModel(model)(normalize(torch.from_numpy(crops))).numpy()
    # equal to 1e-5 (float32 sums in another order: chunks of 16, channels_last)
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)
    print(f"max |pipeline - direct| = {np.abs(feats - direct).max():.2e} on |features| <= {np.abs(direct).max():.2f}")
    assert result.figures["forward_calls"] == math.ceil(38 / 16)  # the site in chunks of batch_size


def test_site_medians_feed_the_profiles_stage_unchanged(trained_run):
    from raycp.profiles.aggregate import aggregate_cells, aggregate_wells

    run, _ = trained_run
    folder = run / "features" / "cnn"
    _, feats, names = read_cells(str(folder / "cells" / PLATE / "C03_3.parquet"))
    sites = pd.read_parquet(folder / "sites.parquet")
    assert list(sites["Metadata_n_cells"]) == [38] and sites[names].dtypes.unique().tolist() == [np.float32]
    np.testing.assert_array_equal(sites[names].to_numpy()[0], np.median(feats, axis=0))
    again = aggregate_cells(str(folder / "cells"))  # `raycp profile aggregate` on the per-cell shards
    np.testing.assert_array_equal(again.sites[names].to_numpy(), sites[names].to_numpy())
    wells = aggregate_wells(sites)
    assert len(wells) == 1 and wells["Metadata_n_sites"].tolist() == [1]
    assert sorted(c for c in wells.columns if not c.startswith("Metadata_")) == sorted(names)


def test_deepprofiler_npz_files_read_like_deepprofilers(trained_run):
    from raycp.io.npz import read_npz

    run, _ = trained_run
    meta, feats, _ = read_cells(str(run / CELLS))
    npz = run / "features" / "cnn" / "npz" / PLATE / "C03" / "3.npz"
    f = read_npz(str(npz))
    np.testing.assert_array_equal(f.features, feats)
    np.testing.assert_array_equal(f.locations, meta[["Metadata_X", "Metadata_Y"]].to_numpy())
    assert f.metadata["Metadata_Plate"] == PLATE and f.metadata["Metadata_Site"] == 3
    assert f.metadata["Metadata_Model"] == "cnn" and f.metadata["DNA"].endswith("ch5sk1fk1fl1.tiff")
    load = pytest.importorskip("pycytominer.cyto_utils.load", reason="pycytominer (dev extra)")
    frame = load.load_npz_features(str(npz))  # what pycytominer users call
    cols = [c for c in frame.columns if c.startswith("cnn_")]
    assert len(cols) == 672 and len(frame) == 38
    np.testing.assert_array_equal(frame[cols].to_numpy(np.float32), feats)


@pytest.mark.slow
def test_imagenet_baseline_gives_3360_features_per_cell(site_5ch, lite0_weights, real_crops, ray_cluster, tmp_path):
    """Through the actor pool, from the crops stage's shards (the unit test is in test_models.py)."""
    from raycp.extract.config import load_extract_config
    from raycp.extract.imagenet import ImageNetBaseline
    from raycp.extract.pipeline import run_extract

    table, crops = real_crops
    index = real_index(site_5ch)
    index_url = save_index(index, tmp_path)
    write_crops_shards(tmp_path / "run", index, table, crops, cells=4)
    cfg = load_extract_config(None, [*RAY, "model.kind=imagenet", f"model.path={lite0_weights}", "model.arch=efficientnet_lite0",
                                     "inference.batch_size=4"], index=index_url, output=str(tmp_path / "run"))
    result = run_extract(cfg)
    assert result.summary["processed"] == 1 and result.figures["input"] == "crops"
    _, feats, names = read_cells(str(tmp_path / "run" / "features" / "imagenet" / "cells" / PLATE / "C03_3.parquet"))
    assert feats.shape == (4, 3360) and names[0] == "DNA_efn_0000" and names[-1] == "Mito_efn_0671"
    model = ImageNetBaseline.from_weights(lite0_weights, arch="efficientnet_lite0")
    with torch.inference_mode():
        direct = model(torch.from_numpy(crops[:4])).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)


def test_cellprofiler_baseline_measures_every_cell_with_a_mask(site_5ch, real_crops, ray_cluster, tmp_path):
    pytest.importorskip("cp_measure", reason="the CellProfiler baseline needs cp-measure")
    from raycp.extract.config import load_extract_config
    from raycp.extract.pipeline import run_extract

    table, _ = real_crops
    index_url = save_index(real_index(site_5ch), tmp_path)
    cfg = load_extract_config(None, [*RAY, "model.kind=cellprofiler", "illumination.enabled=false"],
                              index=index_url, output=str(tmp_path / "run"))
    result = run_extract(cfg)
    assert result.summary["processed"] == 1, result.summary
    meta, feats, names = read_cells(str(tmp_path / "run" / "features" / "cellprofiler" / "cells" / PLATE / "C03_3.parquet"))
    assert len(meta) == len(table) == 38  # one row per detected nucleus, the CNN's cells
    np.testing.assert_allclose(meta["Metadata_X"], table["Nuclei_Location_Center_X"])
    assert feats.dtype == np.float32 and 1500 < len(names) < 2000
    frame = pd.DataFrame(feats, columns=names)
    for comp in ("Nuclei", "Cells"):  # every cell has a mask in both compartments: no missing value
        for ch in CHANNELS:
            assert frame[f"{comp}_Intensity_MeanIntensity_{ch}"].notna().all()
    assert (frame["Cells_AreaShape_Area"] > frame["Nuclei_AreaShape_Area"]).all()
    sites = pd.read_parquet(tmp_path / "run" / "features" / "cellprofiler" / "sites.parquet")
    assert len(sites) == 1 and sites["Metadata_n_cells"].iloc[0] > 0
