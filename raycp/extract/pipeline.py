"""Ray Data adapters of the extraction stage: every cell of a screen, streamed, resumable per site.

Three operators, so that model actors never wait on storage or decoding (DeepProfiler's
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

import io
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.extract import sources as src
from raycp.extract import writers
from raycp.io import urls
from raycp.io.index import KEYS, PLATE, SITE, WELL, ScreenIndex, url_col
from raycp.layout import FeatureSetLayout, RunLayout
from raycp.ledger import PROCESSED, QUARANTINED, Ledger, short_reason
from raycp.sites import JsonSpec, release_memory

Progress = Callable[..., Iterable]
ACCOUNT_COLUMNS = (*KEYS, "status", "reason", "n_cells", "forward_calls", "decode_s", "model_s", "write_s",
                   "done_at")


@dataclass
class ExtractSpec(JsonSpec):
    """Everything a worker needs, as JSON: where crops come from, the model, where features go."""

    source: dict                     # SourceSpec as a dict
    model: dict                      # ModelConfig dump
    model_name: str
    feature_names: list[str]
    features_folder: str
    npz: bool = False
    npz_layout: str = "well/site"
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 256
    channels_last: bool = True
    threads: int | None = None
    deterministic: bool = True
    crop_size: int | None = None
    pad_batches: bool = False
    sites_per_call: int = 1


    @property
    def source_spec(self) -> src.SourceSpec:
        return src.SourceSpec(**self.source)

    @property
    def layout(self) -> FeatureSetLayout:
        return FeatureSetLayout(self.features_folder, self.npz_layout)


# -- transport of a site between operators (Arrow only: nothing is ever unpickled) ----------------

def _ipc_bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa

    arrays, names = writers._arrow_metadata(frame)
    table = pa.Table.from_arrays(arrays, names=names)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _ipc_frame(data) -> pd.DataFrame:
    import pyarrow as pa

    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_all().to_pandas()


def _site_info(row: dict, channels: list[str]) -> str:
    """The index row's Metadata_* and channel files, for DeepProfiler's npz ``metadata`` dict."""
    info = {}
    for k, v in row.items():
        if str(k).startswith("Metadata_"):
            if isinstance(v, float) and math.isnan(v):
                v = None
            info[str(k)] = v.item() if hasattr(v, "item") else v
    for ch in channels:
        if url_col(ch) in row:
            info[ch] = str(row[url_col(ch)])
    return json.dumps(info, sort_keys=True, default=str)


def _binary_column(values: list):
    """A large_binary Arrow array; a single numpy buffer (one site's crops) is wrapped, not copied."""
    import pyarrow as pa

    if len(values) == 1:
        data = pa.py_buffer(values[0])
        offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, data])
    return pa.array([bytes(memoryview(v)) for v in values], type=pa.large_binary())


def _table(rows: list[dict], binary: tuple[str, ...]) -> pa.Table:  # noqa: F821
    import pyarrow as pa

    cols = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name in binary:
            cols[name] = _binary_column(values)
        else:
            cols[name] = pa.array(values)
    return pa.table(cols)


def _as_buffer(column, i: int):
    """Zero-copy view of value ``i`` of a (large_)binary Arrow column (chunked or not)."""
    for chunk in getattr(column, "chunks", [column]):
        if i < len(chunk):
            return chunk[i].as_buffer()
        i -= len(chunk)
    raise IndexError(i)


# -- per-process caches (Ray reuses task workers) -------------------------------------------------

_SOURCES: dict[str, src.SiteSource] = {}


def _source(spec_json: str) -> tuple[ExtractSpec, src.SiteSource]:
    spec = ExtractSpec.from_json(spec_json)
    key = json.dumps(spec.source, sort_keys=True)
    source = _SOURCES.get(key)
    if source is None:
        for old in _SOURCES.values():
            old.close()
        _SOURCES.clear()
        source = _SOURCES[key] = src.SiteSource(spec.source_spec)
    return spec, source


# -- operator 1: decode (CPU tasks) ---------------------------------------------------------------

def decode_rows(rows: list[dict], spec: ExtractSpec, source: src.SiteSource) -> list[dict]:
    """One row per site: its crops (uint8 bytes + shape), metadata (Arrow IPC), or a reason."""
    out = []
    for row in rows:
        key = src.site_key(row)
        t0 = time.perf_counter()
        try:
            meta, crops = source.crops(row)
            n, c, s, s2 = crops.shape
            item = {"meta": _ipc_bytes(meta), "crops": np.ascontiguousarray(crops, dtype=np.uint8).reshape(-1),
                    "shape": json.dumps([int(n), int(c), int(s), int(s2)]), "reason": ""}
        except Exception as exc:  # noqa: BLE001 - every failure becomes the site's quarantine reason
            item = {"meta": b"", "crops": b"", "shape": "[]", "reason": short_reason(exc)}
        item.update(key)
        item["info"] = _site_info(row, list(spec.source["channels"]))
        item["decode_s"] = time.perf_counter() - t0
        out.append(item)
    return out


