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
