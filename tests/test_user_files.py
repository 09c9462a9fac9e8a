"""Real users' input files (issue 12, kinds 1–4): metadata stays text, one notion of a well,
LoadData paths as CellProfiler resolves them, and every LoadData column that picks an image plane
honoured. Each test is a bug report of the tools raycp replaces, replayed with its right value."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycp.cli import main
from raycp.errors import InputError
from raycp.io import importers
from raycp.io.images import read_site
from raycp.io.index import normalize_well, read_index, validate, well_id, write_index
from raycp.preprocess import locations

BBBC022 = "images/bbbc022_hoechst_20585"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def plate_000123(shared_data, tmp_path) -> Path:
    """A LoadData CSV of plate ``000123`` (4 wells, 2 channels of real BBBC022 images) and its plate map."""
    images = tmp_path / "images" / "plate1"
    images.mkdir(parents=True)
    files = sorted((shared_data / BBBC022).glob("*.tif"))
    for f in files:
        shutil.copy(f, images / f.name)
    wells = ["A01", "A02", "B01", "B02"]
    rows = [f"000123,{w},1,{files[i].name},{images},{files[i + 1].name},{images}" for i, w in enumerate(wells)]
    (tmp_path / "load_data.csv").write_text(
        "Metadata_Plate,Metadata_Well,Metadata_Site,FileName_OrigDNA,PathName_OrigDNA,FileName_OrigER,PathName_OrigER\n"
        + "\n".join(rows) + "\n")
    (tmp_path / "platemap.csv").write_text(
        "Metadata_Plate,Metadata_Well,Metadata_broad_sample\n"
        + "".join(f"000123,{w},{t}\n" for w, t in zip(wells, ["DMSO", "BRD-1", "BRD-2", "BRD-3"])))
    return tmp_path


# -- 1. metadata is text -------------------------------------------------------------------------

def test_plate_000123_with_a_plate_map_keeps_its_name_and_every_treatment(plate_000123, capsys):
    out = plate_000123 / "sites.parquet"
    code, stdout, err = run(capsys, "index", "build", plate_000123 / "load_data.csv", "--channel-map", "DNA=DNA,ER=ER",
                            "--platemap", plate_000123 / "platemap.csv", "--treatment-col", "Metadata_broad_sample",
                            "--control", "DMSO", "--output", out)
    assert code == 0, err
    assert "plate map platemap.csv: 4 of 4 sites matched" in stdout and "0 of them with a blank" in stdout
    table = read_index(str(out)).table
    assert table.Metadata_Plate.tolist() == ["000123"] * 4
    assert table.Metadata_Treatment.notna().sum() == 4
    assert table.Metadata_IsControl.tolist() == [True, False, False, False]


def test_without_a_plate_map_nuclei_keyed_by_the_text_plate_still_match(plate_000123, tmp_path):
    index = importers.from_loaddata(str(plate_000123 / "load_data.csv"), channel_map={"DNA": "DNA", "ER": "ER"})
    assert set(index.table.Metadata_Plate) == {"000123"}
    nuclei = tmp_path / "nuclei.csv"
    nuclei.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,Nuclei_Location_Center_X,Nuclei_Location_Center_Y\n"
                      "000123,A01,1,10.5,20.5\n000123,A1,1,30,40\n")
    table = locations.read_table(str(nuclei))
    keys = set(map(tuple, index.table[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].to_numpy().tolist()))
    assert set(map(tuple, table[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].to_numpy().tolist())) <= keys
    assert len(table) == 2  # ``A1`` is ``A01``


def test_numeric_plate_of_bbbc022_stays_text_in_every_reader(shared_data, tmp_path):
    files = sorted((shared_data / BBBC022).glob("*.tif"))
    csv = tmp_path / "load_data.csv"
    csv.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,FileName_OrigDNA,PathName_OrigDNA\n"
                   f"20585,A01,1,{files[0].name},{files[0].parent}\n")
    index = importers.from_loaddata(str(csv), channel_map={"DNA": "DNA"})
    assert index.table.Metadata_Plate.tolist() == ["20585"]
    # a Parquet written by pandas with an integer plate (and a float one, from a NaN) joins as text too
    frame = pd.DataFrame({"Metadata_Plate": [20585, 20585], "Metadata_Well": ["A01", "A01"], "Metadata_Site": [1, 1],
                          "Location_Center_X": [1.0, 2.0], "Location_Center_Y": [1.0, 2.0]})
    frame.to_parquet(tmp_path / "loc.parquet")
    assert locations.read_table(str(tmp_path / "loc.parquet")).Metadata_Plate.tolist() == ["20585", "20585"]
    frame["Metadata_Plate"] = [20585.0, np.nan]
    assert validate(frame.iloc[:1].assign(URL_DNA=str(files[0])).drop(
        columns=["Location_Center_X", "Location_Center_Y"]), ["DNA"]).table.Metadata_Plate.tolist() == ["20585"]


def test_profile_csv_metadata_stays_text(tmp_path):
    from raycp.profiles.io import read_table

    (tmp_path / "wells.csv").write_text("Metadata_Plate,Metadata_Well,Metadata_dose,f1\n000123,A01,0010,1.5\n")
    df = read_table(tmp_path / "wells.csv")
    assert df.Metadata_Plate.tolist() == ["000123"] and df.Metadata_dose.tolist() == ["0010"]
    assert df.f1.dtype == np.float64


# -- 2. one notion of a well ---------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["C3", "C03", "c003", " C03 ", "C-03", "C_3", "r03c03", "R3C3", "r003c003"])
def test_every_well_spelling_is_one_well(spelling):
    assert normalize_well(spelling) == "C03"


def test_well_ids_of_1536_well_plates_and_from_rows_and_columns():
    assert normalize_well("af48") == "AF48" and normalize_well("r32c48") == "AF48"
    assert well_id("C", "3") == well_id(3, 3) == "C03"
    assert normalize_well("not a well") == "not a well"


def test_plate_map_in_another_well_spelling_matches_and_reports_n_of_m(plate_000123, capsys):
    pm = plate_000123 / "platemap_unpadded.csv"
    pm.write_text("well_position,broad_sample\nA1,DMSO\na002,BRD-1\n B1 ,\n")  # JUMP's names; no plate column
    code, stdout, err = run(capsys, "index", "build", plate_000123 / "load_data.csv", "--channel-map", "DNA=DNA,ER=ER",
                            "--platemap", pm, "--treatment-col", "broad_sample", "--control", "DMSO",
                            "--output", plate_000123 / "s.parquet")
    assert code == 0, err
    assert "3 of 4 sites matched on Metadata_Well, 1 of them with a blank Metadata_broad_sample" in stdout
    assert "raycp: warning: plate map platemap_unpadded.csv matched 3 of 4 sites" in err and "000123" not in err
    table = read_index(str(plate_000123 / "s.parquet")).table
    assert table.Metadata_Treatment.tolist()[:2] == ["DMSO", "BRD-1"]
    assert table.Metadata_Treatment.isna().tolist() == [False, False, True, True]


def test_plate_map_matching_no_site_is_an_error_showing_both_sides(plate_000123, capsys):
    pm = plate_000123 / "platemap_123.csv"
    pm.write_text("Metadata_Plate,Metadata_Well,Metadata_broad_sample\n123,A01,DMSO\n")
    code, _, err = run(capsys, "index", "build", plate_000123 / "load_data.csv", "--channel-map", "DNA=DNA,ER=ER",
                       "--platemap", pm, "--treatment-col", "Metadata_broad_sample", "--output", plate_000123 / "x.parquet")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "matched 0 of 4 sites" in line and "A01/000123" in line and "A01/123" in line


def test_duplicate_plate_map_rows_are_refused(plate_000123):
    pm = plate_000123 / "dup.csv"
    pm.write_text("Metadata_Well,t\nA01,x\nA1,y\n")
    with pytest.raises(InputError, match="2 plate-map rows share a Metadata_Well"):
        importers.from_loaddata(str(plate_000123 / "load_data.csv"), channel_map={"DNA": "DNA"}, platemap=str(pm))


# -- 3. LoadData paths -----------------------------------------------------------------------------

def _loaddata_in_sibling_folder(root: Path, path_value: str) -> Path:
    folder = root / "csv"
    folder.mkdir(exist_ok=True)
    csv = folder / "load_data.csv"
    name = sorted((root / "images" / "plate1").glob("*.tif"))[0].name
    csv.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,FileName_OrigDNA,PathName_OrigDNA\n"
                   f"P1,A01,1,{name},\"{path_value}\"\n")
    return csv


@pytest.mark.parametrize("path_value", ["../images/plate1", "..\\images\\plate1", "./../images/plate1/"])
def test_relative_and_windows_style_path_names_resolve_against_the_csv(plate_000123, path_value):
    csv = _loaddata_in_sibling_folder(plate_000123, path_value)
    index = importers.from_loaddata(str(csv), channel_map={"DNA": "DNA"})
    url = index.table.URL_DNA.iloc[0]
    assert Path(url).parent == plate_000123 / "images" / "plate1" and Path(url).exists()
    assert read_site(index.planes(index.table.iloc[0])).shape[0] == 1


@pytest.mark.parametrize("path_value", ["C:\\images\\plate1", "D:/screens/p1", "\\\\server\\share\\p1"])
def test_a_windows_drive_path_is_one_error_naming_csv_column_and_row(plate_000123, capsys, path_value):
    csv = _loaddata_in_sibling_folder(plate_000123, path_value)
    code, _, err = run(capsys, "index", "build", csv, "--channel-map", "DNA=DNA", "--output", plate_000123 / "x.parquet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(csv) in lines[0] and "PathName_OrigDNA row 1" in lines[0]
    assert "Windows path" in lines[0] and "fix:" in lines[0]


# -- 4. LoadData columns honoured, as CellProfiler reads them ---------------------------------------

def _stack_files(tmp_path: Path) -> dict[str, np.ndarray]:
    """A 2-series TIFF (3 pages each), and an RGB TIFF: every plane distinct."""
    rng = np.random.default_rng(0)
    planes = {f"s{s}f{f}": rng.integers(0, 4096, (16, 20), dtype=np.uint16) for s in range(2) for f in range(3)}
    with tifffile.TiffWriter(tmp_path / "multi.tif") as tif:
        for s in range(2):
            tif.write(np.stack([planes[f"s{s}f{f}"] for f in range(3)]), photometric="minisblack", metadata={"series": s})
    rgb = rng.integers(0, 4096, (16, 20, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    for c in range(3):
        planes[f"rgb{c}"] = rgb[..., c]
    return planes


def test_series_frame_and_channel_columns_pick_the_plane_cellprofiler_reads(tmp_path):
    planes = _stack_files(tmp_path)
    csv = tmp_path / "load_data.csv"
    csv.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,Image_FileName_DNA,Image_PathName_DNA,Series_DNA,"
                   "Frame_DNA,URL_ER,FileName_ER,PathName_ER,Channel_ER\n"
                   f"P,A01,1,multi.tif,,1,2,{tmp_path}/rgb.tif,ignored.tif,/nowhere,1\n"
                   f"P,A01,2,multi.tif,,0,1,file://{tmp_path}/rgb.tif,ignored.tif,/nowhere,2\n")
    index = importers.from_loaddata(str(csv), channel_map={"DNA": "DNA", "ER": "ER"})
    assert index.table.Series_DNA.tolist() == [1, 0] and index.table.Channel_ER.tolist() == [1, 2]
    out = tmp_path / "sites.parquet"
    write_index(index, str(out))
    again = read_index(str(out))
    site1 = read_site(again.planes(again.table.iloc[0]))
    site2 = read_site(again.planes(again.table.iloc[1]))
    np.testing.assert_array_equal(site1[0], planes["s1f2"])  # Series_ then Frame_
    np.testing.assert_array_equal(site2[0], planes["s0f1"])
    np.testing.assert_array_equal(site1[1], planes["rgb1"])  # URL_ wins over FileName_/PathName_, as in CellProfiler
    np.testing.assert_array_equal(site2[1], planes["rgb2"])


def test_a_plane_that_does_not_exist_quarantines_with_the_column_to_fix(tmp_path):
    _stack_files(tmp_path)
    table = pd.DataFrame({"Metadata_Plate": ["P"], "Metadata_Well": ["A01"], "Metadata_Site": [1],
                          "URL_DNA": [str(tmp_path / "multi.tif")], "Series_DNA": [5]})
    index = validate(table, ["DNA"])
    with pytest.raises(InputError, match="series 5 asked for but the TIFF has 2 series.*Series_<channel>"):
        read_site(index.planes(index.table.iloc[0]))
    bad = table.assign(Series_DNA=["one"])
    with pytest.raises(InputError, match="Series_DNA row 1 is 'one', not a whole number"):
        validate(bad, ["DNA"])


def test_a_row_and_a_column_make_the_well_as_in_cellprofiler(tmp_path):
    img = tmp_path / "a.tif"
    tifffile.imwrite(img, np.zeros((8, 8), np.uint16))
    csv = tmp_path / "load_data.csv"
    csv.write_text(f"Metadata_Plate,Metadata_Row,Metadata_Column,Metadata_Site,URL_OrigDNA\nP,C,3,1,{img}\nP,4,12,1,{img}\n")
    index = importers.from_loaddata(str(csv), channel_map={"DNA": "DNA"})
    assert index.table.Metadata_Well.tolist() == ["C03", "D12"]


def test_image_columns_for_objects_or_without_file_name_are_refused_by_name(tmp_path):
    csv = tmp_path / "load_data.csv"
    csv.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,ObjectsFileName_Nuclei,ObjectsPathName_Nuclei\nP,A01,1,n.tif,.\n")
    with pytest.raises(InputError, match="Nuclei is loaded as objects"):
        importers.from_loaddata(str(csv), channel_map={"Nuclei": "DNA"})
    csv.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,PathName_OrigDNA\nP,A01,1,.\n")
    with pytest.raises(InputError, match="PathName_OrigDNA has no matching FileName_ column"):
        importers.from_loaddata(str(csv), channel_map={"DNA": "DNA"})


def test_unmapped_loaddata_images_are_named_not_silently_dropped(plate_000123):
    index = importers.from_loaddata(str(plate_000123 / "load_data.csv"), channel_map={"DNA": "DNA"})
    assert any("not mapped to a channel (not read): OrigER" in n for n in index.notes)


# -- 5. CellProfiler SQLite keys ---------------------------------------------------------------------

def _sqlite_copy(shared_data, tmp_path, name: str, *statements: str) -> Path:
    import sqlite3

    path = tmp_path / name
    shutil.copy(shared_data / "interop" / "test_BR00126114.sqlite", path)
    con = sqlite3.connect(path)
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()
    return path


def _nuclei_per_site(table: pd.DataFrame) -> list[int]:
    return table.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).size().tolist()


def test_sqlite_objects_join_images_on_table_number_and_image_number(shared_data, tmp_path):
    """JUMP sources merge batches: ImageNumber repeats across TableNumbers (here: both images are 1)."""
    assert _nuclei_per_site(locations.read_table(str(shared_data / "interop" / "test_BR00126114.sqlite"))) == [10, 10]
    path = _sqlite_copy(shared_data, tmp_path, "same_image_number.sqlite",
                        "UPDATE Image SET ImageNumber = '1'", "UPDATE Nuclei SET ImageNumber = '1'")
    assert _nuclei_per_site(locations.read_table(str(path))) == [10, 10]


def test_sqlite_tables_with_export_to_database_prefix_are_found(shared_data, tmp_path):
    path = _sqlite_copy(shared_data, tmp_path, "prefixed.sqlite", "ALTER TABLE Image RENAME TO MyExpt_Per_Image",
                        "ALTER TABLE Nuclei RENAME TO MyExpt_Per_Object")
    assert _nuclei_per_site(locations.read_table(str(path))) == [10, 10]


def test_sqlite_images_sharing_their_keys_are_refused(shared_data, tmp_path):
    path = _sqlite_copy(shared_data, tmp_path, "dup.sqlite", "UPDATE Image SET ImageNumber = '1', TableNumber = '7'")
    with pytest.raises(InputError, match="2 rows of Image share a TableNumber/ImageNumber"):
        locations.read_table(str(path))


def test_loaddata_and_plate_map_wells_in_different_spellings_join(plate_000123):
    csv = plate_000123 / "load_data_spelled.csv"
    src = pd.read_csv(plate_000123 / "load_data.csv", dtype=str)
    src["Metadata_Well"] = ["A1", "a002", " B01 ", "r02c02"]
    src.to_csv(csv, index=False)
    pm = plate_000123 / "pm_spelled.csv"
    pm.write_text("Metadata_Plate,Metadata_Well,Metadata_broad_sample\n000123,A01,DMSO\n000123,A2,x\n000123, b1 ,y\n"
                  "000123,B002,z\n")
    index = importers.from_loaddata(str(csv), channel_map={"DNA": "DNA"}, platemap=str(pm),
                                    treatment_col="Metadata_broad_sample", control_values=("DMSO",))
    assert index.table.Metadata_Well.tolist() == ["A01", "A02", "B01", "B02"]
    assert index.table.Metadata_Treatment.tolist() == ["DMSO", "x", "y", "z"]
    assert any("4 of 4 sites matched" in n for n in index.notes)


def test_a_bad_frame_in_loaddata_names_the_csv_column(tmp_path):
    _stack_files(tmp_path)
    csv = tmp_path / "load_data.csv"
    csv.write_text(f"Metadata_Plate,Metadata_Well,Metadata_Site,URL_OrigDNA,Frame_OrigDNA\nP,A01,1,{tmp_path}/multi.tif,0\n"
                   f"P,A01,2,{tmp_path}/multi.tif,1.5\n")
    with pytest.raises(InputError, match=r"Frame_OrigDNA row 2 is '1.5', not a whole number"):
        importers.from_loaddata(str(csv), channel_map={"DNA": "DNA"})


def test_a_control_value_that_matches_no_treatment_is_a_warning(plate_000123, capsys):
    code, stdout, err = run(capsys, "index", "build", plate_000123 / "load_data.csv", "--channel-map", "DNA=DNA",
                            "--platemap", plate_000123 / "platemap.csv", "--treatment-col", "Metadata_broad_sample",
                            "--control", "DMSOO", "--output", plate_000123 / "s.parquet")
    assert code == 0 and "control sites 0" in stdout
    assert "raycp: warning: no site has a control treatment ['DMSOO']" in err and "'DMSO'" in err


def test_sqlite_nuclei_of_no_image_are_an_error_not_a_silent_drop(shared_data, tmp_path):
    path = _sqlite_copy(shared_data, tmp_path, "orphans.sqlite",
                        "UPDATE Nuclei SET ImageNumber = '9' WHERE ObjectNumber IN (1, 2)")
    with pytest.raises(InputError, match=r"nuclei in Nuclei belong to no image of Image \(first: TableNumber/ImageNumber"):
        locations.read_table(str(path))


def test_summarize_reads_the_index_channels_when_none_are_configured(shared_data, ray_cluster, tmp_path, capsys):
    files = sorted((shared_data / BBBC022).glob("*.tif"))[:2]
    csv = tmp_path / "ld.csv"
    csv.write_text("Metadata_Plate,Metadata_Well,Metadata_Site,URL_OrigDNA\n"
                   + "".join(f"P,A01,{i + 1},{f}\n" for i, f in enumerate(files)))
    index = tmp_path / "sites.parquet"
    assert run(capsys, "index", "build", csv, "--channel-map", "DNA=DNA", "--output", index)[0] == 0
    code, stdout, err = run(capsys, "index", "summarize", index, "--output", tmp_path / "out")
    assert code == 0, err
    assert "2 input(s) = 2 processed + 0 quarantined" in stdout
