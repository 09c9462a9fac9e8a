"""Losing a worker node mid-job (issue 14): the paper as a Ray job on a multi-node cluster, a worker
node's raylet killed with ``kill -9`` (a reclaimed spot instance) once during training and once during
feature extraction.

- Training: Ray Train's ``FailureConfig`` restarts the worker group on the surviving node from the
  last checkpoint, and the exported CNN is bitwise the CNN of an uninterrupted run of the same
  config (CPU, same seed, same thread count).
- Extraction: Ray retries the lost node's tasks and restarts its model actors elsewhere; every site
  of every feature set is in the ledger exactly once, processed, and the per-site files, the
  per-cell rows and the site table agree with the ledger (nothing lost, nothing written twice).
- Both jobs SUCCEED.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.run.run_helper import run_overrides

# 4 epochs of 4 steps: room to lose the node after the first checkpoint and before the last
TRAIN = {"train.optim.epochs": "4", "train.compute.max_steps_per_epoch": "4"}


def _sets(screen: Path, out: Path) -> list[str]:
    return sum((["--set", s] for s in run_overrides(screen, out, **TRAIN)), [])


def _run(cluster, screen: Path, out: Path, sub_id: str, *extra: str) -> None:
    cluster.submit("python", "jobs/run.py", "tests/conf/tiny_run.yaml", *_sets(screen, out), *extra,
                   submission_id=sub_id)


def _succeeded(cluster, sub_id: str, until=None):
    from ray.job_submission import JobStatus

    status = cluster.wait(sub_id, until=until)
    return status, (status == JobStatus.SUCCEEDED)


def _train_worker_node(cluster) -> str | None:
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         limit=100, raise_on_missing_output=False)
    return cluster.node_name(actors[0].node_id) if actors else None


def _checkpoints(out: Path) -> list[str]:
    """The checkpoints Ray Train has committed (named in its snapshot; a folder alone may be one
    being written, which a restarted worker group would not resume from)."""
    snapshot = out / "train" / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        return sorted(set(re.findall(r"epoch_\d{4}", snapshot.read_text())))
    except (FileNotFoundError, ValueError):
        return []


@pytest.mark.timeout(1500)
def test_a_lost_worker_node_costs_neither_the_cnn_nor_a_site(tiny_screen, local_cluster, tmp_path):
    cluster = local_cluster
    # the uninterrupted reference: the same config up to training
    ref = tmp_path / "reference"
    _run(cluster, tiny_screen, ref, "reference", "--to", "train")
    assert _succeeded(cluster, "reference")[1], cluster.logs("reference")

    # the same run, its training worker's node killed once the first epoch's checkpoint is written
    out = tmp_path / "run"
    _run(cluster, tiny_screen, out, "train-lost-node", "--to", "train")
    status, done = _succeeded(cluster, "train-lost-node", until=lambda: bool(_checkpoints(out)))
    assert not done, f"training finished before the node could be lost: {status}"
    lost = _train_worker_node(cluster)
    assert lost is not None and _checkpoints(out)[-1] != "epoch_0003", "the job must still be training"
    cluster.kill(lost)
    assert _succeeded(cluster, "train-lost-node")[1], cluster.logs("train-lost-node")
    history = json.loads((out / "train" / "metrics.json").read_text())["history"]
    assert [e["epoch"] for e in history] == [0, 1, 2, 3]
    assert any(e["resumed"] for e in history), "the lost epochs were re-run from a checkpoint"
    mine, theirs = (load_file(str(d / "train" / "model" / "model.safetensors")) for d in (out, ref))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    reference = json.loads((ref / "train" / "metrics.json").read_text())["history"]
    assert [e["val"] for e in history] == [e["val"] for e in reference]

    # a replacement node joins (as the autoscaler would); the rest of the paper, another node lost
    # as soon as extraction has written its first site
    cluster.add_worker("node2")
    victim = next(n for n in ("node0", "node1") if n != lost)
    _run(cluster, tiny_screen, out, "extract-lost-node")
    first_site = lambda: any((out / "features").glob("*/sites/*/*.parquet"))  # noqa: E731
    status, done = _succeeded(cluster, "extract-lost-node", until=first_site)
    assert not done, f"the job finished before the node could be lost: {status}"
    cluster.kill(victim)
    assert _succeeded(cluster, "extract-lost-node")[1], cluster.logs("extract-lost-node")

    sites = pd.read_parquet(tiny_screen / "index" / "sites.parquet")
    expected = {(p, w, int(s)) for p, w, s in zip(sites.Metadata_Plate, sites.Metadata_Well, sites.Metadata_Site)}
    sets = [p.name for p in (out / "features").iterdir() if p.is_dir()]
    assert sorted(sets) == ["cellprofiler", "cnn", "random"]
    for name in sets:
        folder = out / "features" / name
        ledger = pd.read_parquet(folder / "ledger.parquet")
        keys = list(zip(ledger.Metadata_Plate, ledger.Metadata_Well, ledger.Metadata_Site.astype(int)))
        assert len(keys) == len(set(keys)) and set(keys) == expected, f"{name}: a site lost or counted twice"
        assert (ledger.status == "processed").all(), ledger[ledger.status != "processed"]
        files = {(p.parent.name, *p.stem.rsplit("_", 1)) for p in (folder / "sites").glob("*/*.parquet")}
        assert {(pl, w, int(s)) for pl, w, s in files} == expected, name
        cells = sum(len(pd.read_parquet(p)) for p in (folder / "cells").glob("*/*.parquet"))
        assert cells == ledger.n_cells.sum(), f"{name}: {cells} cell rows for {ledger.n_cells.sum()} cells"
        table = pd.read_parquet(folder / "sites.parquet")
        assert len(table) == len(expected) and not table.duplicated(
            ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).any(), name
        assert (folder / "_SUCCESS").exists()
    assert (out / "report.html").exists()
