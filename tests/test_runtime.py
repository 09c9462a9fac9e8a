"""Ray runtime: one local cluster, sized so actor pools never starve the tasks that feed them."""

from __future__ import annotations

from raycp import runtime


def test_init_is_idempotent_and_local_defaults_apply(ray_cluster):
    import os

    assert runtime.init() is ray_cluster
    assert runtime.cluster_cpus() == 2.0
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_actor_pool_leaves_a_cpu_for_read_tasks(ray_cluster):
    # 2 CPUs: a pool of 1-CPU actors gets at most 1 actor, so read tasks always have a CPU.
    assert runtime.actor_pool_size(cpus_per_actor=1.0) == (1, 1)
    assert runtime.actor_pool_size(cpus_per_actor=0.5) == (1, 2)
    assert runtime.actor_pool_size(cpus_per_actor=0.25, max_size=3) == (1, 3)


def test_train_storage_is_where_raycp_itself_reads_and_writes(s3_server, monkeypatch, tmp_path):
    """Ray Train/Tune storage resolves a URL as raycp's own files do: a local path (``~`` expanded)
    as the same absolute path, an ``s3://`` URL through the same fsspec filesystem (one S3
    configuration: the endpoint raycp uses), so the checkpoints Ray writes are the ones raycp lists."""
    import pyarrow.fs as pafs

    from raycp.io import urls

    monkeypatch.setenv("HOME", str(tmp_path))
    path, fs = runtime.train_storage("~/runs/x/train")
    assert fs is None and path == urls.filesystem("~/runs/x/train")[1] == str(tmp_path / "runs" / "x" / "train")
    url = f"s3://{s3_server['bucket']}/runs/x/train"
    path, fs = runtime.train_storage(url)
    assert isinstance(fs, pafs.PyFileSystem) and path == f"{s3_server['bucket']}/runs/x/train"
    with fs.open_output_stream(f"{path}/probe.txt") as out:  # written by pyarrow, read by raycp
        out.write(b"checkpoint")
    assert urls.read_bytes(f"{url}/probe.txt") == b"checkpoint"


def test_a_local_cluster_never_grows_and_its_bounds_are_what_it_has(ray_cluster):
    """On the local cluster raycp started, asking for GPUs it lacks stays an error (no autoscaler
    will add them) and the most it can have is what it has; the bounds an autoscaler reports come
    through Ray's private ``get_max_resources_from_cluster_config`` (what Ray Train and Ray Data
    ask), pinned here to the locked Ray."""
    import ray
    from ray._private.state import state

    assert ray.__version__ == "2.60.0", "private Ray API: re-check max_cluster_resources for the new Ray"
    assert callable(state.get_max_resources_from_cluster_config)
    assert runtime.started_here() and not runtime.cluster_may_grow()
    most = runtime.max_cluster_resources()
    assert most["CPU"] == ray.cluster_resources()["CPU"] and most.get("GPU", 0.0) == runtime.cluster_gpus()


def test_custom_resources_are_validated():
    import pytest
    from pydantic import ValidationError

    from raycp.extract.config import InferenceConfig
    from raycp.train.config import TrainCompute

    assert InferenceConfig(resources={"accelerator_type:L4": 0.001}).resources == {"accelerator_type:L4": 0.001}
    assert TrainCompute(resources={"gpu_node": 1}).resources == {"gpu_node": 1.0}
    for bad, why in (({"GPU": 1}, "its own setting"), ({"node_a": 0}, "positive")):
        for model in (InferenceConfig, TrainCompute):
            with pytest.raises(ValidationError, match=why):
                model(resources=bad)


def test_on_a_joined_cluster_the_declared_size_is_what_raycp_plans_for(ray_cluster, monkeypatch):
    """An autoscaling cluster starts small: ``compute.num_cpus`` / ``num_gpus`` given to the entry
    point of a job that joined it are the size raycp sizes pools, picks CUDA and checks Train for."""
    import ray

    from raycp.config import ComputeConfig

    have = ray.cluster_resources()["CPU"]
    monkeypatch.setitem(runtime._CHOSEN, "compute", ComputeConfig(num_cpus=64, num_gpus=8))
    monkeypatch.setattr(runtime, "started_here", lambda: False)
    assert runtime.cluster_cpus() == 64 and runtime.cluster_gpus() == 8 and runtime.cluster_may_grow()
    monkeypatch.setitem(runtime._CHOSEN, "compute", ComputeConfig(num_cpus=1))
    assert runtime.cluster_cpus() == have and runtime.cluster_gpus() == 0   # never less than it has
