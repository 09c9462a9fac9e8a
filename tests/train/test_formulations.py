"""The paper's other training formulations (Methods; Supplementary Figs. 1 and 5): online label
smoothing, multiple instance learning with attention, gradient reversal. The mechanisms against
hand computations, then each trained by Ray Train on crops of real cells with an exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from crops_helper import train_cfg
from safetensors.torch import load as load_safetensors

from raycp.io import urls
from raycp.train import formulations as FM
from raycp.train import trainer


def test_ols_update_rule_matches_a_hand_computation():
    """L0 = (1 − 0.1)·onehot + 0.1/K; after an epoch L1 = (1 − α)·L0 + α·P with α = 0.03 (paper)."""
    labels = FM.ols_init(np.array([0, 2]), 3, 0.1)
    third = 0.1 / 3
    np.testing.assert_allclose(labels.numpy(), [[0.9 + third, third, third], [third, third, 0.9 + third]], rtol=1e-6)
    preds = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    new = FM.ols_update(labels, preds, 0.03)
    by_hand = [[0.97 * (0.9 + third) + 0.03 * 0.5, 0.97 * third + 0.03 * 0.3, 0.97 * third + 0.03 * 0.2],
               [0.97 * third + 0.03 * 0.1, 0.97 * third + 0.03 * 0.1, 0.97 * (0.9 + third) + 0.03 * 0.8]]
    np.testing.assert_allclose(new.numpy(), by_hand, rtol=1e-6)
    np.testing.assert_allclose(new.sum(dim=1).numpy(), [1.0, 1.0], rtol=1e-6)  # still distributions
    # per class: the class's mean prediction; a class without cells keeps its label
    per_class = FM.ols_init(np.arange(3), 3, 0.1)
    sums, counts = FM.class_mean_predictions(torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]),
                                             torch.tensor([0, 0, 1]), 3)
    moved = FM.ols_class_update(per_class, sums, counts, 0.03)
    np.testing.assert_allclose(moved[0].numpy(), 0.97 * per_class[0].numpy() + 0.03 * np.array([0.4, 0.6, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(moved[1].numpy(), 0.97 * per_class[1].numpy() + 0.03 * np.array([0.0, 0.0, 1.0]), rtol=1e-6)
    assert torch.equal(moved[2], per_class[2])


def test_soft_cross_entropy_is_keras_categorical_crossentropy():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(FM.soft_cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, y))
    smoothed = FM.ols_init(y.numpy(), 4, 0.1)  # the OLS start = label smoothing 0.1
    torch.testing.assert_close(FM.soft_cross_entropy(logits, smoothed),
                               torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1))


@pytest.mark.parametrize("gated", [False, True])
def test_attention_weights_sum_to_one_per_bag(gated):
    torch.manual_seed(0)
    pool = FM.AttentionPool(16, attention_dim=8, gated=gated)
    h = torch.randn(3, 5, 16)
    bags, weights = pool(h)
    assert bags.shape == (3, 16) and weights.shape == (3, 5)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert (weights > 0).all() and weights.std() > 0  # weighs cells differently
    torch.testing.assert_close(bags, (weights.unsqueeze(-1) * h).sum(dim=1))
    perm = torch.randperm(5)  # a bag is a set: the order of its cells does not matter
    torch.testing.assert_close(pool(h[:, perm])[0], bags, rtol=1e-5, atol=1e-6)
    one, w1 = pool(h[:, :1])  # a bag of one cell is that cell
    torch.testing.assert_close(one, h[:, 0]) and torch.testing.assert_close(w1, torch.ones(3, 1))


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_gradient_reversal_flips_the_gradient_sign_with_its_lambda(weight):
    x = torch.randn(4, 3, requires_grad=True)
    y = FM.grad_reverse(x, weight)
    assert torch.equal(y, x)  # identity forward
    g = torch.randn(4, 3)
    y.backward(g)
    torch.testing.assert_close(x.grad, -weight * g)
    assert FM.ganin_lambda(0.0) == 0.0 and FM.ganin_lambda(1.0) == pytest.approx(0.99991, abs=1e-5)


def test_domain_branch_is_the_papers_dense_1024_512_128():
    head = FM.DomainHead(1280, 5)
    sizes = [(m.in_features, m.out_features) for m in head.layers if isinstance(m, torch.nn.Linear)]
    assert sizes == [(1280, 1024), (1024, 512), (512, 128), (128, 5)]
    feats = torch.randn(2, 1280, requires_grad=True)
    out = head(feats, 0.5)
    out.sum().backward()
    reference = torch.autograd.grad(head.layers(feats).sum(), feats)[0]
    torch.testing.assert_close(feats.grad, -0.5 * reference)  # reversed and scaled into the features


def test_bags_hold_cells_of_one_well_and_every_class_gets_the_same_number():
    rng = np.random.default_rng(0)
    n = 300
    groups = rng.integers(0, 12, n)  # 12 wells
    codes = groups % 3  # a well's cells share its treatment (3 classes)
    sids = np.arange(1000, 1000 + n)
    plans = [FM.plan_bags(sids, codes, groups, 3, seed=0, epoch=1, rank=r, world=2, bags_per_step=2, bag_size=4)
             for r in range(2)]
    for plan in plans:
        bags = (plan.sids - 1000).reshape(-1, 4)
        assert plan.batch == 8 and len(bags) == plan.steps * 2
        assert all(len(set(groups[b])) == 1 for b in bags)  # one well per bag
        assert (plan.labels.reshape(-1, 4) == codes[bags]).all()
    assert plans[0].digest == plans[1].digest
    everything = np.concatenate([p.labels.reshape(-1, 4)[:, 0] for p in plans])
    whole = FM.plan_bags(sids, codes, groups, 3, seed=0, epoch=1, rank=0, world=1, bags_per_step=1, bag_size=4)
    per_class = np.bincount(whole.labels.reshape(-1, 4)[:, 0], minlength=3)
    assert per_class.min() == per_class.max() == np.median(np.bincount(codes)) // 4
    assert len(everything) <= len(whole.labels) // 4
    again = FM.plan_bags(sids, codes, groups, 3, seed=0, epoch=1, rank=0, world=2, bags_per_step=2, bag_size=4)
    assert np.array_equal(again.sids, plans[0].sids)  # a pure function of (seed, epoch)
    other = FM.plan_bags(sids, codes, groups, 3, seed=0, epoch=2, rank=0, world=2, bags_per_step=2, bag_size=4)
    assert not np.array_equal(other.sids, plans[0].sids)  # resampled every epoch


# ------------------------------------------------------------------------ on Ray Train


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_safetensors(urls.read_bytes(urls.join(model_dir, "model.safetensors")))


FORMULATIONS = {
    "ols": {"formulation": "ols"},
    "mil": {"formulation": "mil", "mil": {"bag_size": 4, "bags_per_step": 2}},
    "grl": {"formulation": "grl", "grl": {"schedule": "ganin"}},
}


@pytest.fixture(scope="module")
def references(crops64, ray_cluster, tmp_path_factory):
    """The uninterrupted run of each formulation: 2 workers × 2 epochs (3 steps of 8 cells)."""
    out = {}

    def get(name):
        if name not in out:
            folder = tmp_path_factory.mktemp(name)
            out[name] = (folder, trainer.fit(train_cfg(crops64, folder / "ref", **FORMULATIONS[name])))
        return out[name]
    return get


@pytest.mark.parametrize("name", list(FORMULATIONS))
def test_each_formulation_trains_on_ray(name, references, crops64):
    folder, ref = references(name)
    assert [e["epoch"] for e in ref.history] == [0, 1]
    for e in ref.history:
        assert np.isfinite(e["train"]["loss"]) and e["val"]["n"] == 64
    assert load_model_info(ref.model_dir)["formulation"] == name
    state = torch.load(folder / "ref" / "train" / "checkpoints" / "epoch_0001" / "state.pt", weights_only=True)
    if name == "ols":
        labels = state["ols"]
        assert labels.shape == (len(trainer.prepare(train_cfg(crops64, folder)).train_sids), 6)
        torch.testing.assert_close(labels.sum(dim=1), torch.ones(len(labels)))
        assert labels.max() < 0.9 + 0.1 / 6  # moved off the smoothed one-hots twice
    if name == "mil":
        assert ref.history[0]["train"]["n"] == 2 * 3 * 2  # bags: 2 ranks × 3 steps × 2 bags
        assert any(k.startswith("attention.") for k in state["heads"])
    if name == "grl":
        assert ref.history[0]["domain"]["n"] == 2 * 3 * 8 and len(ref.history[0]["domain"]["f1"]) == 2
        assert any(k.startswith("domain.layers.") for k in state["heads"])


# OLS carries the most state (soft labels updated outside SGD): its resume runs in every tier
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "ols" else [pytest.mark.slow]) for n in FORMULATIONS])
def test_each_formulation_resumes_bitwise(name, references, crops64, tmp_path):
    """A worker killed at the start of epoch 2 resumes from epoch 1's checkpoint (heads, soft labels,
    optimiser) to exactly the uninterrupted run's weights and metrics."""
    _, ref = references(name)
    marker = tmp_path / "killed"
    cfg = train_cfg(crops64, tmp_path / "run", compute={"max_failures": 1}, **FORMULATIONS[name])
    res = trainer.fit(cfg, inject_failure={"at_epoch": 1, "rank": 1, "mode": "exit", "marker": str(marker)})
    assert marker.exists() and [e["resumed"] for e in res.history] == [False, True]
    a, b = _weights(res.model_dir), _weights(ref.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(e["train"], e["val"]) for e in res.history] == [(e["train"], e["val"]) for e in ref.history]


