"""Crop shards made from the real 5-channel site, for training tests (no CellProfiler, no screen builder).

Windows of the real Phenix site (DNA, ER, RNA, AGP, Mito), 8-bit after the paper's 0.05–99.95
percentile stretch, each labelled by an artificial per-class program that survives the per-crop,
per-channel normalisation (gamma, blur, channel shift: changes of *shape*, not of level):

- controls ``DMSO`` and ``EMPTY`` are untouched (only their wells differ: they are told apart by
  well confounders alone, as real negative controls);
- ``T1``: Mito gamma 0.5; ``T2``: ER blurred (σ 2); ``T3``: RNA shifted by 4 px; ``T4``: AGP gamma 2;
- confounders: every well draws a per-channel gamma in [0.7, 1.4] (a well effect the network can
  learn only if it sees that well in training: leave-cells-out > leave-plates-out), plate 2 is
  slightly blurred (σ 0.7).

Layout: ``plates`` plates; per plate 4 DMSO wells and 4 EMPTY wells of ``ctrl_cells`` cells and 2
wells per treatment of ``trt_cells`` cells (controls ≫ treatments, as in real screens). Shards are
written per plate, ``row_group`` rows per row group, the crops as Ray's Arrow tensor extension
(what Ray Data writes for a numpy column) with ``raycp.crop_shape`` / ``raycp.channels`` metadata.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage as ndi

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
PHENIX = {"DNA": 5, "ER": 2, "RNA": 6, "AGP": 3, "Mito": 4}
CLASSES = ("DMSO", "EMPTY", "T1", "T2", "T3", "T4")
CONTROLS = ("DMSO", "EMPTY")


@lru_cache(maxsize=2)
def site_u8(site_dir: str) -> np.ndarray:
    """The real site as 5×H×W uint8 (per-channel 0.05–99.95 percentile stretch); ``site_dir`` may
    also be a ``.npy`` of that array (saved by :func:`save_site_u8`, for machines without imagecodecs)."""
    if str(site_dir).endswith(".npy"):
        return np.load(site_dir)
    from raycp.io.images import read_image

    orig = Path(site_dir) / "images" / "orig"
    planes = []
    for ch in CHANNELS:
        path = next(orig.glob(f"*-ch{PHENIX[ch]}sk*.tiff"))
        plane = read_image(str(path)).astype(np.float32)
        lo, hi = np.percentile(plane, [0.05, 99.95])
        planes.append(np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1))
    return (np.stack(planes) * 255).astype(np.uint8)


def save_site_u8(site_dir: Path, path: Path) -> Path:
    np.save(path, site_u8(str(site_dir)))
    return path


def _program(crop: np.ndarray, cls: str) -> np.ndarray:
    x = crop.astype(np.float32) / 255.0
    if cls == "T1":
        x[4] = x[4] ** 0.5
    elif cls == "T2":
        x[1] = ndi.gaussian_filter(x[1], 2.0)
    elif cls == "T3":
        x[2] = np.roll(x[2], (4, 4), axis=(0, 1))
    elif cls == "T4":
        x[3] = x[3] ** 2.0
    return x


def make_crop_shards(folder: Path, site_dir: Path, *, size: int = 64, plates: int = 2, ctrl_cells: int = 24,
                     trt_cells: int = 8, seed: int = 0, row_group: int = 32, classes=CLASSES,
                     label_column: str = "Metadata_Treatment", tensor: str = "ray") -> Path:
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    site = site_u8(str(site_dir))
    _, height, width = site.shape
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(plates):
        plate = f"P{p + 1}"
        wells = []
        for cls in classes:
            n_wells = 4 if cls in CONTROLS else 2
            wells += [(cls, ctrl_cells if cls in CONTROLS else trt_cells) for _ in range(n_wells)]
        order = rng.permutation(len(wells))  # plate layouts differ between plates
        rows, crops = [], []
        for w_i, idx in enumerate(order):
            cls, n = wells[idx]
            well = f"{'ABCDEFGH'[w_i // 12]}{w_i % 12 + 1:02d}"
            gamma = rng.uniform(0.7, 1.4, size=len(CHANNELS))
            for c in range(n):
                y0, x0 = rng.integers(0, height - size), rng.integers(0, width - size)
                crop = site[:, y0:y0 + size, x0:x0 + size]
                crop = np.rot90(crop, rng.integers(4), axes=(1, 2))
                if rng.random() < 0.5:
                    crop = crop[:, :, ::-1]
                x = _program(np.ascontiguousarray(crop), cls)
                x = x ** gamma[:, None, None]
                if p == 1:
                    x = ndi.gaussian_filter(x, (0, 0.7, 0.7))
                crops.append(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))
                rows.append({"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": 1 + c % 3,
                             "Metadata_CellId": c, "Metadata_X": float(x0 + size / 2), "Metadata_Y": float(y0 + size / 2),
                             label_column: cls, "Metadata_IsControl": cls in CONTROLS,
                             "Metadata_TouchesBorder": False})
        arr = np.stack(crops)
        meta = {k: [r[k] for r in rows] for k in rows[0]}
        table = pa.table(meta)
        if tensor == "ray":
            col = ArrowTensorArray.from_numpy(arr)
        elif tensor == "arrow":
            col = pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
        elif tensor == "binary":
            col = pa.array([c.tobytes() for c in arr], type=pa.binary())
        else:
            col = pa.array(list(arr.reshape(len(arr), -1)), type=pa.list_(pa.uint8()))
        table = table.append_column("crop", col)
        table = table.replace_schema_metadata({"raycp.crop_shape": json.dumps(list(arr.shape[1:])),
                                               "raycp.channels": json.dumps(list(CHANNELS))})
        half = len(table) // 2
        for part, sl in enumerate((table.slice(0, half), table.slice(half))):
            pq.write_table(sl, folder / f"{plate}-part-{part:03d}.parquet", row_group_size=row_group)
    return folder


def train_cfg(crops, output, **sections):
    """A TrainConfig for tests: tiny batches, few steps, 2 CPUs shared by workers and Ray Data."""
    from raycp.train.config import TrainConfig

    tree = {"crops": str(crops), "output": str(output),
            "optim": {"epochs": 2, "batch_size": 8},
            "split": {"val_max_cells": 64},
            "compute": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5, "max_steps_per_epoch": 3,
                        "max_failures": 0}}
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return TrainConfig.model_validate(tree)


def read_crops(crops, n: int, *, label: str = "Metadata_Treatment"):
    """The first ``n`` crops of the shards (uint8 torch N×C×S×S) and their class codes (sorted
    labels), read as a worker reads them (``CropSource``, local threads, no Ray)."""
    import torch

    from raycp.train import data as D
    from raycp.train.sampling import encode_labels

    meta = D.read_crop_metadata(str(crops), label=label)
    source = D.CropSource(files=meta.files, column=meta.crop_column, shape=meta.shape,
                          locations=meta.locations(), reader="local")
    sids = np.arange(min(n, len(meta.meta)))
    _, x = source.load(sids)
    codes, _ = encode_labels(meta.meta, label, None)
    return torch.from_numpy(x), torch.from_numpy(codes[sids].astype(np.int64))
