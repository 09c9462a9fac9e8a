"""The extraction stage's work inside Ray Data: the three operators' functions (decode tasks, the
model actor, write tasks) and the CellProfiler baseline's one task per site. Each gets the stage's
:class:`ExtractSpec` as JSON (no user data is ever unpickled); a site travels between operators as
one row of Arrow values. The driver side (plan, stream, ledger) is :mod:`raycp.extract.pipeline`.
"""


from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycp.extract import sources as src
from raycp.extract import writers
from raycp.io.index import KEYS, PLATE, SITE, WELL, url_col
from raycp.layout import FeatureSetLayout
from raycp.ledger import PROCESSED, QUARANTINED, short_reason
from raycp.sites import JsonSpec, release_memory

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

def account_row(key: dict, *, status: str, reason: str = "", n_cells: int = 0, forward_calls: float = 0,
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
            out.append(account_row(key, status=QUARANTINED, reason=item["reason"], **timing))
            continue
        t0 = time.perf_counter()
        try:
            meta = _ipc_frame(_as_buffer(batch.column("meta"), i))
            feats = np.frombuffer(_as_buffer(batch.column("features"), i), dtype=np.float32).reshape(len(meta), item["dim"])
            n = write_features(spec, key, meta, feats, json.loads(item["info"]))
            out.append(account_row(key, status=PROCESSED, n_cells=n, write_s=time.perf_counter() - t0, **timing))
        except Exception as exc:  # noqa: BLE001
            out.append(account_row(key, status=QUARANTINED, reason=short_reason(exc), **timing))
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
            out.append(account_row(key, status=PROCESSED, n_cells=n, decode_s=t1 - t0, model_s=t2 - t1,
                                write_s=time.perf_counter() - t2))
        except Exception as exc:  # noqa: BLE001
            out.append(account_row(key, status=QUARANTINED, reason=short_reason(exc), decode_s=time.perf_counter() - t0))
    return out


def cellprofiler_batch(batch: pd.DataFrame, spec_json: str) -> pd.DataFrame:
    spec, source = _source(spec_json)
    rows = cellprofiler_rows(batch.to_dict("records"), spec, source)
    release_memory()
    return pd.DataFrame(rows, columns=list(ACCOUNT_COLUMNS))
