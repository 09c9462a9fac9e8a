"""Benchmark of the training stage: Ray Train loop vs a bare torch loop over the same crops.

Prints JSON lines:

- ``bare``: the same recipe (model, SGD, normalisation, augmentations, batch) in this process,
  crops already in memory, no Ray at all: the ceiling;
- ``ray_train`` with 1 worker: samples/s of the steady-state epochs (``ratio_vs_bare``, target ≥ 0.8:
  what Ray Train + DDP + Ray Data reading + checkpointing cost);
- ``ray_train`` with 2 workers (``scaling_vs_1_worker``; on one 2-core CPU box the two workers share
  the cores, so < 2 is expected there: the number that matters is on GPUs);
- with ``--formulations ols,mil,grl``: 1 worker of each of the paper's other formulations
  (``ratio_vs_classification`` of the samples/s of the training steps; ``epoch_wall_s`` also counts
  OLS' end-of-epoch prediction pass over every training cell).

On a GPU machine (``--device cuda``) the Ray Train runs also sample ``nvidia-smi`` utilisation.

    python benchmarks/train.py                       # CPU: crops made from the real site
    python benchmarks/train.py --crops runs/x/crops --device cuda --steps 200 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "train"))


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


class GpuSampler:
    """``nvidia-smi`` utilisation samples every 200 ms while running."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        s = np.array(self.samples) if self.samples else np.array([np.nan])
        busy = s[s > 0] if (s > 0).any() else s
        return {"gpu_util_mean": round(float(np.nanmean(s)), 1), "gpu_util_busy_mean": round(float(np.nanmean(busy)), 1),
                "gpu_util_samples": int(len(self.samples))}