def load_model_info(folder: str) -> dict:
    from raycp.models.export import load_model

    return load_model(folder)[1]


def test_the_end_of_epoch_pass_moves_per_cell_and_per_class_labels_alike(crops64, tmp_path):
    """OLS' end-of-epoch pass (no Ray): per cell, L1 = (1 − α)·L0 + α·P with P the network's
    inference-mode probabilities; per class, each class's label moves by its cells' mean of the
    same P."""
    from raycp.train import data as D
    from raycp.train.loop import Recipe, WorkerSpec, _ols_epoch_update

    cfg = train_cfg(crops64, tmp_path, formulation="ols")
    prep = trainer.prepare(cfg)
    n = len(prep.classes)
    source = D.CropSource(prep.crops.files, prep.crops.crop_column, prep.crops.shape, prep.crops.locations(),
                          reader="local")
    spec = WorkerSpec(cfg={}, classes=prep.classes, source=source, train_sids=prep.train_sids,
                      train_codes=prep.codes[prep.train_sids], val_sids=prep.val_sids, val_codes=prep.codes[prep.val_sids],
                      fingerprint="")
    recipe = Recipe(cfg, n)
    model = recipe.model().eval()

    class Loader:
        def load(self, sids):
            return source.load(sids)

    l0 = FM.ols_init(spec.train_codes, n, 0.1)
    l1 = _ols_epoch_update(recipe, model, spec, l0, Loader(), rank=0, world=1)
    alpha = cfg.ols.alpha
    probs = (l1 - (1 - alpha) * l0) / alpha
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(probs)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(l1, l0)

    per_class = cfg.model_copy(update={"ols": cfg.ols.model_copy(update={"labels": "class"})})
    c0 = FM.ols_init(np.arange(n), n, 0.1)
    c1 = _ols_epoch_update(Recipe(per_class, n), model, spec, c0, Loader(), rank=0, world=1)
    codes = torch.from_numpy(spec.train_codes.astype(np.int64))
    for c in range(n):
        mean = probs[codes == c].mean(dim=0)
        torch.testing.assert_close(c1[c], (1 - alpha) * c0[c] + alpha * mean, rtol=1e-4, atol=1e-5)


def test_domains_are_the_training_cells_plates(crops64, tmp_path):
    """GRL's domains are the plates the training cells come from: a held-out plate is no domain, and
    one plate left is a one-line error (nothing to reverse)."""
    from raycp.errors import InputError

    prep = trainer.prepare(train_cfg(crops64, tmp_path, formulation="grl"))
    assert prep.n_domains == 2 and set(prep.domains[prep.train_sids]) == {0, 1}
    with pytest.raises(InputError, match="at least 2 domains"):
        trainer.prepare(train_cfg(crops64, tmp_path, formulation="grl", split={"strategy": "leave_plates_out"}))
    with pytest.raises(InputError, match="grl.domain column 'Metadata_Batch'"):
        trainer.prepare(train_cfg(crops64, tmp_path, formulation="grl", grl={"domain": "Metadata_Batch"}))
