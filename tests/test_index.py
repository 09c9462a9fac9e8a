"""Screen index (paper Methods: one row per site, five channels): importers and validation."""

from __future__ import annotations

import pandas as pd
import pytest
import tifffile

from raycp.errors import InputError
from raycp.io import importers
from raycp.io.images import ImageReadError, read_image, read_site
from raycp.io.index import read_index, validate, write_index
from tests.conftest import PHENIX_5CH_MAP

NF1_WELLS = {"B7": 3, "D6": 2, "D7": 1, "F7": 2, "H12": 1}  # well -> site number in the file names


def nf1_loaddata(nf1: str) -> pd.DataFrame:
    """A CellProfiler LoadData CSV for the five real NF1 sites (DAPI, GFP, RFP)."""
    rows = []
    for well, site in NF1_WELLS.items():
        row = {"Metadata_Plate": "Plate_2", "Metadata_Well": well, "Metadata_Site": site,
               "Metadata_Condition": "WT" if well in ("B7", "D6") else "Null"}
        for i, ch in enumerate(("DAPI", "GFP", "RFP"), start=1):
            row[f"FileName_Orig{ch}"] = f"{well}_01_{i}_{site}_{ch}_001.tif"
            row[f"PathName_Orig{ch}"] = f"{nf1}/Plate_2_images"
        rows.append(row)
    return pd.DataFrame(rows)


def test_phenix_folder_gives_one_site_with_the_paper_channels(site_5ch):
    index = importers.from_phenix_folder(str(site_5ch / "images" / "orig"), plate="BR00143976",
                                         channel_map=PHENIX_5CH_MAP)
    assert index.channels == ("DNA", "ER", "RNA", "AGP", "Mito")
    assert len(index) == 1
    row = index.table.iloc[0]
    assert (row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site) == ("BR00143976", "C03", 3)
    assert row.URL_DNA.endswith("r03c03f03p01-ch5sk1fk1fl1.tiff")
    assert row.URL_Mito.endswith("r03c03f03p01-ch4sk1fk1fl1.tiff")
    site = read_site(index.planes(row))
    assert site.shape == (5, 1080, 1080) and site.dtype == "uint16"


def test_phenix_name_parsing():
    parsed = importers.parse_phenix_name("r03c03f03p01-ch1sk1fk1fl1.tiff")
    assert parsed == {"well": "C03", "site": 3, "plane": 1, "channel": 1}
    assert importers.parse_phenix_name("r16c24f12p01-ch6sk1fk1fl1.tiff")["well"] == "P24"
    assert importers.parse_phenix_name("notes.txt") is None


def test_deepprofiler_index_keeps_its_channels_and_labels(shared_data):
    project = shared_data / "interop" / "deepprofiler_example" / "SQ00014812_and_SQ00014813"
    source = pd.read_csv(project / "inputs" / "metadata" / "test_index.csv")
    index = importers.from_deepprofiler(str(project / "inputs" / "metadata" / "test_index.csv"),
                                        check_files=False)
    assert index.channels == ("DNA", "RNA", "ER", "AGP", "Mito")  # config.json's order
    assert len(index) == len(source)
    first = index.table.iloc[0]
    assert first.URL_DNA.endswith("inputs/images/SQ00014812/r01c01f01p01-ch1sk1fk1fl1.png")
    assert set(index.table.Metadata_Treatment) == set(source.Treatment)
    assert "Metadata_Split" in index.table.columns
    # The example ships no images: checking the files reports every one of them at once.
    with pytest.raises(InputError, match=rf"{5 * len(source)} of {5 * len(source)} image file\(s\) missing"):
        importers.from_deepprofiler(str(project / "inputs" / "metadata" / "test_index.csv"))


