"""`raycp screen build|describe` (the lead registers this app as `raycp screen`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from raycp.errors import ConfigError, InputError
from raycp.screens.cli import app

from .conftest import TINY


def sets(source_folder: str, extra: list[str] | None = None) -> list[str]:
    out = ["--set", f"source.folders=['{source_folder}']"]
    for item in [*TINY, *(extra or [])]:
        out += ["--set", item]
    return out


def test_build_then_describe_with_check(source_folder, ray_cluster, tmp_path):
    out = tmp_path / "screen"
    result = CliRunner().invoke(app, ["build", "--preset", "mini", "-o", str(out), *sets(source_folder)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "plates 2 · wells 8 · sites 8" in result.output
    result = CliRunner().invoke(app, ["describe", str(out), "--check"])
    assert result.exit_code == 0, result.output
    for text in ("program nuclear_enlargement", "confounder plate_gain_offset", "plate from control sites",
                 "treatment effect"):
        assert text in result.output


def test_dry_run_prints_the_resolved_config_and_plan(source_folder, tmp_path):
    result = CliRunner().invoke(app, ["build", "--preset", "bench", "--dry-run", "--seed", "5",
                                      "-o", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "seed: 5" in result.output and "plan: plates 8 · wells 1856 · sites 11136" in result.output
    assert not (tmp_path / "x").exists()


def test_bad_inputs_raise_one_line_errors(source_folder, tmp_path):
    with pytest.raises(ConfigError, match="unknown screen preset 'huge'.*fix: use one of mini, small, bench"):
        app(["build", "--preset", "huge", "-o", str(tmp_path / "x")], standalone_mode=False)
    with pytest.raises(ConfigError, match=r"--set layout.well: unknown key 'layout.well' \(fix: remove it"):
        app(["build", "-o", str(tmp_path / "x"), "--set", "layout.well=96"], standalone_mode=False)
    with pytest.raises(ConfigError, match=r"layout.wells: Input should be 96 or 384"):
        app(["build", "-o", str(tmp_path / "x"), "--set", "layout.wells=100"], standalone_mode=False)
    with pytest.raises(InputError, match="needs .* wells on a plate"):
        app(["build", "-o", str(tmp_path / "x"), *sets(source_folder, ["treatments.n=400"])],
            standalone_mode=False)
    with pytest.raises(InputError, match="no manifest.json"):
        app(["describe", str(tmp_path)], standalone_mode=False)
