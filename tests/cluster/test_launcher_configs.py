"""The cluster launcher configs (``cluster/aws.yaml``, ``cluster/gcp.yaml``) pass Ray's own
validation and are secure by default (issue 14), offline.

Ray's validation is its private ``ray.autoscaler._private.util.prepare_config`` (defaults merged
as ``ray up`` merges them) + ``validate_config`` (``ray-schema.json``): a private API, pinned here
to the locked Ray version, so a Ray upgrade re-checks this test on purpose."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
LOCKED_RAY = "2.60.0"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _validate(config: dict) -> dict:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert ray.__version__ == LOCKED_RAY, "private autoscaler API: re-check this test for the new Ray"
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_there_is_a_config_per_cloud():
    assert {p.name for p in CONFIGS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_validates_the_config_and_a_typo_fails(path):
    import jsonschema

    config = _load(path)
    prepared = _validate(config)
    # Ray's defaults would add nothing to these: the node commands are the file's own
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in config and prepared[key] == config[key], key
    typo = copy.deepcopy(config)
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        _validate(typo)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_node_types_head_does_no_work_and_gpus_autoscale_from_zero(path):
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    for name, node in types.items():
        assert "CPU" in node["resources"] and "GPU" in node["resources"], f"{name}: write resources explicitly"
    gpu = [n for n in types.values() if n["resources"]["GPU"] > 0]
    cpu = [n for name, n in types.items() if n["resources"]["GPU"] == 0 and name != config["head_node_type"]]
    assert gpu and cpu and all(n["min_workers"] == 0 for n in gpu + cpu)
    assert sum(n["max_workers"] for n in gpu + cpu) <= config["max_workers"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_secure_by_default(path):
    """Token auth on every node with the token from the cloud's secret store, nothing listening
    publicly, no credentials in the file, no nightly wheel installed at boot."""
    config = _load(path)
    text = path.read_text()
    starts = {"head": " ".join(config["head_start_ray_commands"]),
              "worker": " ".join(config["worker_start_ray_commands"])}
    for role, cmd in starts.items():
        assert "RAY_AUTH_MODE=token" in cmd, role
        token = re.search(r'RAY_AUTH_TOKEN="?\$\(([^)]*)\)', cmd)
        assert token and re.search(r"secretsmanager|gcloud secrets", token.group(1)), f"{role}: token from a secret store"
    assert "--dashboard-host=127.0.0.1" in starts["head"]
    assert "0.0.0.0" not in text
    assert config["provider"].get("use_internal_ips") is True
    assert not re.search(r"(?i)(aws_secret_access_key|aws_access_key_id|private_key|password)\s*[:=]", text)
    assert not re.search(r"ray-wheels|nightly|pip install", " ".join(
        c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands")
        for c in config.get(key) or []))


def test_the_node_image_pins_the_locked_ray_and_installs_the_lock():
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{LOCKED_RAY}-" in docker
    assert "pip install --no-cache-dir -r requirements/lock.txt" in docker
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    assert f"\nray=={LOCKED_RAY}\n" in lock
