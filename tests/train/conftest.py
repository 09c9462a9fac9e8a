"""Training fixtures: crop shards from the real 5-channel site, the offline ImageNet weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from crops_helper import make_crop_shards


@pytest.fixture(scope="session")
def crops64(site_5ch, tmp_path_factory) -> Path:
    """512 crops of 64 px, 2 plates, classes DMSO/EMPTY (192 cells each) ≫ T1..T4 (32 each)."""
    return make_crop_shards(tmp_path_factory.mktemp("crops64"), site_5ch, size=64)


@pytest.fixture(scope="session")
def crops128(site_5ch, tmp_path_factory) -> Path:
    """The paper's crop size (128 px), few cells, as Arrow's canonical fixed-shape tensor."""
    return make_crop_shards(tmp_path_factory.mktemp("crops128"), site_5ch, size=128, ctrl_cells=6, trt_cells=3,
                            tensor="arrow")



@pytest.fixture(scope="session")
def mini_crops(site_5ch, ray_cluster, tmp_path_factory) -> Path:
    """`raycp screen build --preset mini` (issue 5) then `raycp preprocess` (issue 4) up to 64-px crops,
    nuclei at the screen's true centres: 2 plates, 13 classes (DMSO ≫ 12 compounds), ~4,300 cells."""
    pytest.importorskip("raycp.screens.build", reason="the screen builder (issue 5)")
    pytest.importorskip("raycp.preprocess.pipeline", reason="the preprocess stage (issue 4)")
    from raycp.preprocess import pipeline
    from raycp.preprocess.cli import load_run
    from raycp.screens.build import build_screen
    from raycp.screens.config import load_screen_config

    root = tmp_path_factory.mktemp("mini-screen")
    screen = root / "screen"
    build_screen(load_screen_config("mini", overrides=[f"source.folders=['{site_5ch}']"]), str(screen))
    run = load_run(None, ["compute.num_cpus=2", "compute.object_store_memory_gb=0.5", "crops.size=64",
                          f"nuclei.locations={screen / 'truth' / 'nuclei.parquet'}"],
                   str(screen / "index" / "sites.parquet"), str(root / "run"))
    index, _ = pipeline.load_index(run.data.index, channels=list(run.data.channels))
    results = pipeline.run_all(run, index)
    assert all(r.summary["quarantined"] == 0 for r in results), [r.summary for r in results]
    return root / "run" / "crops"
