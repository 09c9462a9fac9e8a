"""Ray Train driver: validate the inputs, launch ``TorchTrainer``, resume, export the model.

:func:`fit` (the Python API behind ``raycp train CONFIG``) is :func:`build_trainer` →
:func:`run_trainer` → :func:`finish`; a Tune trial or a job builds the trainer with its own
``RunConfig`` (storage, name, callbacks) and calls the other two:

1. reads the crop shards' metadata only (:func:`raycp.train.data.read_crop_metadata`), encodes the
   classes (controls are classes), assigns the split and checks every bad input *before* any worker
   starts: a class with zero cells, crops without labels, too few samples for one step, an
   unreadable latest checkpoint;
2. writes ``<output>/train/config.yaml`` and ``split.parquet`` (the split column);
3. runs ``ray.train.torch.TorchTrainer`` (Train V2) with ``ScalingConfig(num_workers, use_gpu)``
   and ``RunConfig(storage_path=<output>/train, name=<name>, failure_config=FailureConfig(...))``:
   local folders or ``s3://`` (a pyarrow S3 filesystem built from the environment, honouring
   ``RAYCP_S3_ENDPOINT_URL``). A second ``fit`` with the same output and name resumes from the
   latest checkpoint; a worker lost mid-run is replaced and resumes the same way (``max_failures``);
4. exports the trained network as ``<output>/train/model/model.safetensors`` + ``model.json``
   (classes, channels, crop size, normalisation, feature layer), read back by :func:`raycp.models.export.load_model`,
   and writes the metrics reports (learning curve, per-class table).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from raycp.errors import ConfigError, InputError, RaycpError, StorageError
from raycp.io import urls
from raycp.layout import RunLayout
from raycp.models.export import write_model
from raycp.models.normalize import PRESETS
from raycp.train import data as D
from raycp.train import sampling as S
from raycp.train.config import TrainConfig

logger = logging.getLogger(__name__)

_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


@dataclass
class Prepared:
    """The driver's view of a training run, before any worker starts."""

    cfg: TrainConfig
    crops: D.CropSet
    classes: list[str]
    codes: np.ndarray
    is_val: np.ndarray
    keep: np.ndarray  # crops used (border filter)
    controls: set[str] = field(default_factory=set)
    groups: np.ndarray | None = None  # mil: a well code per crop
    domains: np.ndarray | None = None  # grl: a domain code per crop
    n_domains: int = 0
    init_info: dict | None = None  # train.model.init's model.json (checked against the run)

    @property
    def train_sids(self) -> np.ndarray:
        return np.flatnonzero(self.keep & ~self.is_val)

    @property
    def val_sids(self) -> np.ndarray:
        return np.flatnonzero(self.keep & self.is_val)

    def summary(self) -> dict:
        counts, per_class = S.balanced_counts(self.codes[self.train_sids], len(self.classes))
        return {"crops": int(self.keep.sum()), "train": int(len(self.train_sids)), "val": int(len(self.val_sids)),
                "classes": len(self.classes), "per_class_draw": per_class,
                "epoch_samples": per_class * len(self.classes), "smallest_class": int(counts.min()),
                "largest_class": int(counts.max()), "shape": list(self.crops.shape)}


@dataclass
class TrainResult:
    history: list[dict]
    classes: list[str]
    model_dir: str
    train_dir: str
    reports: dict[str, str]
    summary: dict
    checkpoint: str | None = None

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def train_dir(cfg: TrainConfig) -> str:
    """``<output>/train`` (:class:`raycp.layout.RunLayout`)."""
    return RunLayout(cfg.output).folder("train")


