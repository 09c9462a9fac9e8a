"""Feature outputs of one model, per site, written atomically (paper Methods, "Feature aggregation").

Layout under ``<run>/features/<model>/`` (:class:`raycp.layout.FeatureSetLayout`)::

    cells/<plate>/<well>_<site>.parquet   one row per cell: Metadata_* + float32 features
    npz/<plate>/<well>/<site>.npz         optional, DeepProfiler's per-site file (features, metadata, locations)
    sites/<plate>/<well>_<site>.parquet   the site's median profile (the paper's first aggregation
                                          step; one row, features as a list column); written LAST,
                                          so it marks the site as finished
    sites.parquet                         every finished site's median, compacted at the end (wide:
                                          Metadata_* + one float32 column per feature)
    model.json                            which model made these features (fingerprint, names, layer)
    ledger.parquet, ledger.json, config.yaml, _SUCCESS

Site medians follow ``raycp profile aggregate`` (a cell holding a NaN feature is left out,
``np.median`` in float32, ``Metadata_n_cells``), so ``raycp profile aggregate cells/`` and
``sites.parquet`` agree and ``aggregate_wells`` reads ``sites.parquet`` unchanged. They agree
exactly while no feature is NaN in more than ``--na-cutoff`` of the cells (always, for CNN
features): a site is written before the screen's NaN fractions are known, so only ``raycp
profile aggregate`` can drop such a feature first; the profiles and evaluation apply the same
rule to the well profiles. Files are
Parquet without pandas metadata and with fixed writer options: identical inputs give identical bytes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from raycp.io import urls
from raycp.io.index import KEYS, PLATE, SITE, WELL
from raycp.layout import FeatureSetLayout, list_site_files

N_CELLS = "Metadata_n_cells"
FEATURES = "features"
FEATURE_NAMES_KEY = b"raycp.feature_names"


# -- tables ---------------------------------------------------------------------------------------

def _arrow_metadata(meta: pd.DataFrame):
    """Metadata columns as Arrow arrays with stable types (object -> string, nulls -> string)."""
    import pyarrow as pa

    arrays, names = [], []
    for col in meta.columns:
        values = meta[col]
        if values.dtype == object or str(values.dtype).startswith(("string", "str")):
            arr = pa.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                            for v in values], type=pa.string())
        else:
            arr = pa.array(values.to_numpy())
            if pa.types.is_null(arr.type):
                arr = arr.cast(pa.string())
        arrays.append(arr)
        names.append(str(col))
    return arrays, names


def features_table(meta: pd.DataFrame, features: np.ndarray, names: list[str], *, extra: dict | None = None):
    """An Arrow table: ``meta`` columns then float32 ``features`` columns (no pandas metadata)."""
    import pyarrow as pa

    features = np.asarray(features, dtype=np.float32)
    if features.shape != (len(meta), len(names)):
        raise ValueError(f"features {features.shape} for {len(meta)} rows × {len(names)} names")
    arrays, cols = _arrow_metadata(meta)
    by_column = np.ascontiguousarray(features.T)  # one copy; each column is then a zero-copy view
    arrays += [pa.array(by_column[j]) for j in range(by_column.shape[0])]
    cols += list(names)
    schema_meta = {b"raycp.features": json.dumps(extra or {}, sort_keys=True).encode()} if extra else None
    return pa.Table.from_arrays(arrays, names=cols).replace_schema_metadata(schema_meta)


#: Options of every feature file: features are wide (672 to ~3,400 float32 columns) and short (one
#: site), so the per-column costs dominate; float features do not compress, statistics and
#: dictionaries only add bytes. These options write 2.4× faster and 1.8× smaller than zstd + stats.
PARQUET_OPTIONS = {"compression": "none", "write_statistics": False, "use_dictionary": False,
                   "store_schema": False}


def parquet_bytes(table, *, store_schema: bool = False) -> bytes:
    """Deterministic Parquet bytes (one row group, fixed options; ``store_schema`` keeps the Arrow
    schema and its metadata, e.g. the feature names of a site file)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=max(1, table.num_rows), **{**PARQUET_OPTIONS, "store_schema": store_schema})
    return buf.getvalue()


def site_median(features: np.ndarray) -> tuple[np.ndarray, int]:
    """``(median per feature in float32, cells used)``: cells holding any NaN are left out, exactly
    as ``raycp profile aggregate`` does; all NaN (or no cell) gives a NaN row and 0 cells."""
    X = np.asarray(features, dtype=np.float32)
    bad = np.isnan(X).any(axis=1)
    X = X[~bad]
    if len(X) == 0:
        return np.full(features.shape[1], np.nan, dtype=np.float32), 0
    return np.median(X, axis=0).astype(np.float32, copy=False), int(len(X))


def site_metadata(meta: pd.DataFrame, key: dict, n_cells: int) -> pd.DataFrame:
    """One row: the site keys, ``Metadata_n_cells``, then the site-constant ``Metadata_*`` of its cells."""
    row = {PLATE: [key[PLATE]], WELL: [key[WELL]], SITE: np.array([key[SITE]], dtype=np.int64),
           N_CELLS: np.array([n_cells], dtype=np.int64)}
    out = pd.DataFrame(row)
    for col in meta.columns:
        if col in out.columns or col in KEYS or not str(col).startswith("Metadata_"):
            continue
        values = meta[col]
        if len(values) and (values.astype(str) == str(values.iloc[0])).all():
            out[col] = values.iloc[[0]].reset_index(drop=True)
    return out


