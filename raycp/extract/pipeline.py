"""Ray Data adapters of the extraction stage: every cell of a screen, streamed, resumable per site.

Three operators (their functions: :mod:`raycp.extract.tasks`), so that model actors never wait on storage or decoding (DeepProfiler's
single-process profiling leaves the GPU idle while it reads and crops)::

    index rows ──► decode (CPU tasks)  ──► model (actor pool)  ──► write (CPU tasks) ──► accounting rows
                   read shard / images,     model loaded once in     cells Parquet, npz,
                   correct, locate, crop    __init__; inference_mode, site median (last),
                   → one row per site       channels_last, bf16 on   atomic, per site
                     (uint8 crops, Arrow)   GPU; chunks of batch_size

A site travels as one row (its crops are one Arrow binary value); an actor call takes
``sites_per_call`` sites and packs their crops into batches of ``batch_size`` (on GPU, the last
batch is zero-padded so every pass has one shape); each site's features go to one write task, which
finishes the site (its median file exists) or leaves it absent.
Only small accounting rows reach the driver; the screen is never materialised. The CellProfiler
baseline needs no network: decode + cp-measure + write run in one CPU task per site.

A failing site (unreadable image, missing channel, zero nuclei, ...) is not lost: it flows on as a
row with a one-line reason and lands in the ledger as quarantined; a re-run retries it.
Re-running skips every site whose median file exists (one listing of ``sites/``), so it does no
model work on a finished folder and completes an interrupted one.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.extract import sources as src
from raycp.extract import writers
from raycp.extract.tasks import (
    ExtractSpec,
    FeatureActor,
    account_row,
    cellprofiler_batch,
    decode_batch,
    write_batch,
)
from raycp.io import urls
from raycp.io.index import KEYS, PLATE, SITE, WELL, ScreenIndex
from raycp.layout import FeatureSetLayout, RunLayout
from raycp.ledger import PROCESSED, Ledger, StageOutcome
from raycp.preprocess.site import metadata_columns, nuclei_source

Progress = Callable[..., Iterable]


# -- driver ---------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ExtractResult(StageOutcome):
    """What the stage did: its ledger and run figures (:class:`StageOutcome`), where the features
    went and the model's identity."""

    folder: str
    model: dict


@dataclass
class Plan:
    """The driver's decisions before any site runs (all checks that can fail early are done)."""

    cfg: object
    index: ScreenIndex
    spec: ExtractSpec
    layout: FeatureSetLayout
    model_json: dict
    keys: list[dict]
    todo: pd.DataFrame
    resumed: list[dict]


def _index(cfg) -> tuple[ScreenIndex, bool]:
    from raycp.preprocess.pipeline import load_index

    channels = list(cfg.data.channels)
    extra = cfg.cellprofiler.nuclei_labels if cfg.model.kind == "cellprofiler" else None
    if extra and extra not in channels:
        channels.append(extra)
    return load_index(cfg.data.index, channels=channels)


def _crops_probe(run: str, index: ScreenIndex) -> tuple[list[str] | None, int | None]:
    """Channels and crop size of the first existing crops shard (schema only), for early checks."""
    import pyarrow.parquet as pq

    for row in index.table[list(KEYS)].head(64).to_dict("records"):
        url = src.crops_url(run, src.site_key(row))
        try:
            fs, path = urls.filesystem(url)
            with fs.open(path, "rb") as fh:
                meta = pq.read_schema(fh).metadata or {}
        except (FileNotFoundError, OSError):
            continue
        channels = json.loads(meta.get(b"raycp.channels", b"null") or "null")
        size = int(meta[b"raycp.crop_size"]) if b"raycp.crop_size" in meta else None
        return channels, size
    return None, None


def _choose_device(p: Plan) -> None:
    """``inference.device`` against the cluster: auto = cuda when it has GPUs; cuda without GPUs is an error."""
    from raycp import runtime
    from raycp.extract.models import resolve_device

    if p.cfg.model.kind == "cellprofiler":
        return
    gpus = runtime.cluster_gpus()
    if p.cfg.inference.device == "cuda" and gpus <= 0:
        if not runtime.cluster_may_grow():
            raise InputError("inference.device=cuda but the Ray cluster has no GPU",
                             fix="start Ray with GPUs (compute.num_gpus) or set inference.device=cpu")
        runtime.notice("inference.device=cuda and the cluster has no GPU node yet: the model actors wait "
                       "for its autoscaler to add one (a cluster without one never will: stop the job and set "
                       "inference.device=cpu)")
    inf = p.cfg.inference
    p.spec.device = resolve_device(inf, gpus)
    gpu = p.spec.device == "cuda"
    p.spec.sites_per_call = inf.sites_per_call or (8 if gpu else 1)
    p.spec.pad_batches = gpu if inf.pad_batches is None else inf.pad_batches


