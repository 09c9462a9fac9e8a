"""Training data cores (no Ray): crop shards, splits, balanced epochs, rank shares, normalisation,
augmentations, and the bad inputs that must stop a run with one clear line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from crops_helper import CLASSES, make_crop_shards

from raycp.errors import InputError
from raycp.models.normalize import NORM_EPS, normalize
from raycp.preprocess.crops import tensor_to_numpy
from raycp.train import augment as A
from raycp.train import data as D
from raycp.train import sampling as S
from raycp.train.config import AugmentSection, SplitSection

LABEL = "Metadata_Treatment"


@pytest.fixture(scope="module")
def crops(crops64):
    return D.read_crop_metadata(str(crops64), label=LABEL)


@pytest.fixture(scope="module")
def coded(crops):
    codes, classes = S.encode_labels(crops.meta, LABEL, None)
    return codes, classes


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("tensor", ["ray", "arrow", "binary", "list"])
def test_every_tensor_layout_reads_the_same_crops(site_5ch, tmp_path, tensor):
    folder = make_crop_shards(tmp_path / tensor, site_5ch, size=32, plates=1, ctrl_cells=2, trt_cells=1,
                              tensor=tensor, row_group=5)
    ref = make_crop_shards(tmp_path / "ref", site_5ch, size=32, plates=1, ctrl_cells=2, trt_cells=1, row_group=5)
    got, want = D.read_crop_metadata(str(folder), label=LABEL), D.read_crop_metadata(str(ref), label=LABEL)
    assert got.shape == (5, 32, 32) and got.channels == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert got.crop_column == "crop" and len(got.meta) == len(want.meta) == 24
    sids = np.arange(len(got.meta))
    a = D.CropSource(got.files, got.crop_column, got.shape, got.locations(), reader="local").load(sids)[1]
    b = D.CropSource(want.files, want.crop_column, want.shape, want.locations(), reader="local").load(sids)[1]
    assert a.dtype == np.uint8 and np.array_equal(a, b)


def test_metadata_and_row_groups(crops):
    meta = crops.meta
    assert len(meta) == 512 and len(crops.files) == 4
    assert meta.groupby("_file")["_rg"].max().tolist() == [3, 3, 3, 3]  # 128 rows per file / 32 per group
    table = pq.read_table(crops.files[1])
    row = meta[meta["_file"] == 1].iloc[40]
    assert row["_rg"] == 1 and row["_row"] == 8
    assert table.column("Metadata_CellId")[40].as_py() == row["Metadata_CellId"]


def test_rows_are_read_exactly_with_duplicates(crops):
    src = D.CropSource(crops.files, crops.crop_column, crops.shape, crops.locations(), reader="local")
    sids = np.array([500, 3, 3, 200, 77, 500])
    uniq, arr = src.load(sids)
    assert uniq.tolist() == [3, 77, 200, 500]
    direct = tensor_to_numpy(pq.read_table(crops.files[0]).column("crop"))
    assert np.array_equal(arr[0], direct[3])


# ----------------------------------------------------------------------- classes, splits


def test_controls_are_classes_and_imbalanced(coded):
    codes, classes = coded
    assert classes == sorted(CLASSES)
    counts = dict(zip(classes, np.bincount(codes)))
    assert counts["DMSO"] == counts["EMPTY"] == 192 and counts["T1"] == 32  # controls ≫ treatments


def test_leave_cells_out_keeps_60_percent_of_every_well(crops):
    is_val = S.split_leave_cells_out(crops.meta, train_fraction=0.6, seed=3)
    per_well = pd.DataFrame({"w": crops.meta["Metadata_Plate"] + crops.meta["Metadata_Well"], "val": is_val})
    frac = per_well.groupby("w")["val"].agg(["mean", "size"])
    assert ((frac["mean"] - 0.4).abs() * frac["size"] <= 0.5 + 1e-9).all()  # round(0.6 n) cells in training
    assert np.array_equal(is_val, S.split_leave_cells_out(crops.meta, train_fraction=0.6, seed=3))
    assert not np.array_equal(is_val, S.split_leave_cells_out(crops.meta, train_fraction=0.6, seed=4))


def test_leave_plates_out_holds_whole_plates_with_two_wells_per_class(crops, coded):
    codes, classes = coded
    is_val = S.split_leave_plates_out(crops.meta, codes, classes, val_plates=None, min_val_wells=2, seed=0)
    plates = crops.meta["Metadata_Plate"]
    assert plates[is_val].nunique() == 1 and not set(plates[is_val]) & set(plates[~is_val])
    val_wells = crops.meta[is_val].groupby(LABEL)["Metadata_Well"].nunique()
    assert (val_wells >= 2).all() and len(val_wells) == len(classes)
    with pytest.raises(InputError, match="fewer than 3 validation wells.*min_val_wells"):
        S.split_leave_plates_out(crops.meta, codes, classes, val_plates=None, min_val_wells=3, seed=0)
    with pytest.raises(InputError, match="no training wells"):
        S.split_leave_plates_out(crops.meta, codes, classes, val_plates=["P1", "P2"], min_val_wells=1, seed=0)


def test_split_column(crops, coded):
    meta = crops.meta.assign(Metadata_Split=np.where(crops.meta["Metadata_CellId"] % 2, "val", "Train"))
    is_val = S.assign_split(meta, *coded, SplitSection(strategy="column"), 0)
    assert is_val.sum() == (crops.meta["Metadata_CellId"] % 2).sum()
    with pytest.raises(InputError, match="values other than train/val"):
        S.split_from_column(meta.assign(Metadata_Split="holdout"), "Metadata_Split")


# ---------------------------------------------------------------------- balanced epochs


def test_balanced_sampler_on_real_class_imbalance(crops, coded):
    """Controls (192 cells) ≫ treatments (32): every epoch draws the median per class, without
    replacement from the big classes, with replacement from the small ones, and redraws each epoch."""
    codes, classes = coded
    is_val = S.split_leave_cells_out(crops.meta, train_fraction=0.6, seed=0)
    train = np.flatnonzero(~is_val)
    tcodes = codes[train]
    counts = np.bincount(tcodes)
    assert counts.max() > 5 * counts.min()
    per_class = int(np.median(counts))
    e0 = S.balanced_epoch(tcodes, len(classes), seed=0, epoch=0)
    assert len(e0) == per_class * len(classes)
    assert np.bincount(tcodes[e0]).tolist() == [per_class] * len(classes)  # balanced
    big = [c for c in range(len(classes)) if counts[c] >= per_class]
    for c in big:  # drawn without replacement: no cell twice
        picked = e0[tcodes[e0] == c]
        assert len(np.unique(picked)) == len(picked) == per_class
    small = [c for c in range(len(classes)) if counts[c] < per_class]
    for c in small:  # with replacement: duplicates, and only cells of that class
        picked = e0[tcodes[e0] == c]
        assert len(np.unique(picked)) < per_class
    assert np.array_equal(e0, S.balanced_epoch(tcodes, len(classes), seed=0, epoch=0))  # a function of (seed, epoch)
    e1 = S.balanced_epoch(tcodes, len(classes), seed=0, epoch=1)
    dmso = classes.index("DMSO")
    seen = set(e0[tcodes[e0] == dmso]) | set(e1[tcodes[e1] == dmso])
    assert len(seen) > per_class * 1.5  # a new draw of the control pool every epoch
    assert not np.array_equal(np.sort(e0), np.sort(e1))
    assert tcodes[e0[:len(classes) * 3]].tolist() != sorted(tcodes[e0[:len(classes) * 3]].tolist())  # shuffled


def test_rank_shares_are_disjoint_with_equal_steps(coded):
    codes, classes = coded
    sids = np.arange(len(codes)) * 10
    plans = [S.plan_epoch(sids, codes, len(classes), seed=1, epoch=2, rank=r, world=3, batch=7) for r in range(3)]
    drawn = S.balanced_epoch(codes, len(classes), seed=1, epoch=2)
    assert len({p.steps for p in plans}) == 1 and plans[0].steps == (len(drawn) // 3) // 7
    assert {p.digest for p in plans} == {plans[0].digest}
    positions = np.concatenate([np.arange(r, len(drawn), 3)[: plans[0].steps * 7] for r in range(3)])
    assert len(np.unique(positions)) == len(positions)  # no draw position on two ranks
    for r, p in enumerate(plans):
        assert len(p.sids) == p.steps * 7
        assert np.array_equal(p.sids, sids[drawn[r::3][: p.steps * 7]])
        assert np.array_equal(p.labels, codes[drawn[r::3][: p.steps * 7]])
    capped = S.plan_epoch(sids, codes, len(classes), seed=1, epoch=2, rank=0, world=3, batch=7, max_steps=2)
    assert capped.steps == 2 and np.array_equal(capped.sids, plans[0].sids[:14])


def test_rank_loader_windows_give_the_same_batches(crops, coded):
    codes, classes = coded
    src = D.CropSource(crops.files, crops.crop_column, crops.shape, crops.locations(), reader="local")
    sids = np.arange(len(codes))
    plan = S.plan_epoch(sids, codes, len(classes), seed=0, epoch=0, rank=1, world=2, batch=8)
    nxt = S.plan_epoch(sids, codes, len(classes), seed=0, epoch=1, rank=1, world=2, batch=8)
    whole, windowed = D.RankLoader(src), D.RankLoader(src, max_cached=16)
    try:
        a = list(whole.batches(plan, nxt))
        b = list(windowed.batches(plan))
    finally:
        whole.close()
        windowed.close()
    assert len(a) == len(b) == plan.steps
    _, direct = src.load(plan.sids[:8])
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    uniq = np.unique(plan.sids[:8])
    assert np.array_equal(a[0][0], direct[np.searchsorted(uniq, plan.sids[:8])])
    assert a[0][1].tolist() == plan.labels[:8].tolist()


def test_rank_loader_reads_each_crop_once_while_it_fits(crops, coded):
    codes, classes = coded
    reads = []

    class Counting(D.CropSource):
        def load(self, sids):
            reads.append(len(np.unique(sids)))
            return super().load(sids)

    src = Counting(crops.files, crops.crop_column, crops.shape, crops.locations(), reader="local")
    sids = np.arange(len(codes))
    plans = [S.plan_epoch(sids, codes, len(classes), seed=0, epoch=e, rank=0, world=1, batch=8) for e in range(3)]
    loader = D.RankLoader(src, max_cached=10_000)
    try:
        got = [list(loader.batches(p)) for p in plans]
    finally:
        loader.close()
    seen = [set(plans[0].sids)]
    for p in plans[1:]:
        seen.append(seen[-1] | set(p.sids))
    assert reads == [len(seen[0]), len(seen[1]) - len(seen[0]), len(seen[2]) - len(seen[1])]  # only new cells
    uniq, direct = src.load(plans[2].sids)
    assert np.array_equal(np.concatenate([x for x, _ in got[2]]), direct[np.searchsorted(uniq, plans[2].sids)])


# ------------------------------------------------------------- normalisation, augmentation


def test_normalisation_is_per_crop_and_channel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 5, 16, 16), dtype=np.uint8)
    x[1, 2] = 7  # an empty (constant) channel
    out = normalize(torch.from_numpy(x)).numpy()
    f = x.astype(np.float64) / 255
    want = (f - f.mean(axis=(2, 3), keepdims=True)) / np.maximum(f.std(axis=(2, 3), keepdims=True), NORM_EPS)
    np.testing.assert_allclose(out, want, atol=1e-5)
    assert np.allclose(out[0].mean(axis=(1, 2)), 0, atol=1e-5) and np.allclose(out[0].std(axis=(1, 2)), 1, atol=1e-4)
    assert np.all(out[1, 2] == 0)  # no NaN from a zero std
    brighter = normalize(torch.from_numpy(x.astype(np.float32) * 0.5 + 20))
    np.testing.assert_allclose(brighter[0].numpy(), out[0], atol=1e-4)  # gain/offset per channel are removed


def _off(**kw):
    base = dict(crop_prob=0.0, flip=False, rot90=False, brightness=0.0, contrast=(1.0, 1.0))
    return AugmentSection(**{**base, **kw})


def test_augmentations_follow_the_paper():
    x = normalize(torch.from_numpy(np.random.default_rng(1).integers(0, 256, (16, 5, 32, 32), dtype=np.uint8)))
    p = A.draw_augment(16, 5, 32, AugmentSection(), torch.Generator().manual_seed(0))
    q = A.draw_augment(16, 5, 32, AugmentSection(), torch.Generator().manual_seed(0))
    assert all(torch.equal(getattr(p, f), getattr(q, f)) for f in ("crop", "boxes", "flip", "rot", "brightness"))
    side = p.boxes[:, 2] - p.boxes[:, 0]
    assert torch.equal(side, p.boxes[:, 3] - p.boxes[:, 1]) and side.min() >= 26 and side.max() <= 32  # 80–100 %
    assert (p.boxes[:, :2] >= 0).all() and (p.boxes[:, 2:] <= 32).all()
    assert p.brightness.abs().max() <= 0.1 and p.contrast.min() >= 0.8 and p.contrast.max() <= 1.2
    big = A.draw_augment(4000, 5, 32, AugmentSection(), torch.Generator().manual_seed(1))
    assert 0.45 < big.crop.float().mean() < 0.55 and 0.45 < big.flip.float().mean() < 0.55
    assert set(big.rot.tolist()) == {0, 1, 2, 3}
    # all off: identity
    ident = A.draw_augment(16, 5, 32, _off(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(A.apply_augment(x, ident), x)
    # flips and rotations are exact dihedral transforms
    fr = A.draw_augment(16, 5, 32, _off(flip=True, rot90=True), torch.Generator().manual_seed(2))
    y = A.apply_augment(x, fr)
    for i in range(16):
        want = x[i].flip(-1) if fr.flip[i] else x[i]
        torch.testing.assert_close(y[i], torch.rot90(want, int(fr.rot[i]), dims=(1, 2)))
    # a full-size crop box resizes to itself; a smaller one is a zoom of its window
    cp = A.draw_augment(16, 5, 32, _off(crop_prob=1.0, crop_min=1.0), torch.Generator().manual_seed(3))
    torch.testing.assert_close(A.apply_augment(x, cp), x)
    # brightness moves each channel's mean by Δ, contrast scales about the mean
    bc = A.draw_augment(16, 5, 32, _off(brightness=0.1, contrast=(0.8, 1.2)), torch.Generator().manual_seed(4))
    z = A.apply_augment(x, bc)
    torch.testing.assert_close(z.mean(dim=(2, 3)), x.mean(dim=(2, 3)) + bc.brightness, atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(2, 3)), x.std(dim=(2, 3)) * bc.contrast, atol=1e-4, rtol=1e-4)


def test_random_crop_is_a_resized_window():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    p = A.AugmentParams(crop=torch.tensor([True, False]), boxes=torch.tensor([[2.0, 2.0, 6.0, 6.0], [0, 0, 8, 8]]),
                        flip=torch.tensor([False, False]), rot=torch.tensor([0, 0]),
                        brightness=torch.zeros(2, 1), contrast=torch.ones(2, 1))
    y = A.apply_augment(x, p)
    want = torch.nn.functional.interpolate(x[:1, :, 2:6, 2:6], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[:1], want)  # bilinear, half-pixel centres
    assert torch.equal(y[1], x[1])


# -------------------------------------------------------------------------- bad inputs


def test_missing_labels_column_is_a_clear_error(site_5ch, tmp_path):
    folder = make_crop_shards(tmp_path / "c", site_5ch, size=32, plates=1, ctrl_cells=1, trt_cells=1,
                              label_column="Metadata_Compound")
    with pytest.raises(InputError, match="no label column 'Metadata_Treatment'.*fix"):
        D.read_crop_metadata(str(folder), label=LABEL)


def test_crops_without_label_values_are_a_clear_error(site_5ch, tmp_path):
    folder = make_crop_shards(tmp_path / "c", site_5ch, size=32, plates=1, ctrl_cells=1, trt_cells=1)
    path = sorted(folder.glob("*.parquet"))[0]
    table = pq.read_table(path)
    labels = table.column(LABEL).to_pylist()
    labels[0] = None
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index(LABEL), LABEL, pa.array(labels, pa.string()))
    pq.write_table(table, path)
    with pytest.raises(InputError, match="1 crops have no Metadata_Treatment"):
        D.read_crop_metadata(str(folder), label=LABEL)


def test_class_with_zero_cells_is_a_clear_error(crops):
    with pytest.raises(InputError, match="class 'T9' has zero cells.*fix"):
        S.encode_labels(crops.meta, LABEL, list(CLASSES) + ["T9"])
    with pytest.raises(InputError, match="not in classes"):
        S.encode_labels(crops.meta, LABEL, ["DMSO", "EMPTY"])
    codes, classes = S.encode_labels(crops.meta, LABEL, None)
    meta = crops.meta.assign(Metadata_Split=np.where(crops.meta[LABEL] == "T1", "val", "train"))
    with pytest.raises(InputError, match="class 'T1' has zero training cells after the column split"):
        S.assign_split(meta, codes, classes, SplitSection(strategy="column"), 0)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet crop shards"):
        D.read_crop_metadata(str(tmp_path / "empty"), label=LABEL)
    with pytest.raises(InputError, match="crop shards not found"):
        D.read_crop_metadata(str(tmp_path / "nope"), label=LABEL)
