"""Reading profile tables (cells, sites, wells, treatments) for the profiles and evaluation stages.

A profile table has ``Metadata_*`` columns and feature columns. Features are every numeric column
whose name does not start with ``Metadata_`` (CellProfiler's ``Cells_*`` or a CNN's ``0..671``
alike). Formats: ``.csv``, ``.csv.gz`` and ``.parquet`` (a file or a folder of Parquet files).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from raycp.errors import InputError

METADATA_PREFIX = "Metadata_"

_CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def table_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"parquet"`` from the file name; a folder is read as Parquet."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir() or name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    raise InputError(
        f"{path}: unknown table format (expected .csv, .csv.gz or .parquet)",
        fix="convert the table to CSV or Parquet and name it accordingly",
    )


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a file or folder, sorted by name."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.name.lower().endswith(_PARQUET_SUFFIXES))
        if not files:
            raise InputError(f"{path}: folder holds no .parquet file", fix="point to a Parquet file or folder")
        return files
    if not p.exists():
        raise InputError(f"{path}: file not found", fix="check the path")
    return [p]


def read_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a whole profile table (CSV, CSV.GZ or Parquet file/folder) into a DataFrame.

    Numeric columns keep their stored dtype (float32 stays float32)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: file not found", fix="check the path")
    fmt = table_format(p)
    try:
        if fmt == "csv":
            sep = "\t" if ".tsv" in p.name.lower() else ","
            return pd.read_csv(p, sep=sep, usecols=list(columns) if columns is not None else None, low_memory=False)
        files = parquet_files(p)
        frames = [pd.read_parquet(f, columns=list(columns) if columns is not None else None) for f in files]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    except (ValueError, OSError, KeyError) as exc:  # pandas/pyarrow parse errors
        raise InputError(f"{path}: cannot read table ({exc})", fix="check that the file is a valid CSV or Parquet table") from exc


def is_feature_column(name: str, dtype) -> bool:
    """A feature is a numeric, non-boolean column whose name does not start with ``Metadata_``."""
    return (
        not str(name).startswith(METADATA_PREFIX)
        and pd.api.types.is_numeric_dtype(dtype)
        and not pd.api.types.is_bool_dtype(dtype)
    )


def feature_columns(df: pd.DataFrame, source: str = "table") -> list[str]:
    """Every numeric non-``Metadata_`` column of ``df``, in table order; error when there is none."""
    feats = [c for c in df.columns if is_feature_column(c, df.dtypes[c])]
    if not feats:
        raise InputError(
            f"{source}: no feature column (features are numeric columns not starting with 'Metadata_')",
            fix="check the table; metadata columns must start with 'Metadata_'",
        )
    return feats


def metadata_columns(df: pd.DataFrame) -> list[str]:
    """The ``Metadata_*`` columns of ``df``."""
    return [c for c in df.columns if str(c).startswith(METADATA_PREFIX)]


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: str, what: str = "column") -> None:
    """Raise an InputError naming the first of ``columns`` missing from ``df``."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{source}: {what} {missing[0]!r} not found" + (f" (also missing: {missing[1:]})" if missing[1:] else ""),
            fix=f"pass an existing column; available metadata: {metadata_columns(df)[:20]}",
        )


def feature_matrix(df: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    """The features of ``df`` as one C-contiguous array, keeping a common float dtype.

    float32 stays float32 (no silent upcast); integer columns become float64."""
    dtypes = {df.dtypes[c] for c in features}
    dtype = np.float32 if dtypes == {np.dtype(np.float32)} else np.float64
    X = np.ascontiguousarray(df[list(features)].to_numpy(dtype=dtype, copy=False))
    return X if X.flags.writeable else X.copy()  # never a read-only view of the frame


def check_finite(X: np.ndarray, features: Sequence[str], source: str) -> None:
    """Raise an InputError naming the first feature column that holds ±inf."""
    bad = np.isinf(X).any(axis=0)
    if bad.any():
        cols = [features[i] for i in np.flatnonzero(bad)]
        raise InputError(
            f"{source}: feature column {cols[0]!r} contains inf" + (f" ({len(cols)} columns in all)" if len(cols) > 1 else ""),
            fix="remove or fix the infinite values (NaN rows are dropped and counted; inf is not)",
        )


def nan_rows(X: np.ndarray) -> np.ndarray:
    """Boolean mask of rows holding any NaN."""
    return np.isnan(X).any(axis=1)


def iter_record_batches(path: str | os.PathLike, columns: Sequence[str] | None, batch_rows: int) -> Iterator:
    """Stream a CSV/CSV.GZ/Parquet table as pyarrow RecordBatches of at most ``batch_rows`` rows."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    p = Path(path)
    if table_format(p) == "parquet":
        for f in parquet_files(p):
            pf = pq.ParquetFile(f)
            yield from pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns is not None else None)
        return
    opts = pacsv.ConvertOptions(include_columns=list(columns) if columns is not None else None)
    parse = pacsv.ParseOptions(delimiter="\t" if ".tsv" in p.name.lower() else ",")
    stream = pa.input_stream(str(p), compression="detect")
    reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=1 << 22), parse_options=parse, convert_options=opts)
    for batch in reader:
        for start in range(0, batch.num_rows, batch_rows):
            yield batch.slice(start, batch_rows)


def schema_columns(path: str | os.PathLike) -> dict[str, object]:
    """Column name → pandas-compatible dtype of a table, without reading its rows (CSV: first rows)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if table_format(p) == "parquet":
        schema = pq.ParquetFile(parquet_files(p)[0]).schema_arrow
        index_cols = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
        out = {}
        for name in schema.names:
            if name in index_cols or name.startswith("__index_level_"):
                continue  # a pandas index stored by to_parquet, not a feature
            try:
                out[name] = schema.field(name).type.to_pandas_dtype()
            except NotImplementedError:
                out[name] = object
        return out
    head = pd.read_csv(p, nrows=100, sep="\t" if ".tsv" in p.name.lower() else ",")
    return dict(head.dtypes.items())