def decode_batch(batch: pd.DataFrame, spec_json: str):
    """Ray Data task: index rows -> site rows (``crops`` large_binary, ``meta`` Arrow IPC)."""
    spec, source = _source(spec_json)
    rows = decode_rows(batch.to_dict("records"), spec, source)
    release_memory()
    return _table(rows, binary=("meta", "crops"))


# -- operator 2: the model actor ------------------------------------------------------------------

class FeatureActor:
    """Callable class of the model actor pool: the model is loaded once per actor in ``__init__``."""

    def __init__(self, spec_json: str) -> None:
        import torch

        from raycp.extract.models import load_extractor

        spec = ExtractSpec.from_json(spec_json)
        self.spec = spec
        if spec.device == "cuda":
            torch.backends.cudnn.benchmark = not spec.deterministic
            torch.backends.cudnn.deterministic = spec.deterministic
        from raycp.extract.config import ModelConfig

        self.extractor = load_extractor(ModelConfig.model_validate(spec.model), list(spec.source["channels"]),
                                        run=spec.source["run"], device=spec.device, precision=spec.precision,
                                        batch_size=spec.batch_size, channels_last=spec.channels_last,
                                        crop_size=spec.crop_size, threads=spec.threads)

    def __call__(self, batch):
        """The sites of one call: their crops packed into chunks of ``batch_size``, features split back."""
        items, crops, todo = [], [], []
        for i in range(batch.num_rows):
            item = {k: batch.column(k)[i].as_py() for k in (*KEYS, "shape", "reason", "info", "decode_s")}
            if not item["reason"]:
                n, c, s, s2 = json.loads(item["shape"])
                crops.append(np.frombuffer(_as_buffer(batch.column("crops"), i), dtype=np.uint8).reshape(n, c, s, s2))
                todo.append(i)
            items.append(item)
        calls, t0 = self.extractor.forward_calls, time.perf_counter()
        feats: dict[int, np.ndarray] = {}
        if todo:
            try:
                for i, f in zip(todo, self.extractor.features_many(crops, pad=self.spec.pad_batches)):
                    feats[i] = f
            except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory: the call's sites are quarantined
                for i in todo:
                    items[i]["reason"] = short_reason(exc)
        model_s = (time.perf_counter() - t0) / max(1, len(todo))
        n_calls = self.extractor.forward_calls - calls
        total = max(1, sum(len(f) for f in feats.values()))
        out = []
        for i, item in enumerate(items):
            ok = not item["reason"]
            f = feats.get(i, np.zeros((0, self.extractor.dim), dtype=np.float32))
            item.update(meta=_as_buffer(batch.column("meta"), i).to_pybytes() if ok else b"",
                        features=np.ascontiguousarray(f).reshape(-1) if ok else b"",
                        dim=int(self.extractor.dim),
                        # passes shared by the call's sites are attributed in proportion to their cells
                        forward_calls=(n_calls * len(f) / total) if ok else 0.0,
                        model_s=model_s if ok else 0.0)
            out.append(item)
        return _table(out, binary=("meta", "features"))


# -- operator 3: write (CPU tasks) ----------------------------------------------------------------

def _account(key: dict, *, status: str, reason: str = "", n_cells: int = 0, forward_calls: float = 0,
             decode_s: float = 0.0, model_s: float = 0.0, write_s: float = 0.0) -> dict:
    return {**key, "status": status, "reason": reason, "n_cells": int(n_cells), "forward_calls": float(forward_calls),
            "decode_s": float(decode_s), "model_s": float(model_s), "write_s": float(write_s),
            "done_at": time.time()}  # wall clock when the site was finished (for throughput figures only)


def write_rows(batch, spec: ExtractSpec) -> list[dict]:
    """Write each site's outputs (cells, npz, median last); one accounting row per site."""
    out = []
    for i in range(batch.num_rows):
        item = {k: batch.column(k)[i].as_py() for k in (*KEYS, "reason", "info", "decode_s", "model_s",
                                                        "forward_calls", "dim")}
        key = {PLATE: str(item[PLATE]), WELL: str(item[WELL]), SITE: int(item[SITE])}
        timing = {"decode_s": item["decode_s"], "model_s": item["model_s"], "forward_calls": item["forward_calls"]}
        if item["reason"]:
            out.append(_account(key, status=QUARANTINED, reason=item["reason"], **timing))
            continue
        t0 = time.perf_counter()
        try:
            meta = _ipc_frame(_as_buffer(batch.column("meta"), i))
            feats = np.frombuffer(_as_buffer(batch.column("features"), i), dtype=np.float32).reshape(len(meta), item["dim"])
            n = write_features(spec, key, meta, feats, json.loads(item["info"]))
            out.append(_account(key, status=PROCESSED, n_cells=n, write_s=time.perf_counter() - t0, **timing))
        except Exception as exc:  # noqa: BLE001
            out.append(_account(key, status=QUARANTINED, reason=short_reason(exc), **timing))
    return out


