"""The paper's other weakly supervised formulations (Methods; Supplementary Figs. 1 and 5), as pure
torch/numpy pieces the training loop composes (no Ray):

- **Online label smoothing** (OLS; DeepProfiler ``online_labels_crop_generator``): soft labels
  start as ``(1 − ls)·onehot + ls/K`` (:func:`ols_init`); at the end of every epoch the network
  predicts every training cell (inference mode, no augmentation) and ``L ← (1 − α)·L + α·P``
  (:func:`ols_update`); the loss is the cross-entropy against ``L`` (:func:`soft_cross_entropy`).
  ``labels="class"`` keeps one label per class, moved by the class's mean prediction
  (:func:`ols_class_update`).
- **Multiple instance learning with attention** (Ilse, Tomczak & Welling 2018): a bag's cells
  are embedded by the CNN (pooled 1,280-d), weighted by ``a = softmax_i(wᵀ tanh(V hᵢ))`` (gated:
  ``wᵀ(tanh(V hᵢ) ⊙ σ(U hᵢ))``) and summed; the classifier sees the bag (:class:`AttentionPool`).
  Bags are cells of one well (:func:`plan_bags`).
- **Gradient reversal** (Ganin & Lempitsky 2015): a domain branch (dense 1024 → 512 → 128 →
  softmax over plates) on the pooled features behind :func:`grad_reverse`, the identity forward
  and ``−λ·grad`` backward (:func:`ganin_lambda` for the schedule).

:class:`TrainNet` puts the timm network and these heads behind one ``forward`` (one module for
DDP); the exported model is the timm network alone, so profiles stay per cell at block6a.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raycp.errors import InputError
from raycp.train import sampling as S

STREAM_BAGS = 6  # random stream of the bag draws (sampling.STREAM_* are 1..5)


# --------------------------------------------------------------------------------- OLS


def ols_init(codes: np.ndarray, n_classes: int, smoothing: float) -> torch.Tensor:
    """``len(codes) × K`` float32 soft labels: ``smoothing/K`` everywhere, ``+ (1 − smoothing)`` on
    each cell's class (DeepProfiler ``init_online_labels``). ``codes`` may be one per class
    (``arange(K)``) for per-class labels."""
    labels = torch.full((len(codes), n_classes), smoothing / n_classes, dtype=torch.float32)
    labels[torch.arange(len(codes)), torch.from_numpy(np.asarray(codes, dtype=np.int64))] += 1.0 - smoothing
    return labels


def ols_update(labels: torch.Tensor, predictions: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − α)·labels + α·predictions`` (paper: α = 0.03; DeepProfiler ``update_online_labels``).
    Rows stay distributions when both inputs are."""
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and predictions {tuple(predictions.shape)} differ")
    return (1.0 - alpha) * labels + alpha * predictions.to(labels.dtype)


def class_mean_predictions(predictions: torch.Tensor, codes: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of predictions per class K×K, cells per class K)`` — summable across workers."""
    sums = torch.zeros((n_classes, predictions.shape[1]), dtype=torch.float64, device=predictions.device)
    sums.index_add_(0, codes, predictions.to(torch.float64))
    counts = torch.bincount(codes, minlength=n_classes).to(torch.float64)
    return sums, counts


def ols_class_update(labels: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-class OLS: each class's label moves towards its cells' mean prediction; a class with no
    cell keeps its label."""
    mean = sums / counts.clamp_min(1).unsqueeze(1)
    moved = ols_update(labels, mean.to(labels.dtype), alpha)
    return torch.where((counts > 0).unsqueeze(1).to(labels.device), moved, labels)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``−Σ_k t_k log softmax(z)_k`` (Keras ``CategoricalCrossentropy``)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


