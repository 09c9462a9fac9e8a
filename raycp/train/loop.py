"""The training recipe and ``train_loop_per_worker``, the function every Ray Train worker runs.

:class:`Recipe` holds the science (model, SGD, schedule, one training step, evaluation) and runs
without Ray: the benchmark's bare torch loop and the unit tests call it directly. The Ray Train
adapter (:func:`train_loop_per_worker`) adds what distribution needs:

- DDP via ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU); bf16 autocast and
  channels_last on GPU only;
- this rank's share of each balanced epoch (:func:`raycp.train.sampling.plan_epoch`), read by Ray
  Data (:class:`raycp.train.data.RankLoader`), the same number of steps on every rank;
- per-epoch metrics summed over ranks with one all-reduce (:mod:`raycp.train.metrics`);
- a checkpoint after every epoch through ``ray.train.report``: ``state.pt`` from rank 0 (model,
  optimizer, scheduler, epoch, sampler state, metrics history, config fingerprint) and
  ``rng_rank<r>.pt`` from every rank (torch RNG states);
- on (re)start, ``ray.train.get_checkpoint()``: the run continues at the epoch *after* the
  checkpoint's (restarting at the saved epoch would train it twice: ray#46814).

Why a resumed run is bitwise identical to an uninterrupted one (CPU): the epoch draw, the split of
samples over ranks, the augmentation draws (``(seed, epoch, rank, step)``) and the dropout stream
(reseeded from ``(seed, epoch, rank)`` at every epoch start) are functions of the seed, not of
how the process got there; model, optimizer and scheduler state come back exactly from the
checkpoint; with 2 ranks a gradient all-reduce is one IEEE addition, which is commutative.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raycp.errors import ConfigError, InputError
from raycp.models.network import create_model, load_imagenet_init
from raycp.models.normalize import normalizer
from raycp.train import augment as A
from raycp.train import data as D
from raycp.train import formulations as FM
from raycp.train import metrics as M
from raycp.train import sampling as S

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STATE_FORMAT = 1


def fingerprint(science: dict) -> str:
    return hashlib.sha1(json.dumps(science, sort_keys=True).encode()).hexdigest()[:16]


def lr_factor(epoch: int, *, schedule: str, warmup: int, epochs: int) -> float:
    """Multiplier of the base lr in ``epoch`` (0-based). Cosine: DeepProfiler's schedule,
    ``1/(w − t)`` for the ``w`` warm-up epochs, then ``½(1 + cos(π t / E))``."""
    if schedule == "constant":
        return 1.0
    if epoch < warmup:
        return 1.0 / (warmup - epoch)
    return 0.5 * (1.0 + float(np.cos(np.pi * epoch / epochs)))


def configure_torch(compute, device: torch.device) -> None:
    """Threads and determinism of a training process (``TrainConfig.compute``).

    CPU: ``cpus_per_worker`` rounded half up (≥ 1) intra-op threads (Ray sets ``OMP_NUM_THREADS=1`` for
    fractional CPUs). CPU kernels are deterministic for a fixed thread count, which is why it is
    fixed: measured on the demo's crops, 8 steps with 1 thread and with 2 threads already give
    different weights (another reduction order; issue 16), and so may another CPU (oneDNN picks
    kernels by SIMD width). GPU with ``deterministic``: cuDNN's deterministic
    algorithms, no autotuning, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and torch's deterministic mode
    (warn-only: an op without a deterministic CUDA kernel warns instead of failing the run); without
    it, cuDNN autotuning (faster, not reproducible)."""
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(compute.cpus_per_worker + 0.5)))
        return
    if compute.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def param_groups(model: torch.nn.Module, l2: float) -> list[dict]:
    """Keras' L2 kernel regulariser as SGD weight decay: ``2·l2`` on conv/dense kernels only."""
    decay, other = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim > 1 else other).append(p)
    return [{"params": decay, "weight_decay": 2 * l2}, {"params": other, "weight_decay": 0.0}]


