"""Typed config: YAML < CLI precedence, unknown keys named, resolved config saved without secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raycp.config import ComputeConfig, build_config, save_resolved
from raycp.errors import ConfigError
from raycp.preprocess.config import RunConfig, load_config


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_cli_overrides(tmp_path):
    path = _write(tmp_path, "data: {index: a.parquet, output: out}\ncrops: {size: 96}\n")
    cfg = load_config(path, ["crops.size=64", "compute.num_cpus=2", "data.channels=[DNA, Mito]"])
    assert cfg.crops.size == 64 and cfg.compute.num_cpus == 2
    assert cfg.data.channels == ["DNA", "Mito"] and cfg.data.index == "a.parquet"
    assert load_config(path).crops.size == 96
    assert load_config(path).data.channels == ["DNA", "ER", "RNA", "AGP", "Mito"]


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("data: {index: a, output: b, chanels: [DNA]}", [], r"unknown key 'data\.chanels'"),
        ("data: {index: a, output: b}", ["crops.sise=3"], r"unknown key 'crops\.sise'"),
        ("data: {output: b}", [], r"missing key 'data\.index'"),
        ("data: {index: a, output: b}", ["crops.size=4"], r"crops\.size: Input should be greater"),
        ("data: [a, b", [], r"invalid YAML"),
        ("data: {index: a, output: b, channels: [DNA, DNA]}", [], r"duplicate channel names"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(_write(tmp_path, text), overrides)
    assert "\n" not in str(err.value)


def test_compute_knobs_apart_from_science():
    science = set(RunConfig.model_fields) - {"compute"}
    assert "compute" in RunConfig.model_fields and "crops" in science
    assert not set(ComputeConfig.model_fields) & {"size", "channels", "index"}


def test_resolved_config_is_saved_and_reloads_identically(tmp_path):
    cfg = load_config(_write(tmp_path, "data: {index: i.parquet, output: o}\n"), ["compute.num_cpus=2"])
    url = save_resolved(cfg, str(tmp_path / "run"))
    again = build_config(RunConfig, url)
    assert again == cfg


def test_secret_looking_values_never_reach_disk(tmp_path):
    from pydantic import BaseModel

    class WithSecret(BaseModel):
        aws_secret_access_key: str = "abc123"
        endpoint: str = "http://x"

    save_resolved(WithSecret(), str(tmp_path))
    text = (tmp_path / "config.yaml").read_text()
    assert "abc123" not in text and yaml.safe_load(text)["aws_secret_access_key"] == "<redacted>"


def test_apply_overrides_gives_a_validated_copy(tmp_path):
    from raycp.config import apply_overrides
    from raycp.errors import ConfigError
    from raycp.run.config import PipelineConfig

    base = build_config(PipelineConfig, None, ["data.index=i.parquet", f"data.output={tmp_path}"])
    trial = apply_overrides(base, {"data.output": "s3://bucket/sweeps/t3", "profiles.sphere_lambda": 1e-3,
                                   "crops.size": 96})
    assert trial.data.output == "s3://bucket/sweeps/t3" and trial.profiles.sphere_lambda == 1e-3
    assert trial.crops.size == 96 and base.crops.size == 128 and base.data.output == str(tmp_path)
    with pytest.raises(ConfigError, match="override profiles.sphere_lamda: unknown key"):
        apply_overrides(base, {"profiles.sphere_lamda": 1.0})
    with pytest.raises(ConfigError, match="profiles.sphere_lambda"):
        apply_overrides(base, {"profiles.sphere_lambda": 0})


def test_the_test_configs_are_valid_examples():
    """tests/conf/*.yaml are runnable examples (each says how to run it): each one resolves to its
    config class, so a renamed or removed key fails here, not in a user's hands."""
    from raycp.run import load
    from raycp.screens.config import load_screen_config

    conf = Path(__file__).resolve().parent / "conf"
    found = sorted(p.name for p in conf.glob("*.yaml"))
    assert found == ["recipe_lincs.yaml", "tiny_run.yaml", "tiny_screen.yaml"], found
    from raycp.profiles.recipe import load_recipe

    assert [s.op for s in load_recipe(str(conf / "recipe_lincs.yaml")).steps] == [
        "variant_features", "normalize", "rank_int", "feature_select"]
    screen = load_screen_config("mini", str(conf / "tiny_screen.yaml"))
    assert (screen.layout.plates, screen.treatments.n, screen.image.size) == (2, 6, 160)
    run = load(str(conf / "tiny_run.yaml"), ["data.index=s3://b/index/sites.parquet", "data.output=s3://b/run"])
    assert run.crops.size == 32 and [f.kind for f in run.features] == ["trained", "random", "cellprofiler"]
    assert run.train.optim.epochs == 1 and run.profiles.lambdas == [1.0, 0.01]