def plan(cfg) -> Plan:
    """Load the index, decide the input, load the model once (on the driver's CPU) to check its
    channels, layer and size and to fingerprint it, refuse a folder made by another model, and
    list the sites already finished."""
    from raycp.extract.models import load_extractor

    run = cfg.source_run or cfg.data.output  # read from; features go under data.output
    model_cfg = cfg.model
    if model_cfg.kind == "trained" and not model_cfg.path:  # the driver and the actors read the run written to
        model_cfg = model_cfg.model_copy(update={"path": RunLayout(cfg.data.output).model})
    index, compressed = _index(cfg)
    input_ = src.decide_input(cfg, run)
    kind = cfg.model.kind
    channels = list(cfg.data.channels)
    locate = nuclei_source(cfg, run) if input_ == "images" else "detect"
    correct = src.decide_correct(cfg, run, compressed, input_)
    crop_size = cfg.crops.size
    if input_ == "crops":
        shard_channels, shard_size = _crops_probe(run, index)
        crop_size = shard_size or crop_size
        if shard_channels is not None and not set(channels) <= set(shard_channels):
            raise InputError(f"{RunLayout(run).folder('crops')}: the crops hold channels {shard_channels}, "
                             f"not all of data.channels {channels}",
                             fix="set data.channels to channels the crops hold, or re-run the crops stage")
    elif cfg.crops.mask and kind != "cellprofiler":
        raise InputError("crops.mask is set but crops are made from the images in this pass (input=images)",
                         fix="make masked crops with `raycp preprocess crops` and extract with input=crops")
    elif kind != "cellprofiler" and locate == "detect" and cfg.nuclei.channel not in channels:
        raise InputError(f"nuclei.channel {cfg.nuclei.channel} is not among data.channels {channels}",
                         fix="set nuclei.channel to the DNA channel")
    if kind == "cellprofiler":
        if cfg.cellprofiler.cytoplasm_channel not in channels:
            raise InputError(f"cellprofiler.cytoplasm_channel {cfg.cellprofiler.cytoplasm_channel} is not among "
                             f"data.channels {channels}", fix="set it to AGP or RNA")
        try:
            import cp_measure  # noqa: F401 - fail early, on the driver, when the baseline's library is missing
        except ImportError:
            raise InputError("model.kind=cellprofiler needs the cp-measure library",
                             fix="pip install cp-measure (or raycp[baselines])") from None
        model_channels, names = channels, []
        model_json = {"kind": kind, "channels": channels, "fingerprint": _cp_fingerprint(cfg),
                      "measurements": cfg.cellprofiler.model_dump(mode="json")}
    else:
        extractor = load_extractor(model_cfg, channels, run=cfg.data.output, device="cpu", batch_size=1, crop_size=crop_size)
        info = extractor.info
        model_channels, names = info.channels, info.feature_names
        model_json = info.to_json()
        del extractor
    model_json.update({"name": cfg.model.folder_name, "layer": cfg.model.layer if kind != "cellprofiler" else None,
                       "input": input_, "crop_size": crop_size if kind != "cellprofiler" else None})
    layout = RunLayout(cfg.data.output).features(cfg.model.folder_name, cfg.outputs.npz_layout)
    _check_model_json(layout, model_json)
    source = src.SourceSpec(run=run, input=input_, channels=list(model_channels),
                            config=cfg.model_dump(mode="json"), correct=correct, compressed=compressed,
                            locate=locate, metadata_columns=metadata_columns(index.table))
    inf = cfg.inference
    spec = ExtractSpec(source=asdict(source), model=model_cfg.model_dump(mode="json"), model_name=cfg.model.folder_name,
                       feature_names=names, features_folder=layout.folder, npz=cfg.outputs.npz,
                       npz_layout=cfg.outputs.npz_layout, device="cpu", precision=inf.precision,
                       batch_size=inf.batch_size, channels_last=inf.channels_last,
                       threads=inf.torch_threads or max(1, int(inf.cpus_per_actor)),
                       deterministic=inf.deterministic, crop_size=crop_size)
    table = index.table
    keys = [src.site_key(r) for r in table[list(KEYS)].to_dict("records")]
    done = writers.list_finished(layout)
    is_done = np.array([(k[PLATE], k[WELL], k[SITE]) in done for k in keys], dtype=bool)
    resumed = [k for k, d in zip(keys, is_done) if d]
    return Plan(cfg=cfg, index=index, spec=spec, layout=layout, model_json=model_json, keys=keys,
                todo=table[~is_done].reset_index(drop=True), resumed=resumed)