def make_config(crops: str, output: str, args, workers: int, formulation: str = "classification"):
    from raycp.train.config import TrainConfig

    return TrainConfig.model_validate({
        "crops": crops, "output": output, "formulation": formulation,
        "mil": {"bags_per_step": max(1, args.batch // 8), "bag_size": 8},
        "model": {"arch": args.arch},
        "optim": {"epochs": args.epochs, "batch_size": args.batch},
        "split": {"val_max_cells": args.val_cells},
        "compute": {"num_workers": workers, "use_gpu": args.device == "cuda", "cpus_per_worker": args.cpus_per_worker,
                    "data_cpus": args.data_cpus, "max_steps_per_epoch": args.steps, "max_failures": 0,
                    "reader": args.reader, "keep_checkpoints": 1},
    })


def bare_loop(cfg, args) -> dict:
    """The recipe in this process: crops preloaded, no Ray, no DDP, no checkpoints."""
    import torch

    from raycp.train import augment as A
    from raycp.train import data as D
    from raycp.train import sampling as S
    from raycp.train import trainer
    from raycp.train.loop import Recipe

    prep = trainer.prepare(cfg)
    device = torch.device(args.device)
    recipe = Recipe(cfg, len(prep.classes), device=device)
    model = recipe.model()
    opt = recipe.optimizer(model)
    train = prep.train_sids
    plan = S.plan_epoch(train, prep.codes[train], len(prep.classes), seed=0, epoch=0, rank=0, world=1,
                        batch=args.batch, max_steps=args.steps)
    src = D.CropSource(prep.crops.files, prep.crops.crop_column, prep.crops.shape, prep.crops.locations(), reader="local")
    uniq, crops = src.load(plan.sids)
    slots = np.searchsorted(uniq, plan.sids)
    model.train()
    times = []
    for epoch in range(args.epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in range(plan.steps):
            sl = slice(step * args.batch, (step + 1) * args.batch)
            x, y = recipe.to_device(crops[slots[sl]], plan.labels[sl].astype(np.int64))
            recipe.train_step(model, opt, x, y, A.augment_generator(0, epoch, 0, step))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    return {"samples_per_s": round(plan.steps * args.batch / float(np.median(steady)), 2),
            "epoch_seconds": [round(t, 3) for t in times], "steps": plan.steps}


def ray_loop(cfg, args) -> dict:
    from raycp.train import trainer

    sampler = GpuSampler() if args.device == "cuda" else None
    t0 = time.perf_counter()
    if sampler:
        with sampler:
            res = trainer.fit(cfg, export=False)
    else:
        res = trainer.fit(cfg, export=False)
    wall = time.perf_counter() - t0
    rates = [e["samples_per_s"] for e in res.history]
    steady = rates[1:] or rates
    out = {"samples_per_s": round(float(np.median(steady)), 2), "epoch_samples_per_s": rates,
           "epoch_seconds": [e["seconds"] for e in res.history], "wall_s": round(wall, 1),
           "epoch_wall_s": round(wall / max(1, len(res.history)), 2)}
    if sampler:
        out.update(sampler.summary())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crops", help="crop shards (default: 128-px crops made from the real site)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--arch", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (the first is warm-up)")
    ap.add_argument("--workers", default="1,2", help="Ray Train worker counts to measure")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--data-cpus", type=float, default=0.5)
    ap.add_argument("--reader", default="ray_data", choices=["ray_data", "local"])
    ap.add_argument("--val-cells", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the bare loop (default: cpus per worker)")
    ap.add_argument("--size", type=int, default=128, help="crop size when making crops")
    ap.add_argument("--cells", type=int, default=48, help="cells per control well when making crops (treatments: half)")
    ap.add_argument("--site", help="the real site folder, or its 8-bit .npy (default: ../shared/data/...)")
    ap.add_argument("--formulations", default="", help="also time these formulations (ols, mil, grl) with 1 worker")
    args = ap.parse_args(argv)

    import torch

    from raycp import runtime
    from raycp.config import ComputeConfig

    work = Path(tempfile.mkdtemp(prefix="raycp-bench-train-"))
    crops = args.crops
    if crops is None:
        from crops_helper import make_crop_shards

        site = args.site or Path(os.environ.get("RAYCP_SHARED_DATA", REPO.parent / "shared" / "data")) / "images" / \
            "pediatric_5ch_BR00143976_C03_s3"
        t0 = time.perf_counter()
        crops = str(make_crop_shards(work / "crops", Path(site), size=args.size, ctrl_cells=args.cells,
                                     trt_cells=max(1, args.cells // 2), row_group=64))
        emit({"bench": "train", "made_crops": crops, "seconds": round(time.perf_counter() - t0, 1)})
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, int(args.cpus_per_worker)))
    common = {"bench": "train", "device": device_name(args.device), "arch": args.arch, "batch": args.batch,
              "steps_per_epoch": args.steps, "epochs": args.epochs}

    sampler = GpuSampler() if args.device == "cuda" else None
    if sampler:
        with sampler:
            bare = bare_loop(make_config(crops, str(work / "bare"), args, 1), args)
        bare.update(sampler.summary())
    else:
        bare = bare_loop(make_config(crops, str(work / "bare"), args, 1), args)
    emit({**common, "mode": "bare", "workers": 1, **bare})

    runtime.init(ComputeConfig(num_cpus=args.cpus, num_gpus=None if args.device == "cuda" else 0,
                               object_store_memory_gb=1.0))
    base = None
    for w in [int(v) for v in args.workers.split(",") if v]:
        rec = ray_loop(make_config(crops, str(work / f"ray{w}"), args, w), args)
        rec = {**common, "mode": "ray_train", "workers": w, "reader": args.reader, **rec}
        if w == 1:
            rec["ratio_vs_bare"] = round(rec["samples_per_s"] / bare["samples_per_s"], 3)
            base = rec["samples_per_s"]
        elif base:
            rec["scaling_vs_1_worker"] = round(rec["samples_per_s"] / base, 3)
        emit(rec)
    for name in [v for v in args.formulations.split(",") if v]:
        rec = ray_loop(make_config(crops, str(work / f"ray-{name}"), args, 1, name), args)
        rec = {**common, "mode": "ray_train", "formulation": name, "workers": 1, **rec}
        if base:
            rec["ratio_vs_classification"] = round(rec["samples_per_s"] / base, 3)
        emit(rec)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
