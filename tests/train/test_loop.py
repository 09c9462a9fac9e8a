"""The recipe without Ray: SGD settings, schedules, one training step at the paper's 128 px, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycp.errors import InputError
from raycp.train import augment as A
from raycp.train import data as D
from raycp.train import sampling as S
from raycp.train.config import TrainConfig
from raycp.train.loop import STATE_FILE, Recipe, load_state, lr_factor, param_groups


def test_defaults_are_the_papers_recipe(tmp_path):
    cfg = TrainConfig(crops="c", output="o")
    assert cfg.model.arch == "efficientnet_b0" and cfg.model.stem == "replicate" and len(cfg.channels) == 5
    o = cfg.optim
    assert (o.lr, o.momentum, o.nesterov, o.l2, o.batch_size, o.epochs, o.schedule) == (
        0.005, 0.9, True, 1e-5, 32, 30, "constant")
    a = cfg.augment
    assert (a.crop_prob, a.crop_min, a.flip, a.rot90, a.brightness, a.contrast) == (0.5, 0.8, True, True, 0.1, (0.8, 1.2))
    assert cfg.split.strategy == "leave_cells_out" and cfg.split.train_fraction == 0.6
    assert cfg.model.head_init == "keras" and cfg.compute.deterministic  # the paper's Keras Dense (issue 16)
    # runs from before head_init existed used timm's: under head_init=timm their checkpoints still match
    assert "head_init" in cfg.science()["model"]
    assert "head_init" not in TrainConfig(crops="c", output="o", model={"head_init": "timm"}).science()["model"]
    with pytest.raises(Exception, match="extra"):
        TrainConfig(crops="c", output="o", optim={"learning_rate": 1})


def test_sgd_and_schedules():
    cfg = TrainConfig(crops="c", output="o", model={"arch": "efficientnet_lite0"})
    recipe = Recipe(cfg, 4, world=4)
    model = recipe.model()
    opt = recipe.optimizer(model)
    g = opt.param_groups
    assert g[0]["lr"] == pytest.approx(0.02) and g[0]["momentum"] == 0.9 and g[0]["nesterov"]  # linear scaling ×4
    assert g[0]["weight_decay"] == pytest.approx(2e-5) and g[1]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in g[0]["params"]) and all(p.ndim == 1 for p in g[1]["params"])  # kernels only
    assert len(param_groups(model, 1e-5)[0]["params"]) + len(g[1]["params"]) == len(list(model.parameters()))
    assert [lr_factor(e, schedule="constant", warmup=5, epochs=30) for e in (0, 29)] == [1.0, 1.0]
    cos = [lr_factor(e, schedule="cosine", warmup=5, epochs=30) for e in range(30)]
    assert cos[:5] == pytest.approx([1 / 5, 1 / 4, 1 / 3, 1 / 2, 1])  # DeepProfiler's warm-up
    assert cos[5] == pytest.approx(0.5 * (1 + np.cos(np.pi * 5 / 30))) and cos[-1] < 0.01
    assert Recipe(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr_scaling": "none"})}), 4,
                  world=4).base_lr() == 0.005


def test_one_step_at_paper_size(crops128):
    """128×128 crops from the shards through normalisation, augmentation and one SGD step of B0."""
    cs = D.read_crop_metadata(str(crops128), label="Metadata_Treatment")
    assert cs.shape == (5, 128, 128)
    codes, classes = S.encode_labels(cs.meta, "Metadata_Treatment", None)
    cfg = TrainConfig(crops=str(crops128), output="o")
    recipe = Recipe(cfg, len(classes))
    assert not recipe.amp and not recipe.channels_last  # bf16 / channels_last only on GPU
    model = recipe.model()
    opt = recipe.optimizer(model)
    plan = S.plan_epoch(np.arange(len(codes)), codes, len(classes), seed=0, epoch=0, rank=0, world=1, batch=2)
    uniq, crops = D.CropSource(cs.files, cs.crop_column, cs.shape, cs.locations(), reader="local").load(plan.sids[:2])
    x, y = recipe.to_device(crops[np.searchsorted(uniq, plan.sids[:2])], plan.labels[:2].astype(np.int64))
    before = model.classifier.weight.detach().clone()
    loss, pred = recipe.train_step(model, opt, x, y, A.augment_generator(0, 0, 0, 0))
    assert torch.isfinite(loss) and pred.shape == (2,)
    assert not torch.equal(before, model.classifier.weight)
    model.eval()
    loss_sum, pred = recipe.eval_batch(model, x, y)
    assert torch.isfinite(loss_sum) and pred.shape == (2,)


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="has no state.pt"):
        load_state(tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="is corrupt.*fix: delete this checkpoint folder"):
        load_state(tmp_path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / STATE_FILE)
    with pytest.raises(InputError, match="not a raycp training checkpoint"):
        load_state(tmp_path)


def test_a_cpu_worker_uses_the_threads_it_reserved():
    """Determinism and speed (issue 16): a CPU worker runs round(cpus_per_worker) threads, whatever
    OMP_NUM_THREADS Ray gave it for a fractional CPU."""
    from raycp.train.config import TrainCompute
    from raycp.train.loop import configure_torch

    before = torch.get_num_threads()
    try:
        for cpus, threads in ((1.5, 2), (0.5, 1), (3.0, 3)):
            configure_torch(TrainCompute(cpus_per_worker=cpus), torch.device("cpu"))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