def site_table(meta_row: pd.DataFrame, median: np.ndarray, names: list[str]):
    """A site's median as one row: metadata columns + ``features`` (fixed-size list of float32) and
    the feature names in the schema metadata. Narrow on purpose: a 1-row file with one Parquet column
    per feature costs ~30 µs per column to write; ``sites.parquet`` (compacted, wide) is the table
    the profiles stage reads."""
    import pyarrow as pa

    arrays, cols = _arrow_metadata(meta_row)
    values = pa.array(np.asarray(median, dtype=np.float32).reshape(-1))
    arrays.append(pa.FixedSizeListArray.from_arrays(values, len(names)))
    cols.append(FEATURES)
    return pa.Table.from_arrays(arrays, names=cols).replace_schema_metadata(
        {FEATURE_NAMES_KEY: json.dumps(list(names)).encode()})


def wide_sites(table):
    """Narrow site rows (:func:`site_table`) -> the wide profile table: one float32 column per feature."""
    import pyarrow as pa

    names = json.loads(table.schema.metadata[FEATURE_NAMES_KEY])
    column = table.column(FEATURES).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, len(names))
    by_column = np.ascontiguousarray(values.T, dtype=np.float32)
    meta = table.drop_columns([FEATURES]).replace_schema_metadata(None)
    return pa.Table.from_arrays([*meta.columns, *(pa.array(by_column[j]) for j in range(len(names)))],
                                names=[*meta.column_names, *names])


def npz_metadata(row_meta: dict, model_name: str) -> dict:
    """DeepProfiler's per-site metadata dict (plain values), with ``Metadata_Model`` for pycytominer."""
    out = {}
    for k, v in row_meta.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating,)):
            v = float(v)
        elif isinstance(v, (np.bool_,)):
            v = bool(v)
        out[str(k)] = v
    out["Metadata_Model"] = model_name
    return out


# -- one site --------------------------------------------------------------------------------------

def write_site(layout: FeatureSetLayout, key: dict, meta: pd.DataFrame, features: np.ndarray, names: list[str], *,
               npz: bool = False, site_info: dict | None = None, model_name: str = "raycp",
               locations: np.ndarray | None = None) -> int:
    """Write a site's cells, optional npz, then its median (the site's finished mark); returns n cells."""
    from raycp.io.npz import encode_npz

    plate, well, site = key[PLATE], key[WELL], key[SITE]
    urls.atomic_write_bytes(layout.cells(plate, well, site), parquet_bytes(features_table(meta, features, names)))
    if npz:
        locs = locations if locations is not None else np.zeros((len(meta), 2), dtype=np.float64)
        urls.atomic_write_bytes(layout.npz(plate, well, site),
                                encode_npz(features, npz_metadata(site_info or dict(key), model_name), locs))
    median, used = site_median(features)
    urls.atomic_write_bytes(layout.site(plate, well, site),
                            parquet_bytes(site_table(site_metadata(meta, key, used), median, names), store_schema=True))
    return int(len(meta))


# -- resume and compaction ------------------------------------------------------------------------

def list_finished(layout: FeatureSetLayout) -> set[tuple[str, str, int]]:
    """Sites with a median file: one listing of ``sites/`` (no per-site probes)."""
    return list_site_files(layout.sites_folder, ".parquet")


def _read_site_table(url: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(urls.read_bytes(url)))


def iter_site_tables(layout: FeatureSetLayout, keys: Iterable[dict], *, threads: int = 16,
                     window: int = 256) -> Iterator[tuple[dict, object]]:
    """``(key, one-row Arrow table)`` of finished sites, in the order of ``keys`` (parallel reads,
    at most ``window`` in flight)."""
    keys = list(keys)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for lo in range(0, len(keys), window):
            chunk = keys[lo:lo + window]
            tables = pool.map(lambda k: _read_site_table(layout.site(k[PLATE], k[WELL], k[SITE])), chunk)
            yield from zip(chunk, tables)


def compact_sites(layout: FeatureSetLayout, keys: list[dict]) -> dict[tuple, int]:
    """``sites.parquet`` from the per-site medians of ``keys`` (index order), streamed through a
    local temp file (memory: one window of rows); returns ``{(plate, well, site): n_cells}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts: dict[tuple, int] = {}
    if not keys:
        return counts
    with tempfile.TemporaryDirectory() as tmpdir:
        local = os.path.join(tmpdir, "sites.parquet")
        writer = None
        pending: list = []

        def flush() -> None:
            nonlocal writer
            if not pending:
                return
            names = pending[0].schema.metadata[FEATURE_NAMES_KEY]
            table = pa.concat_tables([t.replace_schema_metadata(None) for t in pending], promote_options="permissive")
            table = wide_sites(table.replace_schema_metadata({FEATURE_NAMES_KEY: names}))
            if writer is None:
                writer = pq.ParquetWriter(local, table.schema, **{**PARQUET_OPTIONS, "store_schema": True})
            elif table.schema != writer.schema:
                table = table.select(writer.schema.names).cast(writer.schema)
            writer.write_table(table)
            pending.clear()

        for key, table in iter_site_tables(layout, keys):
            counts[(key[PLATE], key[WELL], key[SITE])] = int(table.column(N_CELLS)[0].as_py())
            pending.append(table)
            if len(pending) >= 4096:
                flush()
        flush()
        writer.close()
        urls.upload_file(local, layout.sites_table)
    return counts


def read_cells(url: str) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A per-cell features file: ``(metadata, N×D float32 features, feature names)``."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(urls.read_bytes(url)))
    meta_cols = [c for c in table.column_names if c.startswith("Metadata_")]
    names = [c for c in table.column_names if not c.startswith("Metadata_")]
    feats = np.stack([table.column(c).to_numpy() for c in names], axis=1) if names else np.zeros((table.num_rows, 0))
    return table.select(meta_cols).to_pandas(), feats.astype(np.float32, copy=False), names
