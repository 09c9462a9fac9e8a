"""Real cells cut out of the real 5-channel site: every placed cell is a real cell."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from raycp.errors import InputError
from raycp.screens.cells import dihedral, labels_from_outlines, load_library, read_outline, segment_site
from raycp.screens.config import PHENIX_5CH_MAP

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


def test_outlines_of_the_real_site_give_its_single_cells(library, site_5ch):
    """The site has ~36 nuclei (37 outlined); cells on the border or without one nucleus are dropped."""
    nuclei = labels_from_outlines(read_outline(str(next((site_5ch / "images" / "outlines").glob("Nuclei*")))))
    areas = np.bincount(nuclei.ravel())[1:]
    assert 30 <= (areas > 300).sum() <= 40  # nucleus-sized regions (the rest: pockets between outlines)
    assert 25 <= len(library.cells) <= 33
    src = library.sources[0]
    assert src["segmentation"] == "CellProfiler outlines" and src["n_cells"] == len(library.cells)
    for cell in library.cells:
        assert cell.signal.shape == (5, *cell.cell.shape) and cell.signal.dtype == np.float32
        assert cell.nucleus.any() and not (cell.nucleus & ~cell.cell).any()
        assert 1.5 * cell.nucleus.sum() <= cell.cell.sum() * 1.05  # binning may round a pixel or two
        # a real nucleus: DNA is far brighter inside it than in the rest of the cell
        dna = cell.signal[0]
        assert dna[cell.nucleus].mean() > 3 * dna[cell.cell & ~cell.nucleus].mean()


def test_cells_are_on_the_12bit_scale_and_the_background_is_real_noise(library):
    """Per channel the cells' 99.5th percentile maps to cell_p99_adu (1500); background patches are
    zero-mean real noise, far below the cells' signal."""
    for c in range(5):
        pix = np.concatenate([cell.signal[c][cell.cell] for cell in library.cells])
        assert 1200 < np.percentile(pix, 99.5) < 1800
    bg = library.background
    assert len(bg) >= 16 and bg.shape[1:] == (5, 32, 32)
    assert np.abs(bg.mean(axis=(2, 3))).max() < 1e-3
    assert (bg.std(axis=(0, 2, 3)) < 40).all()
    assert (library.base > 0).all() and (library.base < 400).all()


def test_own_segmentation_finds_about_as_many_cells_as_cellprofiler(source_folder, library):
    own = load_library([source_folder], PHENIX_5CH_MAP, CHANNELS, binning=2, segmentation="own")
    assert own.sources[0]["segmentation"].startswith("own")
    assert abs(len(own.cells) - len(library.cells)) <= 0.3 * len(library.cells)


def test_labels_from_outlines_separates_touching_objects():
    outline = np.zeros((40, 60), bool)
    outline[5, 5:55] = outline[30, 5:55] = True
    outline[5:31, 5] = outline[5:31, 30] = outline[5:31, 54] = True  # two boxes sharing a wall
    labels = labels_from_outlines(outline)
    assert labels.max() == 2
    assert (labels[10:25, 10:25] == labels[15, 15]).all() and labels[15, 15] != labels[15, 40]


def test_segment_site_on_a_blank_image_finds_nothing():
    nuc, cel = segment_site(np.zeros((5, 64, 64), np.uint16))
    assert nuc.max() == 0 and cel.max() == 0


def test_the_eight_orientations_are_distinct_and_keep_the_pixels(library):
    cell = library.cells[0]
    variants = [dihedral(cell, k) for k in range(8)]
    keys = {v.signal.tobytes() + bytes(v.signal.shape) for v in variants}
    assert len(keys) == 8
    for v in variants:
        assert np.array_equal(np.sort(v.signal.ravel()), np.sort(cell.signal.ravel()))
        assert v.nucleus.sum() == cell.nucleus.sum()


def test_a_folder_without_5_channel_sites_is_a_clear_error(shared_data):
    folder = shared_data / "images" / "bbbc016_illum_gfp"
    with pytest.raises(InputError, match=r"bbbc016_illum_gfp: no usable cells: no 5-channel site.*fix:"):
        load_library([str(folder)], PHENIX_5CH_MAP, CHANNELS)


def test_a_folder_whose_images_hold_no_cells_is_a_clear_error(tmp_path):
    for ch in (2, 3, 4, 5, 6):
        tifffile.imwrite(tmp_path / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff", np.full((256, 256), 100, np.uint16))
    with pytest.raises(InputError, match=r"no usable cells \(.*0 objects.*\).*fix: point source.folders"):
        load_library([str(tmp_path)], PHENIX_5CH_MAP, CHANNELS)


def test_a_missing_folder_and_a_missing_channel_are_clear_errors(tmp_path, source_folder):
    with pytest.raises(InputError, match="source folder not found"):
        load_library([str(tmp_path / "nope")], PHENIX_5CH_MAP, CHANNELS)
    with pytest.raises(InputError, match="not all of"):
        load_library([source_folder], {5: "DNA", 2: "ER", 6: "RNA", 3: "AGP", 7: "Mito"}, CHANNELS)