def _cp_fingerprint(cfg) -> str:
    """The baseline's identity: its settings, the nuclei settings and cp-measure's version."""
    import hashlib
    from importlib.metadata import version

    blob = json.dumps({"cellprofiler": cfg.cellprofiler.model_dump(mode="json"), "cp_measure": version("cp-measure"),
                       "nuclei": cfg.nuclei.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_model_json(layout: FeatureSetLayout, model_json: dict) -> None:
    """A folder holds one model's features: refuse to resume into one made by another model."""
    try:
        old = json.loads(urls.read_bytes(layout.model_json))
    except FileNotFoundError:
        old = None
    except ValueError:
        old = None
    if old is not None and old.get("fingerprint") != model_json["fingerprint"]:
        raise InputError(f"{layout.folder}: holds features of another model (fingerprint {old.get('fingerprint')}, "
                         f"this one {model_json['fingerprint']})",
                         fix="set model.name to a new folder name, or delete that folder to recompute it")
    if old != model_json:
        urls.ensure_writable(layout.folder)
        urls.atomic_write_text(layout.model_json, json.dumps(model_json, indent=2, sort_keys=True))


def _pool_sizes(cfg, device: str) -> tuple[int, int]:
    from raycp import runtime

    inf = cfg.inference
    if device == "cuda":

        gpus = runtime.cluster_gpus()   # on an autoscaling cluster, what it can grow to (compute.num_gpus)
        hi = inf.actors or max(1, int(gpus // inf.gpus_per_actor))
    else:
        hi = runtime.actor_pool_size(cpus_per_actor=inf.cpus_per_actor, max_size=inf.actors)[1]
    return min(inf.min_actors, hi), hi


def stream(ray, plan_: Plan) -> Iterator[dict]:
    """Accounting rows of the todo sites, computed by the three operators (or the cp-measure task)."""
    from raycp import runtime
    from raycp.sites import index_blocks

    cfg, spec = plan_.cfg, plan_.spec
    inf = cfg.inference
    todo = plan_.todo
    cpus = max(1.0, runtime.cluster_cpus())
    spec_json = spec.to_json()
    n_blocks = max(1, min(len(todo), max(int(cpus) * 4, math.ceil(len(todo) / 4))))
    ds = ray.data.from_pandas(index_blocks(todo, n_blocks))
    if cfg.model.kind == "cellprofiler":
        size = max(1, int(cpus // inf.decode_cpus))
        ds = ds.map_batches(cellprofiler_batch, fn_kwargs={"spec_json": spec_json}, batch_size=1,
                            batch_format="pandas", compute=ray.data.TaskPoolStrategy(size=min(size, len(todo))),
                            num_cpus=inf.decode_cpus)
    else:
        lo, hi = _pool_sizes(cfg, spec.device)
        free = max(1.0, cpus - hi * inf.cpus_per_actor)
        decoders = max(1, int(free // inf.decode_cpus))
        # The decode tasks reserve memory for a site (the actor does not): with equal resources Ray
        # Data would fuse this task map into the actor map after it (as on a CPU-only cluster) and
        # the model would wait on every read and crop.
        ds = ds.map_batches(decode_batch, fn_kwargs={"spec_json": spec_json}, batch_size=1, batch_format="pandas",
                            compute=ray.data.TaskPoolStrategy(size=min(decoders, len(todo))), num_cpus=inf.decode_cpus,
                            memory=inf.decode_memory_mb * 1024 * 1024)
        remote = {"num_gpus": inf.gpus_per_actor} if spec.device == "cuda" else {}
        if inf.resources:
            remote["resources"] = dict(inf.resources)
        remote.update(runtime.actor_restart_args())
        with warnings.catch_warnings():
            # Ray 2.60 names no map_batches parameter for max_restarts; its own docs pass it as a
            # remote arg (actor_pool_map_operator), which it reports as deprecated.
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(FeatureActor, fn_constructor_kwargs={"spec_json": spec_json},
                                batch_size=spec.sites_per_call, batch_format="pyarrow", num_cpus=inf.cpus_per_actor,
                                compute=ray.data.ActorPoolStrategy(
                                    min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=inf.max_tasks_in_flight_per_actor),
                                **remote)
        writers_n = max(1, int(free // inf.write_cpus))
        ds = ds.map_batches(write_batch, fn_kwargs={"spec_json": spec_json}, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.TaskPoolStrategy(size=min(writers_n, len(todo))), num_cpus=inf.write_cpus)
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        yield from batch.to_dict("records")


def _n_features(layout: FeatureSetLayout) -> int:
    """Feature columns of the compacted site medians (the CellProfiler baseline's count is data-driven)."""
    import pyarrow.parquet as pq

    fs, path = urls.filesystem(layout.sites_table)
    with fs.open(path, "rb") as fh:
        return sum(1 for name in pq.read_schema(fh).names if not name.startswith("Metadata_"))


def run_extract(cfg, *, progress: Progress | None = None) -> ExtractResult:
    """``raycp extract``: every site of the index → per-cell features + site medians, resumable.

    Sites already finished (their median file exists) are skipped; the others stream through the
    Ray pipeline; every site ends processed or quarantined with a reason in ``ledger.parquet``.
    """
    from raycp import config as config_mod
    from raycp import runtime

    t_start = time.perf_counter()
    p = plan(cfg)
    rows: list[dict] = []
    totals = {"forward_calls": 0, "decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    resumed_rows = [account_row(k, status=PROCESSED) for k in p.resumed]

    def all_rows() -> Iterator[dict]:
        yield from resumed_rows
        if len(p.todo):  # Ray starts only when there is work: a finished folder costs no cluster
            ray = runtime.connection()
            _choose_device(p)
            yield from stream(ray, p)

    t_pipe = time.perf_counter()
    it: Iterable = all_rows()
    if progress is not None:
        it = progress(it, total=len(p.keys), description=f"extract {p.spec.model_name}: sites")
    for row in it:
        rows.append(row)
        for k in totals:
            totals[k] += row.get(k, 0) or 0
    pipe_s = time.perf_counter() - t_pipe
    processed = {(r[PLATE], r[WELL], int(r[SITE])) for r in rows if r["status"] == PROCESSED}
    done_keys = [k for k in p.keys if (k[PLATE], k[WELL], k[SITE]) in processed]
    counts = writers.compact_sites(p.layout, done_keys)
    ledger = Ledger("extract")
    by_key = {(r[PLATE], r[WELL], int(r[SITE])): r for r in rows}
    for k in p.keys:
        r = by_key.get((k[PLATE], k[WELL], k[SITE]))
        if r is None:  # cannot happen: every site yields a row; account for it rather than lose it
            ledger.quarantined(k, "no result came back from the pipeline", n_cells=0)
        elif r["status"] == PROCESSED:
            ledger.processed(k, n_cells=counts.get((k[PLATE], k[WELL], k[SITE]), int(r["n_cells"])))
        else:
            ledger.quarantined(k, r["reason"], n_cells=0)
    folder = p.layout.folder
    ledger.write(folder)
    config_mod.save_resolved(cfg, folder)
    summary = ledger.summary()
    cells = int(sum(r.get("n_cells", 0) for r in ledger.rows))
    n_features = len(p.spec.feature_names) if p.spec.feature_names else _n_features(p.layout) if counts else None
    success = {**summary, "cells": cells, "model": p.model_json.get("name"), "kind": p.model_json.get("kind"),
               "fingerprint": p.model_json.get("fingerprint"), "features": n_features}
    urls.atomic_write_text(p.layout.success, json.dumps(success, indent=2, sort_keys=True))
    resumed = {(k[PLATE], k[WELL], k[SITE]) for k in p.resumed}
    new_cells = int(sum(r["n_cells"] for r in rows
                        if r["status"] == PROCESSED and (r[PLATE], r[WELL], int(r[SITE])) not in resumed))
    figures = {"model": p.spec.model_name, "kind": cfg.model.kind, "input": p.spec.source["input"],
               "device": p.spec.device, "cells": cells, "features": success["features"],
               "sites_resumed": len(p.resumed), "sites_run": int(len(p.todo)), "cells_run": new_cells,
               "forward_calls": int(round(totals["forward_calls"])), "pipeline_s": round(pipe_s, 3),
               "cells_per_s": round(new_cells / pipe_s, 2) if pipe_s > 0 and new_cells else 0.0,
               "decode_s": round(totals["decode_s"], 3), "model_s": round(totals["model_s"], 3),
               "write_s": round(totals["write_s"], 3), "wall_s": round(time.perf_counter() - t_start, 3)}
    return ExtractResult(ledger=ledger, folder=folder, model=p.model_json, figures=figures)
