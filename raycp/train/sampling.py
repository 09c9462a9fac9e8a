"""Which crops a training run sees: classes, the split, balanced epochs, ranks' shares (pure numpy/pandas).

**Balanced epochs** (paper Methods, "Training cell painting models"): every epoch draws, for each
class, the *median* number of training cells per class — without replacement from classes at or
above the median, with replacement from smaller ones — then shuffles globally
(:func:`balanced_epoch`). The draw is a pure function of ``(seed, epoch)``: a restarted run redraws
exactly the same epochs, which is what makes a resumed run bitwise identical to an uninterrupted
one. Samples go to ranks round-robin; every rank runs the same number of steps,
``min_r ⌊n_r / batch⌋`` (drop-last): uneven batch counts deadlock DDP's all-reduce (ray#66085).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycp.errors import InputError

PLATE, WELL = "Metadata_Plate", "Metadata_Well"




def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, platforms and Python versions)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


# Stream tags keep the random streams of different uses independent.
STREAM_PLAN, STREAM_SPLIT, STREAM_AUGMENT, STREAM_TORCH, STREAM_VAL = 1, 2, 3, 4, 5


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


def wells_of(meta: pd.DataFrame) -> pd.Series:
    """``plate/well`` per crop (:class:`InputError` without the columns)."""
    for col in (PLATE, WELL):
        if col not in meta.columns:
            raise InputError(f"crop shards have no {col} column", fix="crop a screen index with plate and well metadata")
    return meta[PLATE].astype(str) + "/" + meta[WELL].astype(str)


def split_leave_cells_out(meta: pd.DataFrame, *, train_fraction: float, seed: int) -> np.ndarray:
    """``is_val`` per crop: in every well a random ``1 − train_fraction`` of its cells (paper: ~40 %)."""
    wells = wells_of(meta)
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
    wells = wells_of(meta)
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


def bags_per_class(per_class: int, bag_size: int) -> int:
    """MIL bags drawn per class and epoch: the balanced epoch's cells per class (``per_class``, the
    median) in bags, at least one (paper: "for each treatment class we generate the same number of bags")."""
    return max(1, per_class // bag_size)


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


