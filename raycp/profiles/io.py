"""Reading profile tables (cells, sites, wells, treatments) for the profiles and evaluation stages.

A profile table has ``Metadata_*`` columns and feature columns. Features are every numeric column
whose name does not start with ``Metadata_`` (CellProfiler's ``Cells_*`` or a CNN's ``0..671``
alike). Formats: ``.csv``, ``.csv.gz`` and ``.parquet`` (a file or a folder of Parquet files).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io.tables import is_metadata, read_csv_text

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

    Numeric columns keep their stored dtype (float32 stays float32); a CSV's ``Metadata_*``
    columns stay text exactly as written (plate ``000123`` stays ``000123``)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: file not found", fix="check the path")
    fmt = table_format(p)
    try:
        if fmt == "csv":
            return read_csv_text(str(p), url=str(p), usecols=columns)
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


def feature_view(df: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    """The features of ``df`` (rows × features, the common float dtype as :func:`feature_matrix`),
    read only, and without a copy when they are consecutive columns of one dtype (a table raycp
    wrote); otherwise a copy. For operations that only read the features of a large table."""
    features = list(features)
    dtypes = {df.dtypes[c] for c in features}
    dtype = np.float32 if dtypes == {np.dtype(np.float32)} else np.float64
    loc = [df.columns.get_loc(c) for c in features]
    if len(dtypes) == 1 and all(isinstance(i, int) for i in loc) and loc == list(range(loc[0], loc[0] + len(loc))):
        X = df.iloc[:, loc[0]:loc[0] + len(loc)].to_numpy(dtype=dtype, copy=False)
    else:
        X = df[features].to_numpy(dtype=dtype)
    X = X.view()
    X.flags.writeable = False
    return X


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


NA_CUTOFF = 0.05
"""Default NaN cutoff: a feature missing (NaN) in more than this fraction of the rows is dropped
before any row is (pycytominer's ``feature_select`` operation ``drop_na_columns``, same default and
same rule: drop when the fraction is greater than the cutoff). 1.0 keeps every feature."""


def na_features(nan_counts: np.ndarray, n_rows: int, features: Sequence[str], cutoff: float = NA_CUTOFF) -> list[str]:
    """The features whose NaN fraction (``nan_counts / n_rows``) is greater than ``cutoff``, in
    table order (pycytominer's ``drop_na_columns`` rule). Raises ``ValueError`` for a cutoff
    outside [0, 1]."""
    if not 0.0 <= float(cutoff) <= 1.0:
        raise ValueError(f"the NaN cutoff must be in [0, 1], not {cutoff}")
    if n_rows <= 0:
        return []
    frac = np.asarray(nan_counts, dtype=np.float64) / float(n_rows)
    return [f for f, x in zip(features, frac) if x > cutoff]


@dataclass
class FeatureMatrix:
    """The features of a profile table after the NaN rule, per feature then per row.

    ``X`` (rows × ``features``, all rows of the table), ``features`` (kept, table order),
    ``dropped_na`` (features whose NaN fraction exceeded ``na_cutoff``; listed in every
    accounting), ``ok`` (rows without a NaN among the kept features: the rows a stage uses)."""

    X: np.ndarray
    features: list[str]
    dropped_na: list[str]
    ok: np.ndarray
    na_cutoff: float

    def accounting(self) -> dict:
        return {"na_cutoff": self.na_cutoff, "features": len(self.features),
                "features_dropped_na": list(self.dropped_na), "rows_dropped_nan": int((~self.ok).sum())}


def feature_matrix_na(df: pd.DataFrame, features: Sequence[str] | None = None, *, na_cutoff: float = NA_CUTOFF,
                      source: str = "table") -> FeatureMatrix:
    """The features of ``df`` (every numeric non-``Metadata_`` column unless given) with the NaN
    rule applied: features NaN in more than ``na_cutoff`` of the rows are dropped first (a feature
    NaN in every row, as MAD-normalising a constant feature gives, always is, unless the cutoff
    is 1), then rows holding a NaN among the rest are marked not ``ok``. ±inf is an error naming
    the column. A row NaN in every feature (a well whose sites had no cell) is a missing row: it
    does not count towards a feature's NaN fraction, and is left out. Raises :class:`InputError`
    when no feature is left."""
    feats = list(features) if features is not None else feature_columns(df, source)
    X = feature_matrix(df, feats)
    check_finite(X, feats, source)
    isnan = np.isnan(X)
    empty = isnan.all(axis=1) if X.shape[1] else np.zeros(len(X), dtype=bool)
    try:  # a row NaN in every feature (a well without cells) is a missing row, not evidence on a feature
        dropped = na_features(isnan[~empty].sum(axis=0), int((~empty).sum()), feats, na_cutoff)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}", fix="pass --na-cutoff between 0 and 1 (pycytominer's default 0.05)") from None
    if len(X) and empty.all():
        raise InputError(f"{source}: every row is NaN in every feature column", fix="check the table")
    if dropped:
        if len(dropped) == len(feats):
            raise InputError(f"{source}: every feature column is NaN in more than {na_cutoff:g} of the rows "
                             f"(first: {dropped[0]!r})", fix="check the table, or raise --na-cutoff")
        gone = set(dropped)
        keep = [i for i, f in enumerate(feats) if f not in gone]
        feats = [feats[i] for i in keep]
        X = np.ascontiguousarray(X[:, keep])
    return FeatureMatrix(X=X, features=feats, dropped_na=dropped, ok=~np.isnan(X).any(axis=1),
                         na_cutoff=float(na_cutoff))


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
    header = schema_columns(p)
    text = {c: pa.string() for c in header if is_metadata(c)}
    opts = pacsv.ConvertOptions(include_columns=list(columns) if columns is not None else None, column_types=text,
                                strings_can_be_null=True)
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
    head = read_csv_text(str(p), url=str(p), nrows=100)
    return dict(head.dtypes.items())
