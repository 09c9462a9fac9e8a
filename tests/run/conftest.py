"""Fixtures of the ``raycp run`` tests: the tiny screen (data makers in run_helper)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.run.run_helper import PEDIATRIC, TINY_SCREEN


@pytest.fixture(scope="session")
def tiny_screen(shared_data, ray_cluster, tmp_path_factory) -> Path:
    from raycp.screens.build import build_screen
    from raycp.screens.config import load_screen_config

    out = tmp_path_factory.mktemp("run-screen") / "screen"
    cfg = load_screen_config("mini", TINY_SCREEN, overrides=[f"source.folders=['{shared_data / PEDIATRIC}']"])
    build_screen(cfg, str(out))
    return out
