"""Autoscaling (issue 14), offline: Ray's fake multi-node provider (its nodes are local processes)
with the node types of ``cluster/aws.yaml`` — a head that runs no work, a CPU type and a 1-GPU type,
both from 0 nodes — and Ray's autoscaler v2 (KubeRay's, ``cluster/kuberay``). A job whose model
actors ask for an L4 GPU node (``inference.resources``: the ``accelerator_type:L4`` resource Ray
advertises on such a node; the fake GPU node advertises it on a CPU process) makes the autoscaler
add the GPU node type, and a CPU node for the decode tasks; when the job is done the idle nodes go.

The job is submitted as ``cluster/kuberay/rayjob.yaml`` submits it: its runtime env, no uploaded
working_dir (the code is the installed package, as in the node image). The fake nodes share one
``runtime_resources`` folder, so an uploaded working_dir would be deleted and unpacked again under
the running workers of the other nodes each time a node starts; real nodes have their own disks.

The provider is Ray's ``FakeMultiNodeProvider`` loaded as an ``external`` provider: Ray's wheel
leaves out the defaults file (``fake_multi_node/example.yaml``) that ``type: fake_multinode``
needs. The head and its nodes run under the test's own temp dir and are stopped by PID."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import pandas as pd
import pytest
import yaml

from tests.jobs.conftest import BIN, ROOT, LocalCluster, free_port, node_ports, processes_under, stop

FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # FakeMultiNodeProvider's head
CPUS = {"cpu": 2, "gpu": 1}       # a 2-core machine: the cloud types' CPUs scaled down
IDLE_MINUTES = 0.1                # the cloud configs keep an idle node 10 minutes


def fake_config(cloud_yaml, gcs: str) -> dict:
    """An autoscaler config for the fake provider with the cloud config's node types."""
    cloud = yaml.safe_load(cloud_yaml.read_text())
    types = {}
    for name, node in cloud["available_node_types"].items():
        if name == cloud["head_node_type"]:
            types["ray.head.default"] = {"resources": dict(node["resources"]), "node_config": {}, "max_workers": 0}
            continue
        resources = {**node["resources"], "CPU": CPUS[name]}
        if resources.get("GPU"):
            resources["accelerator_type:L4"] = 1       # what Ray advertises on the g6 (L4) nodes
        types[name] = {"resources": resources, "node_config": {}, "min_workers": node["min_workers"], "max_workers": 1}
    return {"cluster_name": "raycp-fake", "max_workers": 2, "upscaling_speed": cloud["upscaling_speed"],
            "idle_timeout_minutes": IDLE_MINUTES, "docker": {}, "auth": {"ssh_user": "ubuntu"},
            "provider": {"type": "external", "gcs_address": gcs, "launch_multiple": True, "head_node_id": FAKE_HEAD_ID,
                         "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"},
            "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], **{k: [] for k in (
                "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")}}


@pytest.fixture
def autoscaling_cluster(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    home = tmp_path / "home"
    home.mkdir()
    port, dash = free_port(), free_port()
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(fake_config(ROOT / "cluster" / "aws.yaml", f"127.0.0.1:{port}")))
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID}
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        f"--temp-dir={ray_tmp}", "--num-cpus=0", "--num-gpus=0", f"--autoscaling-config={config}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                        "--object-store-memory=300000000", f"--ray-client-server-port={free_port()}", *node_ports()],
                       env=head_env, check=True, capture_output=True, timeout=180)
        yield LocalCluster(ray_tmp, env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    finally:
        stop(set(processes_under(ray_tmp, port)))


def _workers(cluster) -> list[dict]:
    from ray.util.state import list_nodes

    return [n.resources_total for n in list_nodes(address=cluster.address, limit=100, raise_on_missing_output=False)
            if n.state == "ALIVE" and not n.is_head_node]


@pytest.mark.timeout(900)
def test_a_gpu_stage_makes_the_autoscaler_add_a_gpu_node_and_idle_nodes_go(tiny_screen, autoscaling_cluster, tmp_path):
    from ray.job_submission import JobStatus

    cluster = autoscaling_cluster
    assert _workers(cluster) == [], "the cluster starts with its head only"
    out = tmp_path / "features"
    env = tmp_path / "runtime_env.yaml"
    env.write_text(yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())["spec"]["runtimeEnvYAML"])
    cluster.submit("python", str(ROOT / "jobs" / "extract.py"), "--index", str(tiny_screen / "index" / "sites.parquet"), "-o", str(out),
                   "--set", "input=images", "--set", "illumination.enabled=false", "--set", "model.kind=random",
                   "--set", "model.arch=efficientnet_lite0", "--set", "crops.size=32", "--set", "inference.device=cpu",
                   "--set", "inference.resources={accelerator_type:L4: 1}", submission_id="gpu-stage",
                   runtime_env=str(env), cwd=tmp_path)
    seen: list[dict] = []

    def watch() -> bool:
        seen.extend(_workers(cluster))
        return False

    status = cluster.wait("gpu-stage", until=watch)
    assert status == JobStatus.SUCCEEDED, cluster.logs("gpu-stage")
    gpu_nodes = [r for r in seen if r.get("GPU")]
    assert gpu_nodes and all(r.get("accelerator_type:L4") == 1 for r in gpu_nodes), seen[-3:]
    assert any(not r.get("GPU") and r.get("CPU") == CPUS["cpu"] for r in seen), "a CPU node for the decode tasks"
    ledger = pd.read_parquet(out / "features" / "random" / "ledger.parquet")
    assert len(ledger) == 18 and (ledger.status == "processed").all()

    deadline = time.time() + 180       # idle for IDLE_MINUTES, then terminated by the autoscaler
    while time.time() < deadline and _workers(cluster):
        time.sleep(1)
    assert _workers(cluster) == [], "idle worker nodes are removed after the run"