@dataclass
class Recipe:
    """The paper's training recipe for one process (no Ray), with the formulation of
    ``cfg.formulation`` (:mod:`raycp.train.formulations`)."""

    cfg: object  # TrainConfig
    n_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world: int = 1
    n_domains: int = 0  # grl: number of domains (plates)
    arch_args: dict | None = None  # a fine-tuning init's timm multipliers (raycp.models.keras_import)
    normalization: str | None = None  # crop normalisation preset (trainer.resolved_normalization; None: the
    # config's model.normalization, else per_crop_channel_zscore)

    def __post_init__(self) -> None:
        self.normalize = normalizer(self.normalization or self.cfg.model.normalization)

    @property
    def formulation(self) -> str:
        return self.cfg.formulation

    @property
    def bag_size(self) -> int | None:
        return self.cfg.mil.bag_size if self.formulation == "mil" else None

    def scored_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The labels a step's predictions are scored against: one per bag for MIL (``y`` is per
        cell, bag-major; a bag's label is its first cell's), else ``y``."""
        return y[:: self.bag_size] if self.bag_size else y

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and self.cfg.compute.bf16

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda" and self.cfg.compute.channels_last

    def base_lr(self) -> float:
        scale = self.world if self.cfg.optim.lr_scaling == "linear" else 1
        return self.cfg.optim.lr * scale

    def model(self, imagenet: dict | str | None = None, init: dict | None = None) -> torch.nn.Module:
        """The timm network: random (seeded), from ImageNet weights, or from a fine-tuning ``init``
        (every tensor but the classifier's, already in this network's channel order)."""
        torch.manual_seed(S.derive_seed(self.cfg.seed, S.STREAM_TORCH, 0xFFFF))
        m = create_model(self.cfg.model.arch, num_classes=self.n_classes, in_chans=len(self.cfg.channels),
                         drop_rate=self.cfg.model.drop_rate, head_init=self.cfg.model.head_init,
                         arch_args=self.arch_args)
        if imagenet is not None:
            load_imagenet_init(m, imagenet, stem=self.cfg.model.stem)
        if init is not None:
            missing, unexpected = m.load_state_dict(init, strict=False)
            if unexpected or any(not k.startswith("classifier") for k in missing):
                raise InputError(f"train.model.init {self.cfg.model.init}: its tensors do not fit "
                                 f"{self.cfg.model.arch} (missing {missing[:3]}, unexpected {list(unexpected)[:3]})",
                                 fix="set train.model.arch to the init model's arch")
        m = m.to(self.device)
        if self.channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m

    def train_net(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the optimiser trains: ``model`` itself (classification, OLS) or a
        :class:`~raycp.train.formulations.TrainNet` with the attention pool (MIL) or the domain
        branch (GRL), whose heads are initialised from their own seeded stream."""
        if self.formulation not in ("mil", "grl"):
            return model
        state = torch.random.get_rng_state()
        torch.manual_seed(S.derive_seed(self.cfg.seed, S.STREAM_TORCH, 0xFFFE))
        try:
            width = model.num_features
            if self.formulation == "mil":
                mil = self.cfg.mil
                net = FM.TrainNet(model, attention=FM.AttentionPool(width, mil.attention_dim, mil.gated))
            else:
                net = FM.TrainNet(model, domain=FM.DomainHead(width, self.n_domains, self.cfg.grl.hidden))
        finally:
            torch.random.set_rng_state(state)
        return net.to(self.device)

    def grl_weight(self, epoch: int, step: int, steps: int) -> float:
        g = self.cfg.grl
        if g.schedule == "constant":
            return g.weight
        return FM.ganin_lambda((epoch * steps + step) / max(1, self.cfg.optim.epochs * steps), g.weight)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.SGD(param_groups(model, o.l2), lr=self.base_lr(), momentum=o.momentum,
                               nesterov=o.nesterov and o.momentum > 0)

    def scheduler(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        o = self.cfg.optim
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: lr_factor(e, schedule=o.schedule, warmup=o.warmup_epochs, epochs=o.epochs))

    def to_device(self, crops: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(crops))
        y = torch.from_numpy(labels)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def prepare(self, x_u8: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 batch -> normalised (and, with a generator, augmented) float batch."""
        x = self.normalize(x_u8)
        if generator is not None and self.cfg.augment.enabled:
            x = A.apply_augment(x, A.draw_augment(x.shape[0], x.shape[1], x.shape[2], self.cfg.augment, generator))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(self, model, optimizer, x_u8, y, generator, *, soft: torch.Tensor | None = None,
                   domains: torch.Tensor | None = None, weight: float = 1.0,
                   domain_tally: Tally | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step; ``(loss, predicted class)``. MIL: one prediction per bag (``y`` is per
        cell, bag-major; the bag's label is its first cell's). OLS: the loss is against ``soft``
        (``B×K``). GRL: the domain branch's cross-entropy on ``domains`` is added (its gradient
        reversed into the backbone); ``domain_tally`` counts its accuracy."""
        x = self.prepare(x_u8, generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.formulation in ("mil", "grl"):
                logits, domain_logits, _ = model(x, bag_size=self.bag_size, weight=weight)
            else:
                logits, domain_logits = model(x), None
        y = self.scored_labels(y)
        if soft is not None:
            loss = FM.soft_cross_entropy(logits, soft)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.optim.label_smoothing)
        if domain_logits is not None:
            domain_loss = F.cross_entropy(domain_logits.float(), domains)
            if domain_tally is not None:
                domain_tally.add(domains, domain_logits.detach().argmax(dim=1), domain_loss.detach() * len(domains))
            loss = loss + domain_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach().argmax(dim=1)

    @torch.no_grad()
    def logits(self, model, x_u8) -> torch.Tensor:
        """float32 logits of uint8 crops, no augmentation (the model's mode is the caller's)."""
        x = self.prepare(x_u8, None)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return model(x).float()

    def eval_batch(self, model, x_u8, y) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(model, x_u8)
        return F.cross_entropy(logits, y, reduction="sum"), logits.argmax(dim=1)

    def predict(self, model, x_u8) -> torch.Tensor:
        """Class probabilities (float32) in inference mode, no augmentation (OLS' end-of-epoch pass)."""
        return torch.softmax(self.logits(model, x_u8), dim=1)


class Tally:
    """Confusion matrix and loss sum on the device (no host sync per step)."""

    def __init__(self, n_classes: int, device: torch.device) -> None:
        self.n = n_classes
        self.conf = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, y: torch.Tensor, pred: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.conf += torch.bincount(y * self.n + pred, minlength=self.n * self.n)
        self.loss += loss_sum.to(torch.float64)

    def packed(self) -> torch.Tensor:
        return torch.cat([self.conf.to(torch.float64), self.loss.reshape(1)])

    @staticmethod
    def unpack(vec: np.ndarray, n: int, *, chance: bool = False) -> dict:
        return M.summarize(vec[: n * n].reshape(n, n).round().astype(np.int64), float(vec[n * n]), chance=chance)


# ------------------------------------------------------------------------------ checkpoints


def load_state(folder: str | Path, *, where: str | None = None) -> dict:
    """``state.pt`` of a checkpoint folder; a missing or unreadable one is a clear InputError."""
    path = Path(folder) / STATE_FILE
    where = where or str(path)
    if not path.exists():
        raise InputError(f"checkpoint {where} has no {STATE_FILE}",
                         fix="delete this checkpoint folder to resume from the previous one, or train into a new output")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"checkpoint {where} is corrupt ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})",
                         fix="delete this checkpoint folder to resume from the previous one, "
                             "or train into a new output") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "model" not in state:
        raise InputError(f"checkpoint {where} is not a raycp training checkpoint",
                         fix="delete it, or train into a new output")
    return state


