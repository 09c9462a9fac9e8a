"""`raycp preprocess ...`: the stage verbs, their one-line errors and the config sections."""

from __future__ import annotations

import pytest

from raycp.errors import ConfigError
from raycp.preprocess.config import CropsConfig, PreprocessConfig
from tests.preprocess.conftest import pediatric_index, raycp_main, run_config, save_index


def test_help_lists_the_stage_verbs(capsys):
    assert raycp_main(["preprocess", "--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("illum", "compress", "nuclei", "crops", "all"):
        assert verb in out


def test_defaults_are_the_papers_constants():
    cfg = PreprocessConfig()
    assert (cfg.illumination.scale, cfg.illumination.median_radius, cfg.illumination.robust_percentile) == (0.25, 12, 2.0)
    assert (cfg.compression.low_percentile, cfg.compression.high_percentile) == (0.05, 99.95)
    assert (cfg.crops.size, cfg.crops.skip_border, cfg.crops.mask) == (128, False, False)
    assert cfg.nuclei.locations is None and cfg.nuclei.channel == "DNA"
    with pytest.raises(ValueError, match="crops.mask needs crops.mask_channel"):
        CropsConfig(mask=True)
    with pytest.raises(ConfigError, match="unknown key 'crops.colour'"):
        run_config("o", "i", "crops.colour=1")


@pytest.mark.parametrize(("argv", "needle"), [
    (["crops"], "no illumination functions (illum/_SUCCESS missing) (fix: run `raycp preprocess illum` first"),
    (["crops", "--set", "illumination.enabled=false", "--set", "nuclei.channel=Hoechst"],
     "nuclei.channel 'Hoechst' is not among the index's channels"),
    (["compress", "--set", "compression.low_percentile=60"], "compression.low_percentile"),
])
def test_bad_setup_is_one_line_with_exit_code_2(site_5ch, tmp_path, capsys, argv, needle):
    index_url = save_index(pediatric_index(site_5ch), tmp_path)
    code = raycp_main(["preprocess", *argv, "--index", index_url, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("raycp: error: ") and needle in err[0]


def test_importing_the_stages_imports_no_ray():
    import subprocess
    import sys

    code = ("import sys, raycp.preprocess.cli, raycp.preprocess.pipeline, raycp.preprocess.crops; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
