"""Training data: crop shards -> splits -> balanced epochs -> per-rank batches -> augmentations.

Pure cores (unit-tested without Ray) and, at the end, the Ray Data adapter that streams crops to
each Ray Train worker.

**Crop shards** (``raycp preprocess``): Parquet files with a column of uint8 C×S×S crops (S = 128
in the paper; raw bytes with ``raycp.crop_shape`` in the schema, or a tensor type) and
``Metadata_*`` columns (plate, well, site, treatment, ...). The driver reads only
the metadata columns and the row-group layout (:func:`read_crop_metadata`); a crop is addressed by
its *sid*, its row number in the concatenation of the shards (sorted by path).

**Balanced epochs** (paper Methods, "Training cell painting models"): every epoch draws, for each
class, the *median* number of training cells per class — without replacement from classes at or
above the median, with replacement from smaller ones — then shuffles globally
(:func:`balanced_epoch`). The draw is a pure function of ``(seed, epoch)``: a restarted run redraws
exactly the same epochs, which is what makes a resumed run bitwise identical to an uninterrupted
one. Samples go to ranks round-robin; every rank runs the same number of steps,
``min_r ⌊n_r / batch⌋`` (drop-last): uneven batch counts deadlock DDP's all-reduce (ray#66085).

**Crop normalisation** (:func:`raycp.models.normalize.normalize`), per crop and per channel, as DeepProfiler has done
since its 2024 TF2 crop generator (``fold_channels`` in ``plugins/crop_generators``; before that it
divided each crop by its maximum, or by 255)::

    x = pixel / 255;   x' = (x − mean_c) / max(std_c, eps)

with mean and (population) standard deviation over the S×S pixels of channel c of that crop, and
``eps = 1e-6`` so that an empty channel becomes zeros instead of NaN (DeepProfiler has no floor).
It removes every absolute intensity difference between crops, so brightness batch effects cannot be
learnt from the mean level; the extraction stage must apply the same function (``model.json``
records it).

**Augmentations** (paper Methods, "Data augmentation"; DeepProfiler ``imaging/augmentations.py``),
applied to the normalised batch on the training device, in this order: with probability 0.5 a
random square crop of side U{⌈0.8·S⌉..S} at a random position, resized back to S×S (bilinear,
half-pixel centres, as TF's ``random_crop`` + ``resize``); a horizontal flip with p 0.5 and a
rotation by k·90°, k ~ U{0..3}; per channel ``x + Δ`` with Δ ~ U(−0.1, 0.1), then a contrast
factor f ~ U(0.8, 1.2) about the channel mean (TF's ``adjust_brightness``/``adjust_contrast``).
There is no renormalisation afterwards: it would undo the brightness and contrast changes.
Random numbers come from a CPU ``torch.Generator`` seeded by ``(seed, epoch, rank, step)``, so
they do not depend on the device or on where a run was restarted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.preprocess.crops import shard_urls, tensor_to_numpy

logger = logging.getLogger(__name__)

PLATE, WELL, SITE = "Metadata_Plate", "Metadata_Well", "Metadata_Site"
IS_CONTROL, TOUCHES_BORDER = "Metadata_IsControl", "Metadata_TouchesBorder"
#: Parquet schema metadata keys a crop writer may use to declare its tensor layout.
_SHAPE_KEYS = (b"raycp.crop_shape", b"crop_shape")
_CHANNEL_KEYS = (b"raycp.channels", b"channels")


# --------------------------------------------------------------------------------------- seeds


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, platforms and Python versions)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


# Stream tags keep the random streams of different uses independent.
STREAM_PLAN, STREAM_SPLIT, STREAM_AUGMENT, STREAM_TORCH, STREAM_VAL = 1, 2, 3, 4, 5


# ------------------------------------------------------------------------------ crop metadata


@dataclass
class CropSet:
    """The crop shards as the driver sees them: files, one metadata row per crop, tensor layout."""

    files: list[str]
    meta: pd.DataFrame  # Metadata_* columns + _file, _rg, _row (row inside its row group)
    crop_column: str
    shape: tuple[int, int, int]  # C, S, S
    channels: list[str] | None = None

    def locations(self) -> dict[str, np.ndarray]:
        """Compact arrays for the workers: sid -> (file, row group, row in row group)."""
        return {"file": self.meta["_file"].to_numpy(np.int32), "rg": self.meta["_rg"].to_numpy(np.int32),
                "row": self.meta["_row"].to_numpy(np.int32)}


#: Parquet files a stage writes beside its shards that are not crop shards.
_NOT_SHARDS = {"manifest.parquet", "ledger.parquet", "summary.parquet", "split.parquet"}


def list_crop_files(url: str) -> list[str]:
    """The crop shards of a folder — from its ``manifest.parquet`` when ``raycp preprocess crops``
    wrote one (:func:`raycp.preprocess.crops.shard_urls`), else every ``.parquet`` below it
    (sorted) — or the file itself."""
    fs, path = urls.filesystem(url)
    if fs.isfile(path):
        return [url]
    if not fs.exists(path):
        raise InputError(f"{url}: crop shards not found", fix="point crops at the folder written by `raycp preprocess`")
    if fs.exists(path.rstrip("/") + "/manifest.parquet"):
        return shard_urls(url)
    found = sorted(p for p in fs.find(path) if p.endswith(".parquet") and p.rsplit("/", 1)[-1] not in _NOT_SHARDS
                   and not any(part.startswith((".", "_")) for part in p[len(path):].split("/") if part))
    if not found:
        raise InputError(f"{url}: no .parquet crop shards in this folder",
                         fix="point crops at the folder written by `raycp preprocess`")
    proto = urls.protocol_of(url)
    return [p if proto == "file" else f"{proto}://{p}" for p in found]


def _register_tensor_types() -> None:
    """Ray Data writes numpy columns as Arrow extension tensors; register them if ray is here."""
    try:
        import ray.air.util.tensor_extensions.arrow  # noqa: F401
    except Exception:  # noqa: BLE001 - ray absent: plain list/binary columns still work
        pass


def _open_parquet(url: str):
    import pyarrow.parquet as pq

    fs, path = urls.filesystem(url)
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise InputError(f"{url}: crop shard not found", fix="re-run `raycp preprocess`") from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{url}: not a readable Parquet crop shard ({type(exc).__name__}: {exc})",
                         fix="re-run `raycp preprocess` for this shard") from None


def _detect_crop_column(schema, url: str, wanted: str | None) -> str:
    import pyarrow as pa

    names = schema.names
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{url}: no crop column {wanted!r} (columns: {', '.join(names)})",
                             fix="set crop_column to the tensor column of the shards")
        return wanted
    candidates = [n for n in names if not n.startswith("Metadata_") and not n.startswith("__")
                  and (isinstance(schema.field(n).type, pa.BaseExtensionType)
                       or pa.types.is_binary(schema.field(n).type) or pa.types.is_large_binary(schema.field(n).type)
                       or pa.types.is_fixed_size_binary(schema.field(n).type)
                       or pa.types.is_list(schema.field(n).type) or pa.types.is_large_list(schema.field(n).type)
                       or pa.types.is_fixed_size_list(schema.field(n).type))]
    if len(candidates) != 1:
        raise InputError(f"{url}: cannot tell the crop tensor column among {candidates or names}",
                         fix="set crop_column in the train config")
    return candidates[0]


def _schema_shape(schema) -> tuple[int, ...] | None:
    meta = schema.metadata or {}
    for key in _SHAPE_KEYS:
        if key in meta:
            text = meta[key].decode().strip("[]() ")
            return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    return None


def _schema_channels(schema) -> list[str] | None:
    import json

    meta = schema.metadata or {}
    for key in _CHANNEL_KEYS:
        if key in meta:
            raw = meta[key].decode()
            try:
                value = json.loads(raw)
            except ValueError:
                value = [c.strip() for c in raw.split(",") if c.strip()]
            return [str(c) for c in value]
    return None


def read_crop_metadata(url: str, *, label: str, crop_column: str | None = None,
                       extra: tuple[str, ...] = ()) -> CropSet:
    """Metadata columns and row-group layout of every crop shard (no pixels are read but one crop)."""
    _register_tensor_types()
    files = list_crop_files(url)
    frames, column, shape, channels = [], None, None, None
    for i, f in enumerate(files):
        pf = _open_parquet(f)
        schema = pf.schema_arrow
        col = _detect_crop_column(schema, f, crop_column or column)
        column = column or col
        if label not in schema.names:
            raise InputError(f"{f}: crop shard has no label column {label!r}",
                             fix=f"crop a screen index with {label} (raycp screen build / index build --platemap) "
                                 "or set label to the column holding the treatments")
        meta_cols = [n for n in schema.names if n.startswith("Metadata_") or n in extra]
        table = pf.read(columns=meta_cols)
        frame = table.to_pandas()
        rg_sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        frame["_file"] = i
        frame["_rg"] = np.repeat(np.arange(len(rg_sizes), dtype=np.int32), rg_sizes)
        frame["_row"] = np.concatenate([np.arange(s, dtype=np.int32) for s in rg_sizes]) if rg_sizes else []
        if len(frame) and shape is None:
            first = pf.read_row_group(0, columns=[column]).column(column).slice(0, 1)
            shape = tensor_to_numpy(first, _schema_shape(schema)).shape[1:]
            channels = _schema_channels(schema)
        frames.append(frame)
    meta = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if meta.empty:
        raise InputError(f"{url}: the crop shards hold no crops", fix="check the preprocess stage's ledger")
    missing = meta[label].isna() | (meta[label].astype(str).str.strip() == "")
    if missing.any():
        where = meta.loc[missing, [c for c in (PLATE, WELL) if c in meta.columns]].drop_duplicates().head(3)
        raise InputError(f"{url}: {int(missing.sum())} crops have no {label} (e.g. {where.to_dict('records')})",
                         fix="give every well a treatment in the platemap, or filter those crops out")
    meta[label] = meta[label].astype(str)
    return CropSet(files=files, meta=meta, crop_column=column, shape=tuple(int(v) for v in shape),
                   channels=channels)


# -------------------------------------------------------------------------------- classes


def encode_labels(meta: pd.DataFrame, label: str, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class codes per crop and the class list (sorted labels by default). Controls are classes."""
    labels = meta[label].astype(str)
    present = sorted(labels.unique())
    if classes is None:
        classes = present
    else:
        classes = [str(c) for c in classes]
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise InputError(f"crops carry labels that are not in classes: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''}",
                             fix="add them to classes, or leave classes unset to use every label")
    codes = pd.Categorical(labels, categories=classes).codes.astype(np.int32)
    counts = np.bincount(codes, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise InputError(f"class {empty[0]!r} has zero cells in the crop shards"
                         f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}",
                         fix="remove it from classes, or crop the wells of that treatment")
    if len(classes) < 2:
        raise InputError(f"only {len(classes)} class in the crop shards", fix="train on at least two treatments")
    return codes, classes