def _save_checkpoint(folder: Path, *, rank: int, state: dict | None) -> None:
    if state is not None:
        torch.save(state, folder / STATE_FILE)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / f"rng_rank{rank}.pt")


def _maybe_fail(inject: dict | None, epoch: int, rank: int) -> None:
    """Test hook: kill (``os._exit``) or fail one worker once, at the first step of epoch
    ``inject["at_epoch"]`` (0-based), i.e. mid-run after the previous epoch's checkpoint.

    It first waits until the Ray Train controller has *committed* the previous epoch's checkpoint
    (it is listed in the run's checkpoint-manager snapshot): reports travel to the controller on its
    next poll, and a worker that dies before the controller has processed them takes that
    checkpoint with it (the run then rightly resumes from the one before)."""
    if not inject or inject.get("at_epoch") != epoch or inject.get("rank", 0) != rank:
        return
    marker = Path(inject["marker"])
    if marker.exists():
        return
    import ray.train

    storage = ray.train.get_context().get_storage()
    previous = f"epoch_{epoch - 1:04d}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as fh:
                if previous in fh.read().decode():
                    break
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.25)
    marker.write_text(f"failed at the start of epoch {epoch}")
    if inject.get("mode", "exit") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure at the start of epoch {epoch}")


# ------------------------------------------------------------------------ the Ray adapter


