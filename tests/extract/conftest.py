"""Extraction fixtures: indexes of the real 5-channel site, a checkpoint made here, crops shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycp.io import importers
from raycp.io.index import ScreenIndex, validate, write_index
from tests.conftest import PHENIX_5CH_MAP

PLATE = "BR00143976"
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
RAY = ["compute.num_cpus=2", "compute.object_store_memory_gb=0.5"]


def real_index(site_5ch: Path) -> ScreenIndex:
    """The real Phenix site (C03, site 3) as an index, treatment DMSO."""
    index = importers.from_phenix_folder(str(site_5ch / "images" / "orig"), plate=PLATE, channel_map=PHENIX_5CH_MAP)
    return validate(index.table.assign(Metadata_Treatment="DMSO", Metadata_IsControl=True), index.channels)


def replicated_index(site_5ch: Path, n: int, *, start: int = 1) -> ScreenIndex:
    """``n`` sites (wells A01, A02 …) that all point at the real site's images."""
    base = real_index(site_5ch).table.iloc[0]
    rows = []
    for i in range(start, start + n):
        row = base.to_dict()
        row["Metadata_Well"] = f"A{i:02d}"
        row["Metadata_Site"] = 1
        rows.append(row)
    return validate(pd.DataFrame(rows), CHANNELS)


def save_index(index: ScreenIndex, folder: Path, name: str = "sites.parquet") -> str:
    url = str(folder / "index" / name)
    write_index(index, url)
    return url


def site_crops(site_5ch: Path, *, size: int = 128):
    """``(table, N×5×S×S uint8)`` made with the preprocessing stage's pure cores, no illumination
    correction: stretch to the 0.05/99.95 percentiles, detect nuclei on DNA, crop."""
    from raycp.io.images import read_image
    from raycp.preprocess import compress, crops, nuclei

    index = real_index(site_5ch)
    row = index.table.iloc[0]
    planes = [read_image(row[f"URL_{c}"]) for c in CHANNELS]
    u8, _, dna = compress.compress_site(planes, None, keep_float=0)
    table = nuclei.detect_nuclei(dna)
    xs, ys = table[nuclei.X].to_numpy(), table[nuclei.Y].to_numpy()
    out, border = crops.crop_cells(u8, xs, ys, size)
    return table.assign(border=border), out


def write_crops_shards(run: Path, index: ScreenIndex, table: pd.DataFrame, crops: np.ndarray, *,
                       cells: int | None = None) -> None:
    """The crops stage's output for every site of ``index`` (its shard format, ``_SUCCESS``)."""
    from raycp.preprocess import crops as crops_core
    from raycp.preprocess import nuclei

    n = len(crops) if cells is None else cells
    for row in index.table.to_dict("records"):
        meta = pd.DataFrame({
            "Metadata_Plate": [row["Metadata_Plate"]] * n, "Metadata_Well": [row["Metadata_Well"]] * n,
            "Metadata_Site": np.full(n, row["Metadata_Site"], dtype=np.int64),
            "Metadata_CellId": table[nuclei.NUMBER].to_numpy(np.int64)[:n],
            "Metadata_X": table[nuclei.X].to_numpy()[:n], "Metadata_Y": table[nuclei.Y].to_numpy()[:n],
            "Metadata_TouchesBorder": table["border"].to_numpy(bool)[:n],
            "Metadata_Treatment": [row["Metadata_Treatment"]] * n,
            "Metadata_IsControl": np.full(n, bool(row["Metadata_IsControl"])),
        })
        path = run / "crops" / row["Metadata_Plate"] / f"{row['Metadata_Well']}_{row['Metadata_Site']}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(crops_core.table_bytes(crops_core.crops_table(crops[:n], meta, CHANNELS)))
    (run / "crops" / "_SUCCESS").write_text("{}")


def make_checkpoint(folder: Path, crops: np.ndarray | None = None, *, in_chans: int = 5,
                    channels: list[str] | None = None, seed: int = 0, arch: str = "efficientnet_b0") -> Path:
    """A checkpoint in `raycp train`'s export format (model.safetensors + model.json), weights made
    here: a seeded timm model whose BatchNorm statistics are measured on the real crops (so its
    block6a features are O(0.1) and differ from cell to cell, as a trained model's do)."""
    import torch
    from safetensors.torch import save_file

    from raycp.models.network import create_model
    from raycp.models.normalize import NORMALIZATION, normalize

    torch.manual_seed(seed)
    model = create_model(arch, num_classes=4, in_chans=in_chans, drop_rate=0.0)
    if crops is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration pass
        model.train()
        with torch.no_grad():
            model(normalize(torch.from_numpy(crops[:, :in_chans])))
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    chans = channels or CHANNELS[:in_chans]
    (folder / "model.json").write_text(json.dumps({
        "format": "raycp.train/1", "arch": arch, "num_classes": 4, "classes": ["DMSO", "a", "b", "c"],
        "channels": chans, "in_chans": in_chans, "crop_size": 128, "normalization": NORMALIZATION,
        "feature_layer": "block6a_activation"}))
    return folder


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def real_crops(site_5ch):
    """``(nuclei table + border flags, 38×5×128×128 uint8)`` of the real site."""
    return site_crops(site_5ch)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, real_crops) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", real_crops[1][::2])


@pytest.fixture(scope="session")
def trained_run(site_5ch, checkpoint, ray_cluster, tmp_path_factory):
    """`raycp extract` with the checkpoint on the real site, crops made from its images in the same
    pass (no illumination stage), DeepProfiler npz on."""
    from raycp.extract.config import load_extract_config
    from raycp.extract.pipeline import run_extract

    root = tmp_path_factory.mktemp("trained-run")
    index_url = save_index(real_index(site_5ch), root)
    cfg = load_extract_config(None, [*RAY, "model.kind=trained", f"model.path={checkpoint}", "input=images",
                                     "illumination.enabled=false", "outputs.npz=true", "inference.batch_size=16"],
                              index=index_url, output=str(root / "run"))
    return root / "run", run_extract(cfg)