# --------------------------------------------------------------------------------- splits


def _wells(meta: pd.DataFrame) -> pd.Series:
    for col in (PLATE, WELL):
        if col not in meta.columns:
            raise InputError(f"crop shards have no {col} column", fix="crop a screen index with plate and well metadata")
    return meta[PLATE].astype(str) + "/" + meta[WELL].astype(str)


def split_leave_cells_out(meta: pd.DataFrame, *, train_fraction: float, seed: int) -> np.ndarray:
    """``is_val`` per crop: in every well a random ``1 − train_fraction`` of its cells (paper: ~40 %)."""
    wells = _wells(meta)
    key = np.random.default_rng(derive_seed(seed, STREAM_SPLIT)).random(len(meta))
    order = pd.Series(key).groupby(wells.to_numpy()).rank(method="first").to_numpy() - 1
    sizes = wells.map(wells.value_counts()).to_numpy()
    n_train = np.maximum(1, np.rint(sizes * train_fraction)).astype(int)
    n_train = np.where(sizes > 1, np.minimum(n_train, sizes - 1), n_train)  # ≥1 cell each side when possible
    return order >= n_train


def split_leave_plates_out(meta: pd.DataFrame, codes: np.ndarray, classes: list[str], *,
                           val_plates: list[str] | None, min_val_wells: int, seed: int) -> np.ndarray:
    """``is_val`` per crop: whole plates held out, chosen so that every class keeps at least
    ``min_val_wells`` wells in validation and at least one well in training (paper Fig. 2A)."""
    wells = _wells(meta)
    plates = meta[PLATE].astype(str).to_numpy()
    table = pd.DataFrame({"plate": plates, "well": wells.to_numpy(), "cls": codes}).drop_duplicates()
    per_plate = {p: np.bincount(g["cls"].to_numpy(), minlength=len(classes)) for p, g in table.groupby("plate")}
    all_plates = sorted(per_plate)
    if len(all_plates) < 2:
        raise InputError(f"leave-plates-out needs at least 2 plates, the crops have {len(all_plates)}",
                         fix="use split.strategy=leave_cells_out")
    if val_plates is not None:
        unknown = sorted(set(val_plates) - set(all_plates))
        if unknown:
            raise InputError(f"split.val_plates {unknown} are not plates of the crops ({all_plates})",
                             fix="list plates that exist")
        chosen = list(val_plates)
    else:
        rng = np.random.default_rng(derive_seed(seed, STREAM_SPLIT, 1))
        order = [all_plates[i] for i in rng.permutation(len(all_plates))]
        chosen, have = [], np.zeros(len(classes), dtype=int)
        while (have < min_val_wells).any() and len(chosen) < len(all_plates) - 1:
            deficit = np.maximum(min_val_wells - have, 0)
            gains = [(np.minimum(per_plate[p], deficit).sum(), -i, p) for i, p in enumerate(order) if p not in chosen]
            best = max(gains)
            if best[0] == 0:
                break
            chosen.append(best[2])
            have = have + per_plate[best[2]]
    val_wells = sum((per_plate[p] for p in chosen), np.zeros(len(classes), dtype=int))
    train_wells = sum((per_plate[p] for p in all_plates if p not in chosen), np.zeros(len(classes), dtype=int))
    short = [classes[i] for i in np.flatnonzero(val_wells < min_val_wells)]
    if short:
        raise InputError(f"leave-plates-out: {len(short)} class(es) have fewer than {min_val_wells} validation wells "
                         f"on held-out plates {chosen} (e.g. {short[:3]})",
                         fix="set split.min_val_wells lower, list split.val_plates, or use leave_cells_out")
    untrained = [classes[i] for i in np.flatnonzero(train_wells == 0)]
    if untrained:
        raise InputError(f"leave-plates-out: class(es) {untrained[:3]} have no training wells once plates "
                         f"{chosen} are held out", fix="list other split.val_plates, or use leave_cells_out")
    return np.isin(plates, chosen)


