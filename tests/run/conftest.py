"""Fixtures of the ``raycp run`` tests: the tiny screen (data makers in run_helper)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from run_helper import PEDIATRIC, TINY_SCREEN  # noqa: E402


@pytest.fixture(scope="session")
def tiny_screen(shared_data, ray_cluster, tmp_path_factory) -> Path:
    from raycp.screens.build import build_screen
    from raycp.screens.config import load_screen_config

    out = tmp_path_factory.mktemp("run-screen") / "screen"
    cfg = load_screen_config("mini", overrides=[f"source.folders=['{shared_data / PEDIATRIC}']", *TINY_SCREEN])
    build_screen(cfg, str(out))
    return out