class _Tracer:
    """``RAYCP_TRAIN_TRACE=<file>``: each rank appends ``wall-clock seconds-since-start event``
    lines (start, checkpoint, every batch, validation, report) — where to look first when a
    distributed run is slow or hangs. Off (free) by default."""

    def __init__(self) -> None:
        self.path = os.environ.get("RAYCP_TRAIN_TRACE")
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(f"{time.time():.2f} {time.perf_counter() - self.t0:8.2f} {msg}\n")


@dataclass
class WorkerSpec:
    """Everything a worker needs (sent once through the object store)."""

    cfg: dict
    classes: list[str]
    source: D.CropSource
    train_sids: np.ndarray
    train_codes: np.ndarray
    val_sids: np.ndarray
    val_codes: np.ndarray
    fingerprint: str
    imagenet: dict | None = None
    resume_state: bytes | None = None  # ``resume_from``'s state.pt, when the run has no checkpoint
    inject_failure: dict | None = None
    init: dict | None = None  # train.model.init's tensors (classifier left out, stem in `channels` order)
    arch_args: dict | None = None
    normalization: str | None = None
    train_groups: np.ndarray | None = None  # mil: a well code per training cell
    train_domains: np.ndarray | None = None  # grl: a domain code per training cell
    n_domains: int = 0