def split_from_column(meta: pd.DataFrame, column: str) -> np.ndarray:
    if column not in meta.columns:
        raise InputError(f"crop shards have no split column {column!r}", fix="add it, or use another split.strategy")
    values = meta[column].astype(str).str.strip().str.lower()
    train = values.isin(["train", "training"])
    val = values.isin(["val", "valid", "validation"])
    bad = ~(train | val)
    if bad.any():
        raise InputError(f"split column {column!r} has values other than train/val: {sorted(values[bad].unique())[:5]}",
                         fix="write train or val in every row")
    return val.to_numpy()


def assign_split(meta: pd.DataFrame, codes: np.ndarray, classes: list[str], split, seed: int) -> np.ndarray:
    """``is_val`` per crop for ``split`` (a :class:`~raycp.train.config.SplitSection`); checks that
    every class keeps training cells."""
    if split.strategy == "leave_cells_out":
        is_val = split_leave_cells_out(meta, train_fraction=split.train_fraction, seed=seed)
    elif split.strategy == "leave_plates_out":
        is_val = split_leave_plates_out(meta, codes, classes, val_plates=split.val_plates,
                                        min_val_wells=split.min_val_wells, seed=seed)
    else:
        is_val = split_from_column(meta, split.column)
    n_train = np.bincount(codes[~is_val], minlength=len(classes))
    empty = [c for c, n in zip(classes, n_train) if n == 0]
    if empty:
        raise InputError(f"class {empty[0]!r} has zero training cells after the {split.strategy} split",
                         fix="crop more cells of that treatment or change the split")
    return is_val


