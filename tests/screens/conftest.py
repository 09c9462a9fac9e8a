"""Fixtures of the screen-builder tests: the real cell library and one mini screen per session."""

from __future__ import annotations

import pytest

PEDIATRIC = "images/pediatric_5ch_BR00143976_C03_s3"
#: A screen of a few sites, for the tests that build more than once (determinism, S3, CLI).
TINY = ["layout.plates=2", "layout.controls_per_plate=2", "layout.replicates=2", "layout.sites_per_well=1",
        "treatments.n=2", "image.size=128", "image.cells_per_site=5", "batch_sites=2"]


@pytest.fixture(scope="session")
def source_folder(shared_data) -> str:
    return str(shared_data / PEDIATRIC)


@pytest.fixture(scope="session")
def library(source_folder):
    """The real cells of the real 5-channel site, cut with its CellProfiler outlines (mini settings)."""
    from raycp.screens.cells import load_library
    from raycp.screens.config import PHENIX_5CH_MAP

    return load_library([source_folder], PHENIX_5CH_MAP, ("DNA", "ER", "RNA", "AGP", "Mito"), binning=2)


def screen_config(source_folder: str, preset: str = "mini", extra: list[str] | None = None):
    from raycp.screens.config import load_screen_config

    return load_screen_config(preset, overrides=[f"source.folders=['{source_folder}']", *(extra or [])])


@pytest.fixture(scope="session")
def mini_screen(source_folder, ray_cluster, tmp_path_factory):
    """`raycp screen build --preset mini`, once per session, on the 2-CPU test cluster."""
    from raycp.screens.build import build_screen

    out = tmp_path_factory.mktemp("screens") / "mini"
    return build_screen(screen_config(source_folder), str(out))


@pytest.fixture(scope="session")
def mini_features(mini_screen):
    """Simple per-site statistics of every site of the mini screen: (raw 16-bit, 8-bit stretched)."""
    from raycp.screens.stats import measure_screen

    return measure_screen(mini_screen.index.table, mini_screen.index.channels, workers=2, stretched=True)
