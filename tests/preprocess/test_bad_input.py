"""Bad input never stops a screen: each bad site ends quarantined with its reason while the others
finish (processed + quarantined = total), on a real S3 API; re-running skips finished sites and
writes the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from raycp.io import importers
from raycp.io.index import validate, write_index
from tests.conftest import PHENIX_5CH_MAP
from tests.preprocess.conftest import emptiest_window, raycp_main

CH = {"DNA": 5, "ER": 2, "RNA": 6, "AGP": 3, "Mito": 4}


def _name(field: int, ch: int) -> str:
    return f"r03c03f{field:02d}p01-ch{ch}sk1fk1fl1.tiff"


@pytest.fixture(scope="module")
def bad_sites(site_5ch, tmp_path_factory):
    """Six sites made from the real site: 1 and 6 good; 2 truncated DNA TIFF; 3 ER of another
    shape; 4 blank (real background pixels only); 5 good but its Mito file goes missing."""
    folder = tmp_path_factory.mktemp("bad") / "orig"
    folder.mkdir()
    src = site_5ch / "images" / "orig"
    for field in range(1, 7):
        for ch in CH.values():
            shutil.copyfile(src / _name(3, ch), folder / _name(field, ch))
    dna = folder / _name(2, CH["DNA"])
    dna.write_bytes(dna.read_bytes()[: dna.stat().st_size // 3])
    er = tifffile.imread(src / _name(3, CH["ER"]))
    tifffile.imwrite(folder / _name(3, CH["ER"]), er[:500], compression="zlib")
    for ch in CH.values():
        plane = tifffile.imread(src / _name(3, ch))
        y, x = emptiest_window(plane)
        window = plane[y:y + 256, x:x + 256]
        tifffile.imwrite(folder / _name(4, ch), np.tile(window, (5, 5))[:1080, :1080], compression="zlib")
    return folder


def _snapshot(fs, prefix: str) -> dict[str, str]:
    return {p: hashlib.md5(fs.cat_file(p)).hexdigest() for p in sorted(fs.find(prefix)) if "/." not in p}


def test_every_bad_site_is_quarantined_with_its_reason_on_s3(bad_sites, s3_server, ray_cluster, capsys):
    fs, bucket = s3_server["fs"], s3_server["bucket"]
    remote = f"{bucket}/bad/orig"
    for path in sorted(bad_sites.iterdir()):
        fs.put_file(str(path), f"{remote}/{path.name}")
    index = importers.from_phenix_folder(f"s3://{remote}", plate="P", channel_map=PHENIX_5CH_MAP)
    assert len(index) == 6
    # the blank site gets a plate of its own: plate P's illumination function is the mean of five
    # copies of one real field, which holds that field's nuclei and would print them on a blank
    table = index.table.copy()
    table.loc[table.Metadata_Site == 4, "Metadata_Plate"] = "Q"
    index = validate(table, index.channels)
    index_url = f"s3://{bucket}/bad/index/sites.parquet"
    write_index(index, index_url)
    gone = f"{remote}/{_name(5, CH['Mito'])}"
    fs.rm_file(gone)  # a file goes missing after indexing
    run = f"s3://{bucket}/bad/run"
    argv = ["preprocess", "all", "--index", index_url, "--output", run,
            "--set", "compute.num_cpus=2", "--set", "compute.object_store_memory_gb=0.5"]
    code = raycp_main(argv)
    out = capsys.readouterr().out
    assert code == 3
    print(out)

    def ledger(stage: str) -> dict:
        table = pd.read_parquet(fs.open(f"{bucket}/bad/run/{stage}/ledger.parquet", "rb"))
        assert len(table) == 6  # processed + quarantined = total
        return {int(r.Metadata_Site): (r.status, r.reason) for r in table.itertuples()}  # sites are unique

    crops = ledger("crops")
    assert [s for s, (st, _) in crops.items() if st == "processed"] == [1, 6]
    assert "r03c03f02p01-ch5sk1fk1fl1.tiff: unreadable TIFF" in crops[2][1]
    assert "r03c03f03p01-ch2sk1fk1fl1.tiff: shape (500, 1080) differs" in crops[3][1]
    assert "no nuclei for this site" in crops[4][1]
    assert f"s3://{gone}: file not found" in crops[5][1]
    nuclei = ledger("nuclei")  # detection reads only the DNA channel
    assert "zero nuclei detected" in nuclei[4][1] and nuclei[4][0] == "quarantined"
    assert "unreadable TIFF" in nuclei[2][1]
    assert {s for s, (st, _) in nuclei.items() if st == "processed"} == {1, 3, 5, 6}
    illum = ledger("illum")
    assert {s for s, (st, _) in illum.items() if st == "quarantined"} == {2, 3, 5}
    assert "crops: 6 input(s) = 2 processed + 4 quarantined" in out
    assert "quarantined 1: Q C03 site 4: zero nuclei detected" in out
    summary = json.loads(fs.cat_file(f"{bucket}/bad/run/crops/ledger.json"))
    assert (summary["total"], summary["processed"], summary["quarantined"]) == (6, 2, 4)

    # re-running: finished sites are skipped, the bad ones fail the same way, bytes are identical
    before = _snapshot(fs, f"{bucket}/bad/run")
    shard = f"{bucket}/bad/run/crops/P/C03_1.parquet"
    written = fs.info(shard)["LastModified"]
    assert raycp_main(argv) == 3
    capsys.readouterr()
    fs.invalidate_cache()
    assert _snapshot(fs, f"{bucket}/bad/run") == before
    assert fs.info(shard)["LastModified"] == written  # not rewritten: skipped


def test_location_outside_the_image_quarantines_its_site(bad_sites, site_5ch, ray_cluster, tmp_path, capsys):
    """Nuclei imported from a table: site 6 has one row far outside the 1080×1080 image."""
    index = importers.from_phenix_folder(str(bad_sites), plate="P", channel_map=PHENIX_5CH_MAP)
    table = index.table[index.table.Metadata_Site.isin([1, 6])]
    index_url = str(tmp_path / "sites.parquet")
    write_index(type(index)(table.reset_index(drop=True), index.channels), index_url)
    cp = pd.read_parquet(site_5ch / "BR00143976_shrunken.parquet")
    rows = []
    for site in (1, 6):
        for i, r in enumerate(cp.itertuples(), start=1):
            x = 5000.0 if (site == 6 and i == 3) else r.Nuclei_Location_Center_X
            rows.append({"Metadata_Plate": "P", "Metadata_Well": "C03", "Metadata_Site": site,
                         "ObjectNumber": i, "Location_Center_X": x, "Location_Center_Y": r.Nuclei_Location_Center_Y})
    locations = tmp_path / "Nuclei.csv"
    pd.DataFrame(rows).to_csv(locations, index=False)
    base = ["--index", index_url, "--output", str(tmp_path / "run"), "--set", f"nuclei.locations={locations}",
            "--set", "illumination.enabled=false", "--set", "compute.num_cpus=2"]
    assert raycp_main(["preprocess", "nuclei", *base]) == 0
    code = raycp_main(["preprocess", "crops", *base])
    out = capsys.readouterr().out
    assert code == 3
    assert "crops: 2 input(s) = 1 processed + 1 quarantined" in out
    ledger = pd.read_parquet(tmp_path / "run" / "crops" / "ledger.parquet")
    assert ledger.status.tolist() == ["processed", "quarantined"]
    assert "P C03 site 6: nucleus 3 at (5000.0, 95.5) is outside the 1080×1080 image" in ledger.reason.iloc[1]
    assert ledger.n_cells.tolist() == [5, 0]
