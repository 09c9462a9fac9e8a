"""Helpers for the image-stage tests: indexes of the real image folders, run configs, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycp.io import importers
from raycp.io.index import ScreenIndex, validate, write_index
from tests.conftest import PHENIX_5CH_MAP

BBBC016 = re.compile(r"^AS_09047_050428030001_(?P<well>[A-P]\d{2})f(?P<field>\d{2})d2\.TIF$")


def run_config(output, index: str = "unused", *overrides: str):
    """A run config for these stages (the CLI's model) on the test Ray cluster's scale."""
    from raycp.preprocess.cli import load_run

    return load_run(None, ["compute.num_cpus=2", "compute.object_store_memory_gb=0.5", *overrides],
                    str(index), str(output))


def raycp_main(argv: list[str]) -> int:
    """`raycp ...` with the preprocess verbs registered as the lead will (``raycp preprocess``)."""
    from raycp import cli
    from raycp.preprocess.cli import app

    if not any(g.name == "preprocess" for g in cli.app.registered_groups):
        cli.app.add_typer(app, name="preprocess")
    return cli.main(argv)


def pediatric_index(site_5ch: Path, **extra) -> ScreenIndex:
    """The real 5-channel Phenix site (plate BR00143976, C03, site 3)."""
    index = importers.from_phenix_folder(str(site_5ch / "images" / "orig"), plate="BR00143976",
                                         channel_map=PHENIX_5CH_MAP)
    if extra:
        table = index.table.assign(**extra)
        index = validate(table, index.channels)
    return index


def bbbc016_index(shared_data: Path) -> ScreenIndex:
    """12 real GFP sites of one plate (4 wells × 3 fields), 8-bit."""
    folder = shared_data / "images" / "bbbc016_illum_gfp"
    rows = []
    for path in sorted(folder.iterdir()):
        m = BBBC016.match(path.name)
        if m:
            rows.append({"Metadata_Plate": "AS_09047", "Metadata_Well": m["well"],
                         "Metadata_Site": int(m["field"]) + 1, "URL_GFP": str(path)})
    assert len(rows) == 12
    return validate(pd.DataFrame(rows), ["GFP"])


def save_index(index: ScreenIndex, folder: Path) -> str:
    url = str(folder / "index" / "sites.parquet")
    write_index(index, url)
    return url


@pytest.fixture(scope="session")
def pediatric_cp_locations(site_5ch) -> pd.DataFrame:
    """CellProfiler's nuclei centres of 5 cells of the real site (its shipped parquet)."""
    from raycp.preprocess.locations import read_table

    return read_table(str(site_5ch / "BR00143976_shrunken.parquet"))


@pytest.fixture(scope="session")
def pediatric_run(site_5ch, ray_cluster, tmp_path_factory):
    """`raycp preprocess all` on the real 5-channel site, nuclei from CellProfiler's parquet,
    DeepProfiler export on: the run folder (shared by the compression and crops tests)."""
    root = tmp_path_factory.mktemp("pediatric")
    index = pediatric_index(site_5ch, Metadata_Treatment="DMSO", Metadata_IsControl=True)
    index_url = save_index(index, root)
    run = root / "run"
    code = raycp_main(["preprocess", "all", "--index", index_url, "--output", str(run),
                       "--set", f"nuclei.locations={site_5ch / 'BR00143976_shrunken.parquet'}",
                       "--set", "crops.export_deepprofiler=true",
                       "--set", "compute.num_cpus=2", "--set", "compute.object_store_memory_gb=0.5"])
    assert code == 0
    return {"run": run, "index": index, "index_url": index_url}


def emptiest_window(image: np.ndarray, size: int = 256) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the ``size``² window (on a 32-px grid) whose brightest pixel is dimmest."""
    best = None
    for y in range(0, image.shape[0] - size + 1, 32):
        for x in range(0, image.shape[1] - size + 1, 32):
            peak = image[y:y + size, x:x + size].max()
            if best is None or peak < best[0]:
                best = (peak, y, x)
    return best[1], best[2]