def test_loaddata_csv_of_real_nf1_sites_reads_the_same_pixels(shared_data, tmp_path):
    nf1 = str(shared_data / "images" / "nf1_3ch_plate2")
    csv = tmp_path / "load_data.csv"
    nf1_loaddata(nf1).to_csv(csv, index=False)
    index = importers.from_loaddata(str(csv), channel_map={"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"},
                                    treatment_col="Metadata_Condition", control_values=("WT",))
    assert len(index) == 5 and index.channels == ("DNA", "GFP", "RFP")
    assert index.table.Metadata_Well.tolist() == ["B07", "D06", "D07", "F07", "H12"]
    assert index.table.Metadata_IsControl.tolist() == [True, True, False, False, False]
    out = tmp_path / "sites.parquet"
    write_index(index, str(out))
    again = read_index(str(out))
    assert again.channels == index.channels
    pd.testing.assert_frame_equal(again.table, index.table)
    row = again.table.iloc[0]
    direct = tifffile.imread(f"{nf1}/Plate_2_images/B7_01_2_3_GFP_001.tif")
    site = read_site(again.planes(row))
    assert site.shape == (3, 904, 1224)
    assert (site[1] == direct).all()


def _minimal(tmp_path, n=2) -> pd.DataFrame:
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, (pd.RangeIndex(64 * 64).to_numpy().reshape(64, 64) % 4096).astype("uint16"))
    return pd.DataFrame({"Metadata_Plate": ["P1"] * n, "Metadata_Well": ["A01"] * n,
                         "Metadata_Site": list(range(1, n + 1)), "URL_DNA": [str(img)] * n})


def test_missing_channel_file_names_the_file(tmp_path):
    table = _minimal(tmp_path)
    table.loc[1, "URL_DNA"] = str(tmp_path / "gone.tif")
    with pytest.raises(InputError, match=r"1 of 2 image file\(s\) missing: .*gone\.tif"):
        validate(table, ["DNA"], check_files=True)


def test_duplicate_site_is_refused(tmp_path):
    table = _minimal(tmp_path)
    table["Metadata_Site"] = 1
    with pytest.raises(InputError, match=r"2 rows share a \(plate, well, site\): P1 A01 site 1"):
        validate(table, ["DNA"])


def test_unknown_column_is_named(tmp_path):
    table = _minimal(tmp_path).assign(Treatment="x")
    with pytest.raises(InputError, match=r"unknown column\(s\) Treatment .*Metadata_\*"):
        validate(table, ["DNA"])
    with pytest.raises(InputError, match=r"channel\(s\) ER are not in the channel list"):
        validate(_minimal(tmp_path).assign(URL_ER="x"), ["DNA"])


def test_path_traversal_in_a_name_is_refused(tmp_path):
    table = _minimal(tmp_path)
    table["Metadata_Plate"] = "../../etc"
    with pytest.raises(InputError, match=r"'\.\./\.\./etc' cannot be used in an output path"):
        validate(table, ["DNA"])


def test_empty_index_is_refused(tmp_path):
    with pytest.raises(InputError, match="the index has no rows"):
        validate(_minimal(tmp_path).iloc[:0], ["DNA"])


def test_unknown_channel_asked_of_an_index(tmp_path):
    out = tmp_path / "i.parquet"
    write_index(validate(_minimal(tmp_path), ["DNA"]), str(out))
    with pytest.raises(InputError, match=r"unknown channel\(s\) Mito"):
        read_index(str(out), channels=["DNA", "Mito"])


def test_non_tiff_file_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("plate layout, not an image")
    with pytest.raises(ImageReadError, match=r"notes\.tif: not a TIFF or PNG file"):
        read_image(str(bad))


def test_truncated_tiff_is_an_unreadable_image(site_5ch, tmp_path):
    src = site_5ch / "images" / "orig" / "r03c03f03p01-ch5sk1fk1fl1.tiff"
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    with pytest.raises(ImageReadError, match=r"cut\.tiff: unreadable TIFF"):
        read_image(str(cut))


def test_channels_of_another_shape_are_refused(site_5ch, tmp_path):
    other = tmp_path / "small.tif"
    tifffile.imwrite(other, read_image(str(site_5ch / "images/orig/r03c03f03p01-ch5sk1fk1fl1.tiff"))[:500])
    with pytest.raises(ImageReadError, match=r"small\.tif: shape \(500, 1080\) differs"):
        read_site([str(site_5ch / "images/orig/r03c03f03p01-ch5sk1fk1fl1.tiff"), str(other)])
