"""Benchmark of the extraction stage: cells/s end to end vs a bare forward, memory at N and 10·N sites.

Input: the real 5-channel Cell Painting site (``pediatric_5ch_BR00143976_C03_s3``, 38 nuclei), or
its 8-bit ``.npy`` (``--site .whl/site_u8.npy``, for machines without the data or imagecodecs),
turned once into three kinds of per-site inputs, hard-linked N times (every site is real pixels
and the same work):

- ``tiff``: 5 × 1080² 16-bit TIFFs (zlib; the real files are LZW, which needs imagecodecs) → the
  full images path: read → stretch to 8 bits → detect nuclei → crop (no illumination stage);
- ``png``: the compressed 8-bit PNGs (a compressed index, as `raycp preprocess compress` writes)
  → read → detect → crop;
- ``crops``: the crops stage's Parquet shard of the site → read.

For each N (``--sites``) and, unless ``--scale 0``, ``scale``·N, a fresh process starts its own
local Ray (``--cpus``/``--gpus``), warms it up on 2 sites, then times ``run_extract`` per input:

- ``cells_per_s``: cells ÷ wall time of the stage (Ray Data start, actor start and model load
  included); ``steady_cells_per_s``: cells finished after the first 10 % of sites ÷ the time from
  then to the last one (by the write tasks' clocks: start-up excluded);
- ``bare_cells_per_s``: the same extractor (same device, batch size, threads, sites per call)
  forwarding the same crops in this process, no Ray, no I/O; ``ratio`` = steady ÷ bare
  (target ≥ 0.8 on CPU); on CPU also the bare forward with every core (``bare_all_threads``);
- ``peak_pss_mb``: peak of the summed PSS of the process tree (driver, Ray daemons, workers)
  during the stage; ``growth`` = peak at scale·N ÷ peak at N − 1 (target < 10 %);
- with ``--device cuda``: GPU utilisation (nvidia-smi, every 100 ms) during the stage and during the
  bare forward, and ``feed_cores_per_gpu`` = CPU seconds of decode + write per cell × the bare GPU
  cells/s: the cores that keep one GPU busy from that input.

JSON lines on stdout (last lines: the summaries). Examples::

    python benchmarks/extract.py --sites 6 --scale 10 --input crops              # CPU, memory growth
    python benchmarks/extract.py --sites 8 --scale 0 --input tiff,png,crops
    python3 benchmarks/extract.py --device cuda --site .whl/site_u8.npy --input crops,png,tiff \\
        --sites 2000,600,300 --scale 0 --cpus 16 --gpus 1 --object-store-gb 8 --batch 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _memory import tree_pss  # noqa: E402 - benchmarks/ is the script's folder

SHARED = Path(os.environ.get("RAYCP_SHARED_DATA", REPO.parent / "shared" / "data"))
SITE = SHARED / "images" / "pediatric_5ch_BR00143976_C03_s3" / "images" / "orig"
PHENIX = {"DNA": 5, "ER": 2, "RNA": 6, "AGP": 3, "Mito": 4}
CHANNELS = list(PHENIX)
PLATE = "BENCH"


def emit(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


# -- inputs ----------------------------------------------------------------------------------------

def load_planes(site: str | None):
    """``(5×H×W uint16, source)``: the real site's TIFFs, or an 8-bit .npy scaled by 257."""
    import numpy as np

    if site and site.endswith(".npy"):
        u8 = np.load(site, allow_pickle=False)
        return u8.astype(np.uint16) * np.uint16(257), f"{site} (8-bit x 257)"
    from raycp.io.images import read_image

    folder = Path(site) if site else SITE
    planes = [read_image(str(folder / f"r03c03f03p01-ch{PHENIX[c]}sk1fk1fl1.tiff")) for c in CHANNELS]
    return np.stack(planes), str(folder)