# ------------------------------------------------------------------------- balanced epochs


def balanced_counts(codes: np.ndarray, n_classes: int) -> tuple[np.ndarray, int]:
    """Training cells per class and the per-class draw (the median, at least 1)."""
    counts = np.bincount(codes, minlength=n_classes)
    if (counts == 0).any():
        raise InputError(f"class {int(np.flatnonzero(counts == 0)[0])} has zero training cells",
                         fix="every class needs training cells")
    return counts, max(1, int(np.median(counts)))


def balanced_epoch(codes: np.ndarray, n_classes: int, *, seed: int, epoch: int) -> np.ndarray:
    """Indices into ``codes`` for one epoch: per class the median count (without replacement for
    classes at or above it, with replacement below), globally shuffled; a pure function of
    ``(seed, epoch)``."""
    counts, per_class = balanced_counts(codes, n_classes)
    rng = np.random.default_rng(derive_seed(seed, STREAM_PLAN, epoch))
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for c in range(n_classes):
        members = order[starts[c]:starts[c + 1]]
        replace = counts[c] < per_class
        parts.append(members[rng.choice(counts[c], size=per_class, replace=replace)])
    drawn = np.concatenate(parts)
    return drawn[rng.permutation(len(drawn))]


def steps_per_epoch(n_samples: int, world: int, batch: int, cap: int | None = None) -> int:
    """Equal steps on every rank: ``min_r ⌊n_r / batch⌋`` with round-robin shares (drop-last)."""
    steps = (n_samples // world) // batch
    return min(steps, cap) if cap else steps


@dataclass(frozen=True)
class EpochPlan:
    """What one rank trains on in one epoch: ``sids`` (steps × batch, in order) and their labels."""

    epoch: int
    rank: int
    world: int
    steps: int
    batch: int
    sids: np.ndarray
    labels: np.ndarray
    digest: str  # sha1 of the global draw: equal on every rank and after a restart

    def state(self) -> dict:
        return {"epoch": self.epoch, "rank": self.rank, "world": self.world, "steps": self.steps,
                "batch": self.batch, "samples": int(len(self.sids)), "digest": self.digest}


def plan_epoch(train_sids: np.ndarray, train_codes: np.ndarray, n_classes: int, *, seed: int, epoch: int,
               rank: int, world: int, batch: int, max_steps: int | None = None) -> EpochPlan:
    drawn = balanced_epoch(train_codes, n_classes, seed=seed, epoch=epoch)
    steps = steps_per_epoch(len(drawn), world, batch, max_steps)
    mine = drawn[rank::world][: steps * batch]
    digest = hashlib.sha1(np.ascontiguousarray(train_sids[drawn]).tobytes()).hexdigest()
    return EpochPlan(epoch=epoch, rank=rank, world=world, steps=steps, batch=batch,
                     sids=train_sids[mine], labels=train_codes[mine], digest=digest)


def validation_subset(val_sids: np.ndarray, *, max_cells: int | None, seed: int) -> np.ndarray:
    """A fixed random subset of validation crops (the same every epoch), in sid order."""
    if max_cells is None or len(val_sids) <= max_cells:
        return np.sort(val_sids)
    rng = np.random.default_rng(derive_seed(seed, STREAM_VAL))
    return np.sort(rng.choice(val_sids, size=max_cells, replace=False))


# --------------------------------------------------------------- normalisation, augmentation


@dataclass
class AugmentParams:
    """Per-sample random draws of one batch (CPU tensors)."""

    crop: object  # bool N
    boxes: object  # float N×4 (x0, y0, x1, y1) in pixels
    flip: object  # bool N
    rot: object  # int N in 0..3
    brightness: object  # float N×C
    contrast: object  # float N×C


def draw_augment(n: int, channels: int, size: int, cfg, generator) -> AugmentParams:
    """Draw a batch's augmentation parameters from ``generator`` (always in the same order)."""
    import torch

    g = generator
    crop = torch.rand(n, generator=g) < cfg.crop_prob
    lo = min(size, max(1, math.ceil(cfg.crop_min * size)))
    side = torch.randint(lo, size + 1, (n,), generator=g)
    fx, fy = torch.rand(n, generator=g), torch.rand(n, generator=g)
    x0 = torch.floor(fx * (size - side + 1)).clamp(max=size - side)
    y0 = torch.floor(fy * (size - side + 1)).clamp(max=size - side)
    boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1).to(torch.float32)
    flip = torch.rand(n, generator=g) < 0.5
    rot = torch.randint(0, 4, (n,), generator=g)
    b = cfg.brightness
    brightness = (torch.rand(n, channels, generator=g) * 2 - 1) * b
    c_lo, c_hi = cfg.contrast
    contrast = c_lo + torch.rand(n, channels, generator=g) * (c_hi - c_lo)
    if not cfg.flip:
        flip = torch.zeros_like(flip)
    if not cfg.rot90:
        rot = torch.zeros_like(rot)
    return AugmentParams(crop=crop, boxes=boxes, flip=flip, rot=rot, brightness=brightness, contrast=contrast)