def prepare(cfg: TrainConfig) -> Prepared:
    """Read metadata, encode classes, split; every input error surfaces here as one line."""
    extra = ((cfg.split.column,) if cfg.split.strategy == "column" else ()) + \
        ((cfg.grl.domain,) if cfg.formulation == "grl" else ())
    crops = D.read_crop_metadata(cfg.crops, label=cfg.label, crop_column=cfg.crop_column, extra=extra)
    meta = crops.meta
    channels, size = crops.shape[0], crops.shape[1]
    if channels != len(cfg.channels):
        raise InputError(f"{cfg.crops}: crops have {channels} channels, the config lists {len(cfg.channels)} "
                         f"({', '.join(cfg.channels)})", fix="set channels to the crops' channel order")
    if crops.channels and list(crops.channels) != list(cfg.channels):
        raise InputError(f"{cfg.crops}: crops hold channels {crops.channels}, the config lists {cfg.channels}",
                         fix="set channels to the crops' channel order")
    if crops.shape[1] != crops.shape[2] or size < 32:
        raise InputError(f"{cfg.crops}: crops are {crops.shape[1]}×{crops.shape[2]}", fix="crop squares of ≥32 px (paper: 128)")
    keep = np.ones(len(meta), dtype=bool)
    if cfg.exclude_border_cells and D.TOUCHES_BORDER in meta.columns:
        keep &= ~meta[D.TOUCHES_BORDER].fillna(False).astype(bool).to_numpy()
    used = meta.loc[keep]
    codes_used, classes = S.encode_labels(used, cfg.label, cfg.classes)
    codes = np.full(len(meta), -1, dtype=np.int32)
    codes[keep] = codes_used
    is_val = np.zeros(len(meta), dtype=bool)
    is_val[keep] = S.assign_split(used.reset_index(drop=True), codes_used, classes, cfg.split, cfg.seed)
    controls = set()
    if D.IS_CONTROL in meta.columns:
        controls = set(used.loc[used[D.IS_CONTROL].fillna(False).astype(bool), cfg.label].astype(str))
    prep = Prepared(cfg, crops, classes, codes, is_val, keep, controls)
    world = cfg.compute.num_workers
    epoch = prep.summary()["epoch_samples"]
    if cfg.formulation == "mil":
        prep.groups = pd.Categorical(S.wells_of(meta)).codes.astype(np.int64)
        bags = S.bags_per_class(prep.summary()["per_class_draw"], cfg.mil.bag_size) * len(classes)
        if S.steps_per_epoch(bags, world, cfg.mil.bags_per_step) == 0:
            raise InputError(f"an epoch has {bags} bags of {cfg.mil.bag_size} cells: fewer than mil.bags_per_step × "
                             f"workers ({cfg.mil.bags_per_step} × {world})",
                             fix="lower mil.bags_per_step, mil.bag_size or compute.num_workers")
    elif S.steps_per_epoch(epoch, world, cfg.optim.batch_size) == 0:
        raise InputError(f"a balanced epoch has {epoch} crops: fewer than batch_size × workers "
                         f"({cfg.optim.batch_size} × {world}), so not one step can run",
                         fix="lower optim.batch_size or compute.num_workers, or crop more cells")
    if cfg.formulation == "grl":
        column = cfg.grl.domain
        if column not in meta.columns or meta.loc[keep, column].isna().any():
            raise InputError(f"{cfg.crops}: grl.domain column {column!r} is missing or empty in the crop shards",
                             fix="set grl.domain to a Metadata_ column every crop has (paper: Metadata_Plate)")
        values = meta[column].astype(str)
        seen = sorted(values.iloc[prep.train_sids].unique())  # domains of the training cells (leave-plates-out
        prep.domains = pd.Categorical(values, categories=seen).codes.astype(np.int64)  # holds some out: -1)
        prep.n_domains = len(seen)
        if prep.n_domains < 2:
            raise InputError(f"grl: the training cells come from {prep.n_domains} {column} value(s)",
                             fix="gradient reversal needs at least 2 domains (plates)")
    prep.init_info = check_init(cfg)  # a fine-tuning init that does not fit is an input error too (also --dry-run)
    return prep