def write_features(spec: ExtractSpec, key: dict, meta: pd.DataFrame, feats: np.ndarray, info: dict,
                   names: list[str] | None = None) -> int:
    """The site's files (see :mod:`raycp.extract.writers`); the median file is written last."""
    x, y = "Metadata_X", "Metadata_Y"
    locations = (np.stack([meta[x].to_numpy(np.float64), meta[y].to_numpy(np.float64)], axis=1)
                 if x in meta.columns and y in meta.columns else None)
    return writers.write_site(spec.layout, key, meta, feats, names or spec.feature_names, npz=spec.npz,
                              site_info=info, model_name=spec.model_name, locations=locations)


def write_batch(batch, spec_json: str) -> pd.DataFrame:
    spec = ExtractSpec.from_json(spec_json)
    rows = write_rows(batch, spec)
    release_memory()
    return pd.DataFrame(rows, columns=list(ACCOUNT_COLUMNS))


# -- the CellProfiler baseline: one CPU task per site ---------------------------------------------

def cellprofiler_rows(rows: list[dict], spec: ExtractSpec, source: src.SiteSource) -> list[dict]:
    from raycp.extract.cellprofiler import measure_site

    out = []
    for row in rows:
        key = src.site_key(row)
        t0 = time.perf_counter()
        try:
            table, images, labels = source.cp_site(row)
            t1 = time.perf_counter()
            feats, border = measure_site(images, list(spec.source["channels"]), labels, source.cfg.cellprofiler,
                                         n_objects=len(table))
            del images, labels
            t2 = time.perf_counter()
            meta = source.cell_metadata(row, key, table, border)  # border: the *cell* touches the image edge
            n = write_features(spec, key, meta, feats.to_numpy(np.float32), json.loads(_site_info(
                row, list(spec.source["channels"]))), names=list(feats.columns))
            out.append(_account(key, status=PROCESSED, n_cells=n, decode_s=t1 - t0, model_s=t2 - t1,
                                write_s=time.perf_counter() - t2))
        except Exception as exc:  # noqa: BLE001
            out.append(_account(key, status=QUARANTINED, reason=short_reason(exc), decode_s=time.perf_counter() - t0))
    return out


def cellprofiler_batch(batch: pd.DataFrame, spec_json: str) -> pd.DataFrame:
    spec, source = _source(spec_json)
    rows = cellprofiler_rows(batch.to_dict("records"), spec, source)
    release_memory()
    return pd.DataFrame(rows, columns=list(ACCOUNT_COLUMNS))


# -- driver ---------------------------------------------------------------------------------------

@dataclass
class ExtractResult:
    """What the stage did: its ledger, the model's identity, and run figures (printed by the CLI)."""

    ledger: Ledger
    folder: str
    model: dict
    figures: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        return {**self.ledger.summary(), **self.figures}


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
        raise InputError("inference.device=cuda but the Ray cluster has no GPU",
                         fix="start Ray with GPUs (compute.num_gpus) or set inference.device=cpu")
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

    run = cfg.data.output
    index, compressed = _index(cfg)
    input_ = src.decide_input(cfg, run)
    kind = cfg.model.kind
    channels = list(cfg.data.channels)
    locate = src.decide_locate(cfg, run) if input_ == "images" else "detect"
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
        extractor = load_extractor(cfg.model, channels, run=run, device="cpu", batch_size=1, crop_size=crop_size)
        info = extractor.info
        model_channels, names = info.channels, info.feature_names
        model_json = info.to_json()
        del extractor
    model_json.update({"name": cfg.model.folder_name, "layer": cfg.model.layer if kind != "cellprofiler" else None,
                       "input": input_, "crop_size": crop_size if kind != "cellprofiler" else None})
    layout = RunLayout(run).features(cfg.model.folder_name, cfg.outputs.npz_layout)
    _check_model_json(layout, model_json)
    source = src.SourceSpec(run=run, input=input_, channels=list(model_channels),
                            config=cfg.model_dump(mode="json"), correct=correct, compressed=compressed,
                            locate=locate, metadata_columns=src.metadata_columns(index.table))
    inf = cfg.inference
    spec = ExtractSpec(source=asdict(source), model=cfg.model.model_dump(mode="json"), model_name=cfg.model.folder_name,
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

        gpus = runtime.cluster_gpus()
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
    resumed_rows = [_account(k, status=PROCESSED) for k in p.resumed]

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
