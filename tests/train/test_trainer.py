"""Ray Train end to end on crops of real cells: 2 workers, metrics, checkpoints on S3, exact resume
after a killed worker or a crashed run, export, and the errors a user can meet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from crops_helper import train_cfg
from safetensors.torch import load as load_safetensors

from raycp.errors import ConfigError, InputError
from raycp.io import urls
from raycp.models.export import load_model
from raycp.models.network import FeatureModel
from raycp.train import trainer


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_safetensors(urls.read_bytes(urls.join(model_dir, "model.safetensors")))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(crops64, ray_cluster, s3_server):
    """The uninterrupted run: 2 workers × 2 epochs (3 steps of 8 crops each), outputs on S3."""
    cfg = train_cfg(crops64, f"s3://{s3_server['bucket']}/train-reference")
    return cfg, trainer.fit(cfg)


def test_two_workers_two_epochs_report_metrics(reference, s3_server):
    cfg, res = reference
    assert [e["epoch"] for e in res.history] == [0, 1]
    for e in res.history:
        assert e["samples"] == 2 * 3 * 8 and e["lr"] == pytest.approx(0.01)  # 2 ranks × 3 steps × 8; lr × 2 workers
        for part, n in (("train", 48), ("val", 64)):
            m = e[part]
            assert m["n"] == n and np.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
            assert len(m["precision"]) == len(m["recall"]) == len(m["f1"]) == len(res.classes) == 6
    assert sum(res.history[0]["train"]["support"]) == 48
    fs = s3_server["fs"]
    run = f"{s3_server['bucket']}/train-reference/train"
    listed = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints")}
    assert {"epoch_0000", "epoch_0001"} <= listed
    ckpt = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints/epoch_0001")}
    assert {"state.pt", "rng_rank0.pt", "rng_rank1.pt"} <= ckpt
    for name in ("metrics.parquet", "per_class.csv", "learning_curve.png", "config.yaml", "split.parquet",
                 "model/model.safetensors", "model/model.json"):
        assert fs.exists(f"{run}/{name}"), name
    state = torch.load(fs.open(f"{run}/checkpoints/epoch_0001/state.pt", "rb"), weights_only=True)
    assert state["epoch"] == 1 and state["sampler"]["next_epoch"] == 2 and state["sampler"]["world"] == 2
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 2


def test_exported_model_loads_for_extraction(reference):
    _, res = reference
    model, info = load_model(res.model_dir)
    assert info["classes"] == res.classes and info["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert info["normalization"]["name"] == "per_crop_channel_zscore" and info["crop_size"] == 64
    with torch.inference_mode():
        feats = FeatureModel(model)(torch.zeros(2, 5, 128, 128))
    assert feats.shape == (2, 672)


def test_two_runs_with_the_same_seed_write_identical_model_bytes(reference, crops64, tmp_path):
    """Issue 16: training is a function of its config and seed (same machine): a second run from
    scratch writes the reference's model file byte for byte, with the same metrics every epoch."""
    _, ref = reference
    res = trainer.fit(train_cfg(crops64, tmp_path / "again"))
    model = "model.safetensors"
    assert urls.read_bytes(urls.join(res.model_dir, model)) == urls.read_bytes(urls.join(ref.model_dir, model))
    assert [(e["train"], e["val"]) for e in res.history] == [(e["train"], e["val"]) for e in ref.history]


def test_killed_worker_resumes_bitwise(reference, crops64, tmp_path):
    """A worker process dies at the start of epoch 2, after epoch 1's checkpoint; FailureConfig
    restarts the group, which resumes at epoch 2 and ends with exactly the uninterrupted run's
    weights (CPU, same seed)."""
    _, ref = reference
    marker = tmp_path / "killed"
    cfg = train_cfg(crops64, tmp_path / "run", compute={"max_failures": 1})
    res = trainer.fit(cfg, inject_failure={"at_epoch": 1, "rank": 1, "mode": "exit", "marker": str(marker)})
    assert marker.exists()
    assert [e["epoch"] for e in res.history] == [0, 1]
    assert [e["resumed"] for e in res.history] == [False, True]  # epoch 2 ran on restored state
    _assert_bitwise(_weights(res.model_dir), _weights(ref.model_dir))
    for mine, theirs in zip(res.history, ref.history):
        assert mine["train"] == theirs["train"] and mine["val"] == theirs["val"]

    # a corrupt latest checkpoint stops the next resume with one line naming the way out
    state = tmp_path / "run" / "train" / "checkpoints" / "epoch_0001" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"epoch_0001 is corrupt .*fix: continue from the previous checkpoint as a "
                                         r"new run: --set name=checkpoints-2 --set resume_from=.*epoch_0000\)"):
        trainer.fit(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints and resume is off"):
        trainer.fit(cfg.model_copy(update={"resume": False}))
    with pytest.raises(ConfigError, match="epoch_0000 was written by a run with another recipe"):
        trainer._resume_state(cfg.model_copy(update={"seed": 1, "resume_from": str(state.parent.parent / "epoch_0000")}),
                              None)


@pytest.mark.slow
def test_rerun_after_a_crash_resumes_at_the_next_epoch(reference, crops64, tmp_path):
    """The run crashes in epoch 2 (no retries); running it again resumes at epoch 2, not at
    epoch 1 again (ray#46814), and ends bitwise equal to the uninterrupted run."""
    _, ref = reference
    cfg = train_cfg(crops64, tmp_path / "run")
    with pytest.raises(Exception, match="injected failure"):
        trainer.fit(cfg, inject_failure={"at_epoch": 1, "rank": 0, "mode": "raise", "marker": str(tmp_path / "m")})
    # the same crash, continued under a new run name from the checkpoint before it (resume_from)
    first = tmp_path / "run" / "train" / "checkpoints" / "epoch_0000"
    other = cfg.model_copy(update={"name": "continued", "resume_from": str(first)})
    res = trainer.fit(other)
    assert [e["resumed"] for e in res.history] == [False, True]
    _assert_bitwise(_weights(res.model_dir), _weights(ref.model_dir))
    # and the crashed run itself, run again
    res = trainer.fit(cfg)
    assert [e["epoch"] for e in res.history] == [0, 1]
    assert [e["resumed"] for e in res.history] == [False, True]
    _assert_bitwise(_weights(res.model_dir), _weights(ref.model_dir))