def split_table(prep: Prepared) -> pd.DataFrame:
    meta = prep.crops.meta
    cols = [c for c in (D.PLATE, D.WELL, D.SITE, "Metadata_CellId", prep.cfg.label) if c in meta.columns]
    out = meta.loc[:, cols].copy()
    out["Metadata_Split"] = np.where(~prep.keep, "unused", np.where(prep.is_val, "val", "train"))
    return out


def checkpoint_dirs(cfg: TrainConfig) -> list[tuple[int, str]]:
    """``(epoch, url)`` of the run's checkpoint folders, oldest first."""
    run = RunLayout(cfg.output).train_run(cfg.name)
    fs, path = urls.filesystem(run)
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _EPOCH_DIR.match(name)
        if match:
            out.append((int(match.group(1)), urls.join(run, name)))
    return sorted(out)


def _read_state(url: str) -> tuple[dict, bytes]:
    """``state.pt`` of a checkpoint folder URL (validated) and its bytes."""
    import tempfile

    from raycp.train.loop import STATE_FILE, load_state

    with tempfile.TemporaryDirectory() as tmp:
        data = b""
        try:
            data = urls.read_bytes(urls.join(url, STATE_FILE))
            Path(tmp, STATE_FILE).write_bytes(data)
        except FileNotFoundError:
            pass
        return load_state(tmp, where=url), data


def _check_recipe(cfg: TrainConfig, state: dict, url: str) -> None:
    from raycp.train.loop import fingerprint

    if state.get("fingerprint") != fingerprint(cfg.science()):
        raise ConfigError(f"checkpoint {url} was written by a run with another recipe "
                          "(model, optimiser, augmentation, split, classes or seed differ)",
                          fix="restore that config, or train into a new output or name")


def _check_latest_checkpoint(cfg: TrainConfig) -> str | None:
    """Fail early, with one line, when the checkpoint a resume would start from is unreadable
    (the fix names the previous checkpoint to continue from under a new run name)."""
    found = checkpoint_dirs(cfg)
    if not found:
        return None
    if not cfg.resume:
        raise ConfigError(f"{RunLayout(cfg.output).train_run(cfg.name)} already holds checkpoints and resume is off",
                          fix="set resume: true to continue it, or choose another output or name")
    _, url = found[-1]
    try:
        state, _ = _read_state(url)
    except InputError as exc:
        if len(found) > 1:
            exc.fix = (f"continue from the previous checkpoint as a new run: --set name={cfg.name}-2 "
                       f"--set resume_from={found[-2][1]}")
        else:
            exc.fix = "train into a new output or name (this run has no earlier checkpoint)"
        raise InputError(exc.message, fix=exc.fix) from None
    _check_recipe(cfg, state, url)
    return url


def _resume_state(cfg: TrainConfig, latest: str | None) -> bytes | None:
    """``resume_from``'s state (validated), used only while the run has no checkpoint of its own."""
    if latest is not None or not cfg.resume_from:
        return None
    state, data = _read_state(cfg.resume_from)
    _check_recipe(cfg, state, cfg.resume_from)
    return data


# ---------------------------------------------------------------------------------- fit


def check_init(cfg: TrainConfig) -> dict | None:
    """The ``model.json`` of ``train.model.init`` (None without one). Raises :class:`InputError` /
    :class:`ConfigError` when the init does not fit the run (another arch, other channels)."""
    if not cfg.model.init:
        return None
    from raycp.models.export import read_model_json

    info = read_model_json(cfg.model.init)
    if info.get("arch") != cfg.model.arch:
        raise ConfigError(f"train.model.init {cfg.model.init} is a {info.get('arch')}, train.model.arch is {cfg.model.arch}",
                          fix=f"set train.model.arch={info.get('arch')}")
    chans = list(info.get("channels") or [])
    if sorted(chans) != sorted(cfg.channels):
        raise InputError(f"train.model.init {cfg.model.init} takes channels {chans}, the crops hold {list(cfg.channels)}",
                         fix="train on crops of the init model's channels (names must match)")
    return info


