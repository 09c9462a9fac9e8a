"""Training data: crop shards → the driver's metadata view → per-rank batches of crops.

The shards' layout (pure pyarrow, unit-tested without Ray) and the Ray Data adapter that streams
crops to each Ray Train worker.

**Crop shards** (``raycp preprocess``): Parquet files with a column of uint8 C×S×S crops (S = 128
in the paper; raw bytes with ``raycp.crop_shape`` in the schema, or a tensor type) and
``Metadata_*`` columns (plate, well, site, treatment, ...). The driver reads only
the metadata columns and the row-group layout (:func:`read_crop_metadata`); a crop is addressed by
its *sid*, its row number in the concatenation of the shards (sorted by path).

Which crops an epoch draws is :mod:`raycp.train.sampling`; the augmentations applied on the
device are :mod:`raycp.train.augment`.

**Crop normalisation** (:func:`raycp.models.normalize.normalize`), per crop and per channel, as DeepProfiler has done
since its 2024 TF2 crop generator (``fold_channels`` in ``plugins/crop_generators``; before that it
divided each crop by its maximum, or by 255)::

    x = pixel / 255;   x' = (x − mean_c) / max(std_c, eps)

with mean and (population) standard deviation over the S×S pixels of channel c of that crop, and
``eps = 1e-6`` so that an empty channel becomes zeros instead of NaN (DeepProfiler has no floor).
It removes every absolute intensity difference between crops, so brightness batch effects cannot be
learnt from the mean level; the extraction stage must apply the same function (``model.json``
records it).
"""


from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.preprocess.crops import shard_urls, tensor_to_numpy
from raycp.train.sampling import EpochPlan

logger = logging.getLogger(__name__)

PLATE, WELL, SITE = "Metadata_Plate", "Metadata_Well", "Metadata_Site"
IS_CONTROL, TOUCHES_BORDER = "Metadata_IsControl", "Metadata_TouchesBorder"
#: Parquet schema metadata keys a crop writer may use to declare its tensor layout.
_SHAPE_KEYS = (b"raycp.crop_shape", b"crop_shape")
_CHANNEL_KEYS = (b"raycp.channels", b"channels")


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


def _training_index(url: str) -> pd.DataFrame | None:
    """A combined training index (``raycp trainset combine``: a Parquet file with ``crops_file``),
    or None when ``url`` is crop shards."""
    import pyarrow.parquet as pq

    from raycp.trainset.combine import CROPS_FILE

    fs, path = urls.filesystem(url)
    if not (path.endswith(".parquet") and fs.isfile(path)):
        return None
    with fs.open(path, "rb") as fh:
        if CROPS_FILE not in pq.read_schema(fh).names:
            return None
        return pq.read_table(fh).to_pandas()


def _select_indexed(meta: pd.DataFrame, files: list[str], index: pd.DataFrame, label: str, url: str) -> pd.DataFrame:
    """The shards' rows that the training index lists, with its source and label; plates are
    named ``<source>:<plate>`` so that two sources' plates of the same name stay apart. A cell
    listed twice (two sources over the same shards) is a sample once per listing. An index of one
    source (a sweep's subset of one run) keeps the plates' own names."""
    from raycp.trainset.combine import CROPS_FILE, KEYS, SOURCE

    where = {f: i for i, f in enumerate(files)}
    idx = index.assign(_file=index[CROPS_FILE].map(where).astype(np.int64))
    meta = meta.drop(columns=[label], errors="ignore").astype({"_file": np.int64})
    picked = meta.merge(idx[["_file", *KEYS, SOURCE, label]], on=["_file", *KEYS], how="inner", validate="one_to_many")
    if len(picked) != len(index):
        raise InputError(f"{url}: {len(index) - len(picked)} of {len(index)} listed cells are not in their crop shards",
                         fix="rebuild the training set (raycp trainset combine) from the current crops")
    if picked[SOURCE].nunique() > 1:  # one source (a subset of one run) keeps its plate names
        picked["Metadata_Plate"] = picked[SOURCE].astype(str) + ":" + picked["Metadata_Plate"].astype(str)
    picked["_file"] = picked["_file"].astype(np.int32)
    return picked.sort_values(["_file", "_rg", "_row"]).reset_index(drop=True)


def read_crop_metadata(url: str, *, label: str, crop_column: str | None = None,
                       extra: tuple[str, ...] = ()) -> CropSet:
    """Metadata columns and row-group layout of every crop shard (no pixels are read but one crop).

    ``url`` is a folder (or file) of crop shards, or a combined training index (``raycp trainset
    combine``): then the shards it lists, only its cells, with its labels and sources."""
    _register_tensor_types()
    index = _training_index(url)
    if index is not None:
        from raycp.trainset.combine import CROPS_FILE

        files = sorted(index[CROPS_FILE].unique())
    else:
        files = list_crop_files(url)
    frames, column, shape, channels = [], None, None, None
    for i, f in enumerate(files):
        pf = _open_parquet(f)
        schema = pf.schema_arrow
        col = _detect_crop_column(schema, f, crop_column or column)
        column = column or col
        if label not in schema.names and index is None:
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
    if index is not None and not meta.empty:
        meta = _select_indexed(meta, files, index, label, url)
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

    from raycp import runtime

    runtime.no_data_progress_bars()
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

    def load(self, sids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted unique sids, crops)`` covering ``sids``, through the cache (outside an epoch's plan)."""
        return self._load(sids)

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