def apply_augment(x, p: AugmentParams):
    """Apply :class:`AugmentParams` to a normalised float batch N×C×S×S (any device)."""
    import torch
    import torch.nn.functional as F

    dev = x.device
    n, _, h, w = x.shape
    x = x.clone()
    if bool(p.crop.any()):
        idx = torch.nonzero(p.crop, as_tuple=False).flatten()
        x[idx.to(dev)] = F.grid_sample(x[idx.to(dev)], _crop_grid(p.boxes[idx], h, w).to(dev, x.dtype),
                                       mode="bilinear", padding_mode="border", align_corners=False)
    if bool(p.flip.any()):
        f = p.flip.to(dev)
        x[f] = x[f].flip(-1)
    for k in (1, 2, 3):
        sel = p.rot == k
        if bool(sel.any()):
            s = sel.to(dev)
            x[s] = torch.rot90(x[s], k, dims=(2, 3))
    x = x + p.brightness.to(dev, x.dtype)[:, :, None, None]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * p.contrast.to(dev, x.dtype)[:, :, None, None] + mean


def _crop_grid(boxes, h: int, w: int):
    """``grid_sample`` grid resizing each box ``(x0, y0, x1, y1)`` to ``h×w``: bilinear with
    half-pixel centres, source coordinates clamped inside the box (= cropping the window, then
    ``F.interpolate(..., align_corners=False)``, i.e. TF's ``random_crop`` + ``resize``)."""
    import torch

    def axis(lo, hi, n, size):
        j = torch.arange(n, dtype=torch.float64)
        src = lo[:, None] + (j[None] + 0.5) * ((hi - lo)[:, None] / n) - 0.5
        src = torch.maximum(torch.minimum(src, hi[:, None] - 1), lo[:, None])
        return (2 * src + 1) / size - 1

    b = boxes.to(torch.float64)
    gx, gy = axis(b[:, 0], b[:, 2], w, w), axis(b[:, 1], b[:, 3], h, h)
    return torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], dim=-1).to(torch.float32)