def init_tensors(cfg: TrainConfig, info: dict) -> dict:
    """The tensors of ``train.model.init`` (``info``: its :func:`check_init`) without the classifier,
    the stem's input channels permuted from the init's order to ``cfg.channels``."""
    from raycp.models.export import load_model

    model, _ = load_model(cfg.model.init)
    chans = list(info["channels"])
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    state["conv_stem.weight"] = state["conv_stem.weight"][:, [chans.index(c) for c in cfg.channels]].contiguous()
    return state


def resolved_normalization(cfg: TrainConfig, init_info: dict | None) -> str:
    """The crop normalisation preset a run trains with: ``train.model.normalization``, else the
    init model's, else raycp's z-score."""
    from raycp.models.normalize import preset_name

    if cfg.model.normalization:
        return cfg.model.normalization
    return preset_name(init_info.get("normalization")) if init_info else preset_name(None)


def _imagenet(cfg: TrainConfig, n_classes: int) -> dict | None:
    if not cfg.model.imagenet_weights:
        return None
    from raycp.models.network import create_model, load_imagenet_init, read_state_dict

    tensors = read_state_dict(cfg.model.imagenet_weights)
    load_imagenet_init(create_model(cfg.model.arch, num_classes=n_classes, in_chans=len(cfg.channels)), tensors,
                       stem=cfg.model.stem)  # checks the file fits the architecture, on the driver
    return tensors


def _unwrap(exc: BaseException) -> BaseException | None:
    """The raycp error inside a Ray Train failure, if any (worker or controller)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaycpError):
            return e
        for attr in ("worker_failures",):
            todo.extend(getattr(e, attr, {}).values() if isinstance(getattr(e, attr, None), dict) else [])
        todo.extend([getattr(e, "controller_failure", None), getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


def _check_resources(cfg: TrainConfig, use_gpu: bool) -> None:
    from raycp import runtime

    total = runtime.cluster_cpus()
    need = cfg.compute.num_workers * cfg.compute.cpus_per_worker
    spare = cfg.compute.data_cpus if cfg.compute.reader == "ray_data" else 0.0
    if need + spare > total + 1e-9:
        if not runtime.cluster_may_grow():
            raise ConfigError(f"{cfg.compute.num_workers} workers × {cfg.compute.cpus_per_worker} CPU + "
                              f"{spare} CPU for Ray Data reads > the cluster's {total:g} CPUs",
                              fix="lower compute.num_workers or compute.cpus_per_worker (or compute.data_cpus)")
        runtime.notice(f"{cfg.compute.num_workers} workers × {cfg.compute.cpus_per_worker} CPU + {spare} CPU for "
                       f"reads and the cluster has {total:g} CPUs now: training waits for its autoscaler to add nodes "
                       "(a cluster without one never will: stop the job and lower compute.num_workers)")
    if use_gpu:
        gpus = runtime.cluster_gpus()
        if gpus < cfg.compute.num_workers:
            if not runtime.cluster_may_grow():
                raise ConfigError(f"{cfg.compute.num_workers} GPU workers but the cluster has {gpus:g} GPUs",
                                  fix="lower compute.num_workers or add GPU nodes")
            runtime.notice(f"{cfg.compute.num_workers} GPU workers and the cluster has {gpus:g} GPUs now: training "
                           "waits for its autoscaler to add GPU nodes (a cluster without one never will: stop the job and "
                           "lower compute.num_workers)")


def uses_gpu(cfg: TrainConfig) -> bool:
    """Whether the workers train on GPUs: ``compute.use_gpu``, or by default when the connected
    cluster has (or can grow to) a GPU per worker."""
    from raycp import runtime

    if cfg.compute.use_gpu is not None:
        return cfg.compute.use_gpu
    return runtime.cluster_gpus() >= cfg.compute.num_workers


def default_run_config(cfg: TrainConfig, callbacks: list | None = None):
    """``raycp train``'s Ray Train ``RunConfig``: storage ``<output>/train`` (through
    :func:`raycp.runtime.train_storage`, the same filesystem and S3 settings as every other read
    and write), name ``cfg.name``, ``FailureConfig(max_failures)``, ``CheckpointConfig(num_to_keep)``
    and ``callbacks`` (a Tune trial passes ``TuneReportCallback``). A second run with the same
    storage and name resumes from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from raycp import runtime

    storage_path, storage_fs = runtime.train_storage(train_dir(cfg))
    return RunConfig(storage_path=storage_path, storage_filesystem=storage_fs, name=cfg.name,
                     failure_config=FailureConfig(max_failures=cfg.compute.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.compute.keep_checkpoints),
                     callbacks=list(callbacks or []))