# --------------------------------------------------------------------------------- GRL


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = float(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by ``−weight`` (Ganin & Lempitsky 2015)."""
    return _GradientReversal.apply(x, weight)


def ganin_lambda(progress: float, weight: float = 1.0) -> float:
    """``weight·(2/(1 + exp(−10 p)) − 1)`` for training progress ``p`` in [0, 1] (Ganin et al. 2016)."""
    return weight * (2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0)


class DomainHead(nn.Module):
    """Dense ``hidden`` layers with ReLU, then logits over ``n_domains`` (paper: 1024 → 512 → 128)."""

    def __init__(self, in_features: int, n_domains: int, hidden: list[int] | tuple[int, ...] = (1024, 512, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, n_domains))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        return self.layers(grad_reverse(features, weight))


# --------------------------------------------------------------------------------- MIL


class AttentionPool(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018): ``B×n×D`` instances -> ``(B×D bag embeddings,
    B×n weights summing to 1 per bag)``."""

    def __init__(self, in_features: int, attention_dim: int = 128, gated: bool = False) -> None:
        super().__init__()
        self.V = nn.Linear(in_features, attention_dim)
        self.U = nn.Linear(in_features, attention_dim) if gated else None
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        weights = torch.softmax(self.w(a).squeeze(-1).float(), dim=1)
        return (weights.unsqueeze(-1).to(h.dtype) * h).sum(dim=1), weights


def plan_bags(train_sids: np.ndarray, train_codes: np.ndarray, train_groups: np.ndarray, n_classes: int, *,
              seed: int, epoch: int, rank: int, world: int, bags_per_step: int, bag_size: int,
              max_steps: int | None = None) -> S.EpochPlan:
    """One rank's bags for one epoch, as an :class:`~raycp.train.sampling.EpochPlan` whose batches
    are ``bags_per_step`` whole bags of ``bag_size`` cells (bag-major).

    Every class gets the same number of bags (:func:`~raycp.train.sampling.bags_per_class`); each
    bag is the cells of one well (``train_groups``: a well code per training cell) picked at random
    among the class's wells, drawn without replacement when the well has ``bag_size`` cells, with
    replacement otherwise. A pure function of ``(seed, epoch)``."""
    _, per_class = S.balanced_counts(train_codes, n_classes)
    per_bag_class = S.bags_per_class(per_class, bag_size)
    rng = np.random.default_rng(S.derive_seed(seed, STREAM_BAGS, epoch))
    by_group: dict[int, np.ndarray] = {}
    order = np.argsort(train_groups, kind="stable")
    groups, starts = np.unique(train_groups[order], return_index=True)
    bounds = np.append(starts, len(order))
    for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
        by_group[int(g)] = order[lo:hi]
    class_groups = [np.unique(train_groups[train_codes == c]) for c in range(n_classes)]
    bags, labels = [], []
    for c in range(n_classes):
        for g in rng.choice(class_groups[c], size=per_bag_class, replace=True):
            members = by_group[int(g)]
            members = members[train_codes[members] == c]
            pick = rng.choice(len(members), size=bag_size, replace=len(members) < bag_size)
            bags.append(members[pick])
            labels.append(c)
    bags_arr = np.stack(bags)[rng.permutation(len(bags))]
    steps = S.steps_per_epoch(len(bags_arr), world, bags_per_step, max_steps)
    mine = bags_arr[rank::world][: steps * bags_per_step]
    digest = hashlib.sha1(np.ascontiguousarray(train_sids[bags_arr]).tobytes()).hexdigest()
    flat = mine.reshape(-1)
    return S.EpochPlan(epoch=epoch, rank=rank, world=world, steps=steps, batch=bags_per_step * bag_size,
                       sids=train_sids[flat], labels=train_codes[flat], digest=digest)


# ----------------------------------------------------------------------------- the net


class TrainNet(nn.Module):
    """The timm network and a formulation's heads behind one forward (the module DDP wraps).

    ``forward(x, bag_size=None, weight=1.0) -> (class logits, domain logits or None, attention or None)``:
    with ``attention`` and ``bag_size``, ``x`` holds whole bags (bag-major) and the class logits are
    one per bag; with ``domain``, the domain branch sees every cell's pooled features."""

    def __init__(self, net: nn.Module, *, attention: AttentionPool | None = None, domain: DomainHead | None = None) -> None:
        super().__init__()
        self.net = net
        self.attention = attention
        self.domain = domain

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("net.")}

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("net.")]
        if missing or unexpected:
            raise InputError(f"checkpoint heads do not match the formulation (missing {missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]})", fix="train into a new output/name")

    def forward(self, x: torch.Tensor, bag_size: int | None = None, weight: float = 1.0):
        net = self.net
        pooled = net.global_pool(net.forward_features(x))  # N×1280, before the dropout of timm's forward_head
        domain = self.domain(pooled, weight) if self.domain is not None else None
        attn = None
        if self.attention is not None and bag_size:
            pooled, attn = self.attention(pooled.reshape(-1, bag_size, pooled.shape[-1]))
        if getattr(net, "drop_rate", 0.0):
            pooled = F.dropout(pooled, p=float(net.drop_rate), training=self.training)
        return net.get_classifier()(pooled), domain, attn