def augment_generator(seed: int, epoch: int, rank: int, step: int):
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, STREAM_AUGMENT, epoch, rank, step))


# ---------------------------------------------------------------------- reading crop rows


def row_group_items(sids: np.ndarray, locations: dict[str, np.ndarray]) -> list[dict]:
    """Group unique ``sids`` by (file, row group): one read item each (rows and sids as bytes)."""
    sids = np.unique(sids)
    f, g, r = locations["file"][sids], locations["rg"][sids], locations["row"][sids]
    order = np.lexsort((r, g, f))
    sids, f, g, r = sids[order], f[order], g[order], r[order]
    if not len(sids):
        return []
    cut = np.flatnonzero((np.diff(f) != 0) | (np.diff(g) != 0)) + 1
    items = []
    for lo, hi in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(sids)]])):
        items.append({"file": int(f[lo]), "rg": int(g[lo]),
                      "rows": r[lo:hi].astype(np.int32).tobytes(), "sids": sids[lo:hi].astype(np.int64).tobytes()})
    return items


def read_row_group_rows(url: str, rg: int, rows: np.ndarray, *, column: str,
                        shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The crops at ``rows`` of row group ``rg`` of one shard (uint8 k×C×S×S)."""
    _register_tensor_types()
    pf = _open_parquet(url)
    col = pf.read_row_group(rg, columns=[column]).column(column)
    import pyarrow as pa

    taken = col.take(pa.array(rows, type=pa.int32()))
    return tensor_to_numpy(taken, shape)


class _ReadItems:
    """Ray Data ``map_batches`` callable: read items -> ``{"sid": k, "crop": k×C×S×S}``."""

    def __init__(self, files: list[str], column: str, shape: tuple[int, ...]) -> None:
        self.files, self.column, self.shape = files, column, tuple(shape)

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa

        _register_tensor_types()
        sids, crops, opened = [], [], {}
        for f, g, rows, s in zip(batch["file"], batch["rg"], batch["rows"], batch["sids"]):
            f = int(f)
            if f not in opened:  # one open (and footer parse) per shard and call
                opened = {f: _open_parquet(self.files[f])}
            col = opened[f].read_row_group(int(g), columns=[self.column]).column(self.column)
            taken = col.take(pa.array(np.frombuffer(rows, dtype=np.int32), type=pa.int32()))
            crops.append(tensor_to_numpy(taken, self.shape))
            sids.append(np.frombuffer(s, dtype=np.int64))
        if not crops:
            return {"sid": np.zeros(0, np.int64), "crop": np.zeros((0, *self.shape), np.uint8)}
        return {"sid": np.concatenate(sids), "crop": np.concatenate(crops)}


@dataclass
class CropSource:
    """Where the crops are and how a worker reads them (picklable; sent to every worker)."""

    files: list[str]
    column: str
    shape: tuple[int, int, int]
    locations: dict[str, np.ndarray]
    reader: str = "ray_data"
    data_cpus: float = 0.5
    threads: int = 4

    def load(self, sids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(unique sids sorted, crops in that order)`` for ``sids`` (duplicates read once)."""
        items = row_group_items(sids, self.locations)
        uniq = np.unique(sids)
        out = np.empty((len(uniq), *self.shape), dtype=np.uint8)
        if not items:
            return uniq, out
        reader = _ReadItems(self.files, self.column, self.shape)
        if self.reader == "local":
            chunks = [items[i:i + 8] for i in range(0, len(items), 8)]
            with ThreadPoolExecutor(self.threads) as pool:
                results = list(pool.map(lambda ch: reader({k: [it[k] for it in ch] for k in ch[0]}), chunks))
        else:
            results = _load_with_ray_data(items, reader, self.data_cpus)
        filled = 0
        for res in results:
            pos = np.searchsorted(uniq, res["sid"])
            out[pos] = res["crop"]
            filled += len(pos)
        if filled != len(uniq):
            raise InputError(f"read {filled} of {len(uniq)} crops from the shards", fix="re-run `raycp preprocess`")
        return uniq, out


def _load_with_ray_data(items: list[dict], reader: _ReadItems, data_cpus: float) -> list[dict]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    ds = ds.map_batches(reader, batch_size=16, batch_format="numpy", num_cpus=data_cpus)
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


@dataclass
class RankLoader:
    """One rank's batches, in plan order.

    The crops an epoch needs are read (Ray Data) in windows of at most ``max_cached`` crops; the
    next window — or the next epoch's first — is read in a background thread while the current
    one trains. Crops stay cached across epochs while the cache holds at most ``max_cached``:
    every epoch redraws cells from the same pool, so a screen whose crops fit in memory is read
    once and later epochs only read the cells they have not met yet. Beyond that, each window
    keeps only its own crops (every epoch reads again)."""

    source: CropSource
    max_cached: int = 32_768
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1), repr=False)
    _pending: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cache: tuple = field(default=None, repr=False)

    def windows(self, plan: EpochPlan) -> list[np.ndarray]:
        per = max(plan.batch, (self.max_cached // plan.batch) * plan.batch)
        return [plan.sids[i:i + per] for i in range(0, len(plan.sids), per)]

    def _load(self, sids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted unique sids, crops)`` covering ``sids``: cached ones plus a read of the rest."""
        need = np.unique(sids)
        with self._lock:
            cached = self._cache
        missing = need if cached is None else need[~np.isin(need, cached[0])]
        fresh = self.source.load(missing) if len(missing) else None
        with self._lock:
            parts = [p for p in (self._cache, fresh) if p is not None]
            all_s = np.concatenate([p[0] for p in parts])
            if len(all_s) > self.max_cached:  # over budget: keep this window's crops only
                parts = [(p[0][np.isin(p[0], need)], p[1][np.isin(p[0], need)]) for p in parts]
                all_s = np.concatenate([p[0] for p in parts])
            all_s, first = np.unique(all_s, return_index=True)
            crops = parts[0][1] if len(parts) == 1 and len(first) == len(parts[0][0]) else \
                np.concatenate([p[1] for p in parts])[first]
            self._cache = (all_s, crops)
            return self._cache

    def _fetch(self, key, sids: np.ndarray) -> Future:
        fut = self._pending.pop(key, None)
        if fut is None:
            fut = self._pool.submit(self._load, sids)
        return fut

    def prefetch(self, key, sids: np.ndarray) -> None:
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._load, sids)

    def batches(self, plan: EpochPlan, next_plan: EpochPlan | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``plan.steps`` batches of ``(uint8 crops B×C×S×S, int64 labels B)`` in plan order."""
        wins = self.windows(plan)
        upcoming = [((plan.epoch, i), w) for i, w in enumerate(wins)]
        if next_plan is not None and next_plan.steps:
            upcoming.append(((next_plan.epoch, 0), self.windows(next_plan)[0]))
        pos = 0
        for i, (key, sids) in enumerate(upcoming[: len(wins)]):
            fut = self._fetch(key, sids)
            if i + 1 < len(upcoming):
                self.prefetch(*upcoming[i + 1])
            uniq, crops = fut.result()
            slots = np.searchsorted(uniq, sids)
            for b in range(0, len(sids), plan.batch):
                sel = slots[b:b + plan.batch]
                yield crops[sel], plan.labels[pos + b: pos + b + plan.batch].astype(np.int64)
            pos += len(sids)

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))