def _ols_epoch_update(recipe: Recipe, model, spec: WorkerSpec, labels: torch.Tensor, loader, *, rank: int,
                      world: int) -> torch.Tensor:
    """OLS' end-of-epoch pass: this rank predicts its share of the training cells (inference mode,
    no augmentation), the shares are summed over ranks, and the soft labels move towards them."""
    cfg = recipe.cfg
    own = np.arange(len(spec.train_sids))[rank::world]
    n_classes = recipe.n_classes
    step = max(cfg.optim.batch_size * 4, 1)
    if cfg.ols.labels == "example":
        table = torch.zeros((len(spec.train_sids), n_classes), dtype=torch.float32, device=recipe.device)
    else:
        sums = torch.zeros((n_classes, n_classes), dtype=torch.float64, device=recipe.device)
        counts = torch.zeros(n_classes, dtype=torch.float64, device=recipe.device)
    for lo in range(0, len(own), step):
        rows = own[lo:lo + step]
        sids = spec.train_sids[rows]
        uniq, crops = loader.load(sids)
        x, y = recipe.to_device(crops[np.searchsorted(uniq, sids)], spec.train_codes[rows].astype(np.int64))
        probs = recipe.predict(model, x)
        if cfg.ols.labels == "example":
            table[torch.from_numpy(rows).to(recipe.device)] = probs
        else:
            s_, c_ = FM.class_mean_predictions(probs, y, n_classes)
            sums += s_
            counts += c_
    parts = [table] if cfg.ols.labels == "example" else [sums, counts]
    if world > 1:
        import torch.distributed as dist

        for part in parts:
            dist.all_reduce(part)
    if cfg.ols.labels == "example":
        return FM.ols_update(labels, table.cpu(), cfg.ols.alpha)
    return FM.ols_class_update(labels, sums.cpu(), counts.cpu(), cfg.ols.alpha)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from raycp.train.config import TrainConfig

    trace = _Tracer()
    trace("start")
    spec: WorkerSpec = loop_config["spec"]
    if isinstance(spec, ray.ObjectRef):
        spec = ray.get(spec)
    cfg = TrainConfig.model_validate(spec.cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    configure_torch(cfg.compute, device)
    n_classes = len(spec.classes)
    recipe = Recipe(cfg, n_classes, device=device, world=world, n_domains=spec.n_domains, arch_args=spec.arch_args,
                    normalization=spec.normalization)
    formulation = cfg.formulation

    def plan(e: int) -> S.EpochPlan:
        if formulation == "mil":
            return FM.plan_bags(spec.train_sids, spec.train_codes, spec.train_groups, n_classes, seed=cfg.seed, epoch=e,
                                rank=rank, world=world, bags_per_step=cfg.mil.bags_per_step, bag_size=cfg.mil.bag_size,
                                max_steps=cfg.compute.max_steps_per_epoch)
        return S.plan_epoch(spec.train_sids, spec.train_codes, n_classes, seed=cfg.seed, epoch=e, rank=rank,
                            world=world, batch=cfg.optim.batch_size, max_steps=cfg.compute.max_steps_per_epoch)

    checkpoint = ray.train.get_checkpoint()
    trace(f"checkpoint rank={rank} {checkpoint}")
    state, where = None, None
    if checkpoint is not None:
        where = checkpoint.path
        with checkpoint.as_directory() as folder:
            state = load_state(folder, where=where)
    elif spec.resume_state is not None:
        where = cfg.resume_from
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, STATE_FILE).write_bytes(spec.resume_state)
            state = load_state(folder, where=where)
    if state is not None and state.get("fingerprint") != spec.fingerprint:
        raise ConfigError(f"checkpoint {where} was written by a run with another recipe "
                          "(model, optimiser, augmentation, split, classes or seed differ)",
                          fix="restore that config, or train into a new output/name")
    model = recipe.model(None if state is not None else spec.imagenet, None if state is not None else spec.init)
    net = recipe.train_net(model)  # model itself, or model + the formulation's heads
    if state is not None:
        model.load_state_dict(state["model"])
        if net is not model:
            net.load_heads(state.get("heads") or {})
    optimizer = recipe.optimizer(net)
    scheduler = recipe.scheduler(optimizer)
    ols = None
    if formulation == "ols":
        if state is not None and "ols" not in state:
            raise InputError(f"checkpoint {where} has no online soft labels", fix="train into a new output/name")
        ols = state["ols"] if state is not None else FM.ols_init(
            spec.train_codes if cfg.ols.labels == "example" else np.arange(n_classes), n_classes, cfg.ols.label_smoothing)
    start, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]) + 1, list(state["history"])  # the NEXT epoch (ray#46814)
        check = plan(int(state["epoch"]))
        if state["sampler"]["digest"] != check.digest:
            raise InputError(f"checkpoint {where}: the crop shards changed since it was written "
                             "(the epoch's balanced draw differs)", fix="train into a new output/name")
    trace(f"model rank={rank}")
    ddp = ray.train.torch.prepare_model(net, move_to_device=False) if world > 1 else net
    trace(f"ddp rank={rank}")

    loader = D.RankLoader(spec.source, max_cached=cfg.compute.max_cached_crops)
    val_sids = spec.val_sids[rank::world]
    val_codes = spec.val_codes[rank::world]
    val_cache = None
    epochs = cfg.optim.epochs

    try:
        current = plan(start) if start < epochs else None
        for epoch in range(start, epochs):
            nxt = plan(epoch + 1) if epoch + 1 < epochs else None
            torch.manual_seed(S.derive_seed(cfg.seed, S.STREAM_TORCH, epoch, rank))
            net.train()
            train_tally = Tally(n_classes, device)
            domain_tally = Tally(spec.n_domains, device) if formulation == "grl" else None
            lr = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            for step, (crops, labels) in enumerate(loader.batches(current, nxt)):
                trace(f"batch {epoch} {step} rank={rank}")
                if step == 0:
                    _maybe_fail(spec.inject_failure, epoch, rank)
                x, y = recipe.to_device(crops, labels)
                gen = A.augment_generator(cfg.seed, epoch, rank, step)
                soft = domains = None
                if formulation in ("ols", "grl"):
                    rows = np.searchsorted(spec.train_sids, current.sids[step * current.batch:(step + 1) * current.batch])
                    if ols is not None:
                        soft = (ols[rows] if cfg.ols.labels == "example" else ols[labels]).to(device)
                    if formulation == "grl":
                        domains = torch.from_numpy(spec.train_domains[rows].astype(np.int64)).to(device)
                loss, pred = recipe.train_step(ddp, optimizer, x, y, gen, soft=soft, domains=domains,
                                               weight=recipe.grl_weight(epoch, step, current.steps) if domains is not None else 1.0,
                                               domain_tally=domain_tally)
                y_seen = recipe.scored_labels(y)
                train_tally.add(y_seen, pred, loss * y_seen.shape[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            scheduler.step()

            trace(f"trained {epoch} rank={rank}")
            model.eval()
            val_tally = Tally(n_classes, device)
            if len(val_sids):
                if val_cache is None and len(val_sids) <= cfg.compute.max_cached_crops:
                    val_cache = spec.source.load(val_sids)  # read once, scored every epoch
                for lo in range(0, len(val_sids), cfg.optim.batch_size * 4):
                    sids = val_sids[lo:lo + cfg.optim.batch_size * 4]
                    uniq, crops = val_cache if val_cache is not None else spec.source.load(sids)
                    x, y = recipe.to_device(crops[np.searchsorted(uniq, sids)],
                                            val_codes[lo:lo + len(sids)].astype(np.int64))
                    loss, pred = recipe.eval_batch(model, x, y)
                    val_tally.add(y, pred, loss)
            trace(f"validated {epoch} rank={rank}")
            if ols is not None:
                ols = _ols_epoch_update(recipe, model, spec, ols, loader, rank=rank, world=world)
            packed = torch.cat([train_tally.packed(), val_tally.packed(),
                                *([domain_tally.packed()] if domain_tally is not None else [])])
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(packed)
            vec = packed.cpu().numpy()
            half = n_classes * n_classes + 1
            entry = {"epoch": epoch, "lr": lr, "seconds": round(seconds, 3), "resumed": epoch == start and state is not None,
                     "samples": int(current.steps * current.batch * world),
                     "samples_per_s": round(current.steps * current.batch * world / max(seconds, 1e-9), 2),
                     "train": Tally.unpack(vec[:half], n_classes),
                     "val": Tally.unpack(vec[half:2 * half], n_classes, chance=True) if len(spec.val_sids) else None}
            if domain_tally is not None:  # the domain branch's own accuracy on the training batches
                entry["domain"] = Tally.unpack(vec[2 * half:], spec.n_domains)
            history.append(entry)
            sampler = {"seed": cfg.seed, "epoch": epoch, "next_epoch": epoch + 1, **current.state()}
            with tempfile.TemporaryDirectory() as tmp:
                blob = None
                if rank == 0:
                    blob = {"format": STATE_FORMAT, "epoch": epoch, "fingerprint": spec.fingerprint,
                            "classes": spec.classes, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "sampler": sampler, "history": history, "config": spec.cfg}
                    if net is not model:
                        blob["heads"] = net.heads_state()
                    if ols is not None:
                        blob["ols"] = ols.clone()
                _save_checkpoint(Path(tmp), rank=rank, state=blob)
                ray.train.report(M.scalar_metrics(entry), checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
            trace(f"reported {epoch} rank={rank}")
            current = nxt
    finally:
        loader.close()
