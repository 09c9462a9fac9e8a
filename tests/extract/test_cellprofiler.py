"""The CellProfiler baseline's core on the real site: cells grown from nuclei, CellProfiler-named
cp-measure features per object, checked against independent pixel counts and means."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from raycp.extract.cellprofiler import grow_cells, measure_objects
from tests.extract.conftest import CHANNELS, real_index

pytest.importorskip("cp_measure", reason="the CellProfiler baseline needs cp-measure (pip cp-measure)")


@pytest.fixture(scope="module")
def window(site_5ch):
    """A 360×360 window of the real site (5 channels, float in [0, 1]) with its detected nuclei."""
    from raycp.io.images import read_image
    from raycp.preprocess.nuclei import detect_nuclei

    row = real_index(site_5ch).table.iloc[0]
    planes = [read_image(row[f"URL_{c}"]).astype(np.float32) for c in CHANNELS]
    _, labels = detect_nuclei(planes[0], return_labels=True)
    y0, x0 = 360, 360
    sl = (slice(y0, y0 + 360), slice(x0, x0 + 360))
    from skimage.segmentation import relabel_sequential

    nuclei = relabel_sequential(labels[sl])[0].astype(np.int32)
    images = [p[sl] / 65535.0 for p in planes]
    return images, nuclei


def test_every_nucleus_grows_one_cell_that_contains_it(window):
    images, nuclei = window
    cells = grow_cells(nuclei, images[CHANNELS.index("AGP")])
    n = int(nuclei.max())
    assert n >= 3
    assert set(np.unique(cells)) - {0} == set(range(1, n + 1))
    inside = nuclei > 0
    assert (cells[inside] == nuclei[inside]).all()  # a cell keeps its nucleus' label
    assert (np.bincount(cells.ravel(), minlength=n + 1)[1:] > np.bincount(nuclei.ravel(), minlength=n + 1)[1:]).all()


def test_measurements_are_cellprofiler_features_of_every_object(window):
    images, nuclei = window
    cells = grow_cells(nuclei, images[CHANNELS.index("AGP")])
    n = int(nuclei.max())
    feats = measure_objects(images, CHANNELS, nuclei, cells, n_objects=n)
    assert len(feats) == n and set(feats.dtypes) == {np.dtype(np.float32)}
    assert feats.shape[1] > 1500  # paper: ~1,700 per cell
    # CellProfiler's names, per compartment and channel
    for name in ("Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA", "Cytoplasm_Granularity_1_Mito",
                 "Cells_Texture_Contrast_ER_3_00_256", "Cells_Correlation_Correlation_DNA_ER",
                 "Nuclei_Correlation_Manders_ER_DNA"):
        assert name in feats.columns, name
    assert not any(c.split("_", 1)[1].startswith(("Location_", "AreaShape_Center_")) for c in feats.columns)
    # independent checks on the pixels
    idx = np.arange(1, n + 1)
    np.testing.assert_array_equal(feats["Nuclei_AreaShape_Area"], ndi.sum_labels(np.ones_like(nuclei), nuclei, idx))
    np.testing.assert_allclose(feats["Cells_Intensity_MeanIntensity_Mito"],
                               ndi.mean(images[4], cells, idx), rtol=1e-5)
    cyto = np.where(nuclei > 0, 0, cells)
    np.testing.assert_array_equal(feats["Cytoplasm_AreaShape_Area"], ndi.sum_labels(np.ones_like(cyto), cyto, idx))
    per_channel = [c for c in feats.columns if c.startswith("Cells_") and "_DNA" in c and not c.startswith("Cells_Correlation_")]
    assert len(per_channel) == 15 + 52 + 16  # intensity (less Location_*) + 13 Haralick × 4 directions + granularity
    assert feats.filter(regex="^(Nuclei|Cells)_Intensity_").notna().all().all()  # every object has a mask