def make_base(work: Path, site: str | None, repeat: int = 1) -> dict:
    """The site once as zlib TIFFs, 8-bit PNGs and a crops shard; returns the files and cell count."""
    import numpy as np
    import pandas as pd
    import tifffile

    from raycp.preprocess import compress, crops, nuclei

    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    planes, source = load_planes(site)
    out = {"tiff": {}, "png": {}, "source": source}
    for c, ch in enumerate(CHANNELS):
        path = base / f"{ch}.tiff"
        tifffile.imwrite(path, planes[c], compression="zlib")
        out["tiff"][ch] = str(path)
    u8, _, dna = compress.compress_site(list(planes), None, keep_float=0)
    for c, ch in enumerate(CHANNELS):
        path = base / f"{ch}.png"
        path.write_bytes(compress.png_bytes(u8[c]))
        out["png"][ch] = str(path)
    table = nuclei.detect_nuclei(dna)
    xs, ys = table[nuclei.X].to_numpy(), table[nuclei.Y].to_numpy()
    cells, border = crops.crop_cells(u8, xs, ys, 128)
    real = len(cells)
    if repeat > 1:  # a denser site (JUMP fields hold ~300 cells): the real crops, `repeat` times
        cells, xs, ys, border = (np.concatenate([a] * repeat) for a in (cells, xs, ys, border))
    n = len(cells)
    meta = pd.DataFrame({"Metadata_Plate": [PLATE] * n, "Metadata_Well": ["A01"] * n,
                         "Metadata_Site": np.ones(n, dtype=np.int64),
                         "Metadata_CellId": np.arange(1, n + 1, dtype=np.int64),
                         "Metadata_X": xs, "Metadata_Y": ys, "Metadata_TouchesBorder": border})
    shard = base / "crops.parquet"
    shard.write_bytes(crops.table_bytes(crops.crops_table(cells, meta, CHANNELS)))
    np.save(base / "crops.npy", cells, allow_pickle=False)
    out.update(crops=str(shard), crops_npy=str(base / "crops.npy"), cells_per_site=real, cells_per_crops_site=n)
    return out


def _link(src: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)


def site_name(i: int) -> tuple[str, int]:
    """Site ``i`` (0-based) of a 384-well plate: wells A01 … P24, then site 2 of each, …"""
    well = i % 384
    return f"{chr(ord('A') + well // 24)}{well % 24 + 1:02d}", 1 + i // 384


def make_index(work: Path, base: dict, kind: str, n: int, run: Path) -> str:
    """An index of ``n`` sites (wells A01 …) whose files are hard links of the base files; for
    ``crops`` the run folder gets the shards and ``crops/_SUCCESS``; for ``png`` the index is
    marked compressed."""
    import pandas as pd

    from raycp.io.index import validate, write_index

    rows = []
    files = base["png" if kind == "png" else "tiff"]
    for i in range(n):
        well, site = site_name(i)
        row = {"Metadata_Plate": PLATE, "Metadata_Well": well, "Metadata_Site": site,
               "Metadata_Treatment": "DMSO", "Metadata_IsControl": True}
        for ch in CHANNELS:
            if kind == "crops":
                row[f"URL_{ch}"] = files[ch]
            else:
                dest = work / f"{kind}_sites" / f"{well}_{site}" / Path(files[ch]).name
                _link(files[ch], dest)
                row[f"URL_{ch}"] = str(dest)
        rows.append(row)
        if kind == "crops":
            _link(base["crops"], run / "crops" / PLATE / f"{well}_{site}.parquet")
    if kind == "crops":
        (run / "crops").mkdir(parents=True, exist_ok=True)
        (run / "crops" / "_SUCCESS").write_text("{}")
    url = str(work / f"index_{kind}_{n}.parquet")
    index = validate(pd.DataFrame(rows), CHANNELS)
    if kind != "png":
        write_index(index, url)
    else:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        from raycp.io import urls
        from raycp.preprocess.pipeline import COMPRESSED_MARK

        table = pa.Table.from_pandas(index.table, preserve_index=False)
        meta = {**(table.schema.metadata or {}), b"raycp.channels": json.dumps(CHANNELS).encode(),
                COMPRESSED_MARK: b"compressed"}
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        urls.atomic_write_bytes(url, buf.getvalue())
    return url


# -- measuring -------------------------------------------------------------------------------------