def build_trainer(cfg: TrainConfig, run_config=None, *, prep: Prepared | None = None,
                  inject_failure: dict | None = None):
    """A ``ray.train.torch.TorchTrainer`` of the paper's recipe for ``cfg``, not started.

    ``run_config``: where checkpoints go, the run's name and callbacks — :func:`default_run_config`
    when None; a Tune trial or a job passes its own. The run's own files (``config.yaml``,
    ``split.parquet``, and after :func:`finish` the model and reports) and the resume checks use
    ``<cfg.output>/train``: give each trial its own ``output`` (``apply_overrides(cfg, {"output":
    trial_dir})``), whatever its ``run_config``. Checks every input first (crops, classes,
    split, the latest checkpoint and ``resume_from``, the ImageNet file, the cluster's CPUs and
    GPUs: :class:`InputError` / :class:`ConfigError`), then writes ``<output>/train/config.yaml``
    and ``split.parquet``. Needs a Ray connection (:func:`raycp.runtime.connection`).
    ``inject_failure`` is a test hook (see ``loop._maybe_fail``)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from raycp import runtime
    from raycp.config import save_resolved
    from raycp.train.loop import WorkerSpec, fingerprint, train_loop_per_worker

    prep = prep if prep is not None else prepare(cfg)
    out = train_dir(cfg)
    urls.ensure_writable(out)
    latest = _check_latest_checkpoint(cfg)
    resume_state = _resume_state(cfg, latest)
    fresh = latest is None and resume_state is None
    imagenet = _imagenet(cfg, len(prep.classes)) if fresh else None
    init = init_tensors(cfg, prep.init_info) if fresh and prep.init_info else None
    ray = runtime.connection()
    use_gpu = uses_gpu(cfg)
    _check_resources(cfg, use_gpu)

    save_resolved(cfg, out)
    buf = io.BytesIO()
    split_table(prep).to_parquet(buf, index=False)
    urls.atomic_write_bytes(urls.join(out, "split.parquet"), buf.getvalue())

    val = S.validation_subset(prep.val_sids, max_cells=cfg.split.val_max_cells, seed=cfg.seed)
    source = D.CropSource(files=prep.crops.files, column=prep.crops.crop_column, shape=prep.crops.shape,
                          locations=prep.crops.locations(), reader=cfg.compute.reader, data_cpus=cfg.compute.data_cpus)
    spec = WorkerSpec(cfg=cfg.model_dump(mode="json"), classes=prep.classes, source=source,
                      train_sids=prep.train_sids, train_codes=prep.codes[prep.train_sids],
                      val_sids=val, val_codes=prep.codes[val], fingerprint=fingerprint(cfg.science()),
                      imagenet=imagenet, resume_state=resume_state, inject_failure=inject_failure,
                      init=init, arch_args=(prep.init_info or {}).get("arch_args") or None,
                      normalization=resolved_normalization(cfg, prep.init_info),
                      train_groups=None if prep.groups is None else prep.groups[prep.train_sids],
                      train_domains=None if prep.domains is None else prep.domains[prep.train_sids],
                      n_domains=prep.n_domains)
    resources = {"CPU": cfg.compute.cpus_per_worker, **cfg.compute.resources}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": ray.put(spec)},
        scaling_config=ScalingConfig(num_workers=cfg.compute.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=run_config if run_config is not None else default_run_config(cfg),
    )


def run_trainer(trainer):
    """``trainer.fit()``; the raycp error inside a failed run (bad input met by a worker) is
    raised as itself, so the user sees one line. Returns the Ray Train ``Result``."""
    try:
        result = trainer.fit()
    except Exception as exc:
        inner = _unwrap(exc)
        if inner is not None:
            raise inner from None
        raise
    if result.error is not None:
        inner = _unwrap(result.error)
        raise inner if inner is not None else result.error
    return result


def fit(cfg: TrainConfig, *, inject_failure: dict | None = None, export: bool = True) -> TrainResult:
    """Train (or resume) and export: :func:`build_trainer` → :func:`run_trainer` → :func:`finish`.
    ``inject_failure`` is a test hook (see ``loop._maybe_fail``)."""
    prep = prepare(cfg)
    result = run_trainer(build_trainer(cfg, prep=prep, inject_failure=inject_failure))
    return finish(cfg, prep, result, export=export)


def finish(cfg: TrainConfig, prep: Prepared, result, *, export: bool = True) -> TrainResult:
    """From a finished Ray Train ``Result``: the final state, the exported model
    (``<output>/train/model``, :func:`export_model`) and the metrics reports."""
    from raycp.train import metrics as M
    from raycp.train.loop import load_state

    final = result.checkpoint
    out = train_dir(cfg)
    if final is None:
        raise StorageError(f"{out}: the run reported no checkpoint", fix="check the Ray Train logs")
    with final.as_directory() as folder:
        state = load_state(folder, where=final.path)
    model_dir = RunLayout(cfg.output).model
    if export:
        export_model(state, prep, model_dir)
    title = f"{cfg.model.arch}, {cfg.split.strategy}, {cfg.compute.num_workers} worker(s)"
    reports = M.write_reports(state["history"], prep.classes, out, controls=prep.controls, title=title)
    return TrainResult(history=state["history"], classes=prep.classes, model_dir=model_dir, train_dir=out,
                       reports=reports, summary=prep.summary(), checkpoint=final.path)


# ------------------------------------------------------------------------------- export


def export_model(state: dict, prep: Prepared, folder: str) -> dict:
    """``model.safetensors`` (float32 timm state dict) + ``model.json`` for the extraction stage."""
    from raycp import __version__
    from raycp.models.network import DEFAULT_LAYER

    cfg, init_info = prep.cfg, prep.init_info
    norm = resolved_normalization(cfg, init_info)
    info = {
        "format": "raycp.train/1",
        "arch": cfg.model.arch,
        "num_classes": len(prep.classes),
        "classes": prep.classes,
        "controls": sorted(prep.controls),
        "label": cfg.label,
        "channels": list(cfg.channels),
        "in_chans": len(cfg.channels),
        "crop_size": int(prep.crops.shape[1]),
        "normalization": PRESETS[norm],
        "feature_layer": DEFAULT_LAYER,
        "epochs_trained": int(state["epoch"]) + 1,
        "split": cfg.split.strategy,
        "seed": cfg.seed,
        "imagenet_init": bool(cfg.model.imagenet_weights),
        "stem": cfg.model.stem,
        **({"formulation": cfg.formulation} if cfg.formulation != "classification" else {}),
        "final_metrics": {k: v for k, v in (state["history"][-1] if state["history"] else {}).items()
                          if k in ("epoch", "lr")} | {
            f"{part}_{key}": (state["history"][-1][part] or {}).get(key)
            for part in ("train", "val") for key in ("loss", "accuracy", "macro_f1")
            if state["history"] and state["history"][-1].get(part)},
        "raycp_version": __version__,
    }
    if init_info:
        info["init"] = {"path": cfg.model.init, "source": init_info.get("source")}
        if init_info.get("arch_args"):
            info["arch_args"] = init_info["arch_args"]
    return write_model(folder, state["model"], info)