class Sampler:
    """Peak summed PSS of the process tree (every 100 ms) and, optionally, GPU utilisation."""

    def __init__(self, gpu: bool = False) -> None:
        self.peak = 0
        self.gpu: list[float] = []
        self._stop = threading.Event()
        self._proc = None
        if gpu and shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           "-lms", "100"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read_gpu, daemon=True).start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read_gpu(self) -> None:
        for line in self._proc.stdout:
            try:
                self.gpu.append(float(line.strip().split(",")[0]))
            except ValueError:
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss())
            self._stop.wait(0.1)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        out = {"peak_pss_mb": round(self.peak / 2**20, 1)}
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            busy = self.gpu[2:] if len(self.gpu) > 4 else self.gpu
            out["gpu_util_mean"] = round(sum(busy) / len(busy), 1) if busy else None
            out["gpu_util_samples"] = len(busy)
        return out


def _config(args, index_url: str, run: Path, kind: str):
    from raycp.extract.config import load_extract_config

    sets = [f"compute.object_store_memory_gb={args.object_store_gb}", f"inference.device={args.device}",
            f"inference.batch_size={args.batch}", "illumination.enabled=false",
            f"input={'crops' if kind == 'crops' else 'images'}"]
    if args.cpus:
        sets.append(f"compute.num_cpus={args.cpus}")
    if args.gpus is not None:
        sets.append(f"compute.num_gpus={args.gpus}")
    if args.actors:
        sets.append(f"inference.actors={args.actors}")
    if args.sites_per_call:
        sets.append(f"inference.sites_per_call={args.sites_per_call}")
    if args.cpus_per_actor:
        sets.append(f"inference.cpus_per_actor={args.cpus_per_actor}")
    if args.model == "imagenet":
        sets += ["model.kind=imagenet", f"model.path={args.weights}", "model.arch=efficientnet_lite0"]
    else:
        sets += ["model.kind=random", f"model.arch={args.arch}"]
    return load_extract_config(None, sets, index=index_url, output=str(run))


def timed_run(cfg, sampler_gpu: bool) -> dict:
    """``run_extract`` with the arrival time of every site's accounting row."""
    from raycp.extract.pipeline import run_extract

    stamps: list[tuple[float, int]] = []

    def progress(rows, total, description):
        for row in rows:  # when the write task finished the site (rows reach the driver in index order)
            stamps.append((float(row.get("done_at", 0.0)), int(row.get("n_cells", 0) or 0)))
            yield row

    sampler = Sampler(gpu=sampler_gpu)
    t0 = time.perf_counter()
    result = run_extract(cfg, progress=progress)
    wall = time.perf_counter() - t0
    mem = sampler.stop()
    f = result.figures
    stamps.sort()
    k = max(1, len(stamps) // 10)
    steady = None  # cells finished after the first 10 % of sites ÷ the time they took (no start-up)
    if len(stamps) > k + 1 and stamps[-1][0] > stamps[k - 1][0]:
        steady = sum(c for _, c in stamps[k:]) / (stamps[-1][0] - stamps[k - 1][0])
    cells = f["cells_run"] or 1
    return {"processed": result.summary["processed"], "quarantined": result.summary["quarantined"],
            "cells": f["cells_run"], "wall_s": round(wall, 2), "cells_per_s": round(f["cells_run"] / wall, 1),
            "steady_cells_per_s": round(steady, 1) if steady else None, "forward_calls": f["forward_calls"],
            "decode_cpu_s_per_cell": round(f["decode_s"] / cells, 6), "write_cpu_s_per_cell": round(f["write_s"] / cells, 6),
            "model_s": f["model_s"], "device": f["device"], **mem}


def bare_forward(args, cfg, crops, n_sites: int, threads: int | None, gpu: bool) -> dict:
    """The same extractor forwarding the same crops in this process (no Ray, no I/O)."""
    import torch

    from raycp.extract.models import load_extractor

    spc = args.sites_per_call or (8 if args.device == "cuda" else 1)
    ex = load_extractor(cfg.model, CHANNELS, run=cfg.data.output, device=args.device, batch_size=args.batch,
                        threads=threads)
    pad = args.device == "cuda"
    ex.features_many([crops] * spc, pad=pad)  # warm-up (cuDNN, allocator)
    if args.device == "cuda":
        torch.cuda.synchronize()
    sampler = Sampler(gpu=gpu)
    t0 = time.perf_counter()
    done = 0
    while done < n_sites:
        k = min(spc, n_sites - done)
        ex.features_many([crops] * k, pad=pad)
        done += k
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mem = sampler.stop()
    out = {"bare_cells_per_s": round(n_sites * len(crops) / seconds, 1), "bare_threads": torch.get_num_threads()}
    if "gpu_util_mean" in mem:
        out["bare_gpu_util_mean"] = mem["gpu_util_mean"]
    return out


def gpu_checks(args, cfg, crops) -> dict:
    """On the GPU: is a cell's result independent of the cells packed with it (batches padded to one
    shape)? And how far are bf16 features from the float32 CPU ones?"""
    import numpy as np

    from raycp.extract.models import load_extractor

    gpu = load_extractor(cfg.model, CHANNELS, run=cfg.data.output, device="cuda", batch_size=args.batch)
    alone = gpu.features_many([crops[:5]], pad=True)[0]
    packed = gpu.features_many([crops[5:], crops[:5]], pad=True)[1]
    cpu = load_extractor(cfg.model, CHANNELS, run=cfg.data.output, device="cpu", batch_size=args.batch).features(crops[:5])
    scale = float(np.abs(cpu).max()) or 1.0
    return {"gpu_packing_bitwise_equal": bool(np.array_equal(alone, packed)),
            "gpu_packing_max_abs": float(np.abs(alone - packed).max()),
            "gpu_bf16_vs_cpu_fp32_max_abs_over_max": round(float(np.abs(alone - cpu).max()) / scale, 5)}


def child(args, n_list: list[int], scale_tag: str) -> None:
    """One fresh process: start Ray, warm up, time every input, then the bare forward."""
    import numpy as np

    from raycp import runtime
    from raycp.config import ComputeConfig

    work = Path(args.workdir)
    base = json.loads((work / "base.json").read_text())
    crops_all = np.load(base["crops_npy"], allow_pickle=False)
    runtime.init(ComputeConfig(num_cpus=args.cpus, num_gpus=args.gpus, object_store_memory_gb=args.object_store_gb))
    gpu = args.device == "cuda"
    warm_run = work / f"warm_{scale_tag}"
    shutil.rmtree(warm_run, ignore_errors=True)
    timed_run(_config(args, make_index(work, base, "crops", 2, warm_run), warm_run, "crops"), False)
    if gpu:
        try:
            emit({"gpu_checks": True, **gpu_checks(args, _config(args, "unused", warm_run, "crops"),
                                                   crops_all[: base["cells_per_site"]])})
        except Exception as exc:  # noqa: BLE001
            emit({"gpu_checks": True, "error": f"{type(exc).__name__}: {exc}"[:800]})
    for kind, n in zip(args.input.split(","), n_list):
        run = work / f"run_{kind}_{n}"
        shutil.rmtree(run, ignore_errors=True)
        try:
            cfg = _config(args, make_index(work, base, kind, n, run), run, kind)
            threads = cfg.inference.torch_threads or max(1, int(cfg.inference.cpus_per_actor))
            if args.device == "cuda":
                threads = None
            crops = crops_all if kind == "crops" else crops_all[: base["cells_per_site"]]
            bare_n = n if args.device == "cuda" else max(2, n // 2)
            before = bare_forward(args, cfg, crops, bare_n, threads, False)  # the box may be shared:
            rec = {"input": kind, "n_sites": n, "scale": scale_tag, **timed_run(cfg, gpu)}
            after = bare_forward(args, cfg, crops, bare_n, threads, gpu)  # bare = mean of before and after
            rec.update(after)
            rec["bare_cells_per_s"] = round((before["bare_cells_per_s"] + after["bare_cells_per_s"]) / 2, 1)
            rec["bare_before_after"] = [before["bare_cells_per_s"], after["bare_cells_per_s"]]
            steady = rec["steady_cells_per_s"] or rec["cells_per_s"]
            rec["ratio"] = round(steady / rec["bare_cells_per_s"], 3)
            if args.device == "cpu" and scale_tag == "N":
                rec["bare_all_threads"] = bare_forward(args, cfg, crops, max(2, n // 2), os.cpu_count(),
                                                       False)["bare_cells_per_s"]
            if gpu:
                per_cell = rec["decode_cpu_s_per_cell"] + rec["write_cpu_s_per_cell"]
                rec["feed_cores_per_gpu"] = round(per_cell * rec["bare_cells_per_s"], 1)
            emit(rec)
        except Exception as exc:  # noqa: BLE001 - one failing input must not hide the others
            emit({"input": kind, "n_sites": n, "scale": scale_tag, "error": f"{type(exc).__name__}: {exc}"[:800]})
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(work / f"{kind}_sites", ignore_errors=True)
    runtime.shutdown()


def device_info(device: str) -> dict:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--input", default="crops", help="comma list of tiff, png, crops")
    ap.add_argument("--sites", default="6", help="N, or one N per input (comma list)")
    ap.add_argument("--scale", type=int, default=10, help="also run scale·N sites (0: only N)")
    ap.add_argument("--cpus", type=int, default=None)
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--object-store-gb", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--actors", type=int, default=None)
    ap.add_argument("--cpus-per-actor", type=float, default=None)
    ap.add_argument("--sites-per-call", type=int, default=None)
    ap.add_argument("--model", default="random", choices=["random", "imagenet"])
    ap.add_argument("--arch", default="efficientnet_b0")
    ap.add_argument("--weights", default=None, help="ImageNet weights (--model imagenet)")
    ap.add_argument("--site", default=None, help="the real site folder or its 8-bit .npy")
    ap.add_argument("--repeat", type=int, default=1, help="crops input: each shard holds the site's crops this "
                    "many times (8: ~300 cells per site, like JUMP fields; tiff/png sites keep their 38)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-scale", default="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    kinds = args.input.split(",")
    sites = [int(s) for s in args.sites.split(",")]
    sites = sites * len(kinds) if len(sites) == 1 else sites
    if len(sites) != len(kinds):
        ap.error("--sites needs one N or one per input")
    if args.child:
        child(args, [int(s) for s in args.child.split(",")], args.child_scale)
        return 0
    own = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raycp-bench-extract-"))
    args.workdir = str(work)
    base = make_base(work, args.site, args.repeat)
    (work / "base.json").write_text(json.dumps(base))
    emit({"bench": "extract", "device": args.device, "site": base["source"], "cells_per_site": base["cells_per_site"],
          "cells_per_crops_site": base["cells_per_crops_site"],
          "model": args.model, "arch": args.arch if args.model == "random" else "efficientnet_lite0",
          "batch": args.batch, **device_info(args.device)})
    passes = [("N", sites)] + ([("scaleN", [n * args.scale for n in sites])] if args.scale > 1 else [])
    results: dict[str, dict] = {}
    for tag, ns in passes:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--workdir", str(work),
               "--child", ",".join(map(str, ns)), "--child-scale", tag]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                print(line, flush=True)
                results[f"{rec.get('input')}:{tag}"] = rec
        if proc.returncode:
            emit({"error": f"child for {tag} exited {proc.returncode}"})
    for kind in kinds:
        a, b = results.get(f"{kind}:N"), results.get(f"{kind}:scaleN")
        summary = {"summary": kind}
        if a and "ratio" in a:
            summary.update(cells_per_s=a["cells_per_s"], steady_cells_per_s=a["steady_cells_per_s"],
                           bare_cells_per_s=a["bare_cells_per_s"], ratio=a["ratio"],
                           ratio_target_met=a["ratio"] >= 0.8 if args.device == "cpu" else None)
            for k in ("gpu_util_mean", "bare_gpu_util_mean", "feed_cores_per_gpu"):
                if k in a:
                    summary[k] = a[k]
        if a and b and "peak_pss_mb" in a and "peak_pss_mb" in b:
            growth = b["peak_pss_mb"] / a["peak_pss_mb"] - 1
            summary.update(n=a["n_sites"], scaled_n=b["n_sites"], peak_pss_mb_n=a["peak_pss_mb"],
                           peak_pss_mb_scaled=b["peak_pss_mb"], growth=round(growth, 4),
                           growth_target_met=growth < 0.10)
        emit(summary)
    if own:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
