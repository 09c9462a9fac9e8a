"""Population profiles: cells → site (median) → well (mean) → treatment (mean).

Moshkov et al. 2024, Methods "Feature aggregation and profiling": single-cell features are
aggregated with the median per field of view (site), sites with the mean per well, and wells with
the mean per treatment; the same for CellProfiler and CNN features.

``aggregate_cells`` streams the single cells (bounded memory, 10^8 cells): when the rows of each
site are contiguous in the input (the usual layout of a per-site feature writer), one pass computes
each site's median as soon as the site ends. Otherwise the cells are first hash-partitioned by site
into temporary Parquet files of bounded size (no global sort), and each partition is reduced in
turn. NaN is handled per feature, then per cell: a feature NaN in more than ``na_cutoff`` of the
cells is dropped (pycytominer's ``drop_na_columns`` rule, default 0.05), then cells holding a NaN
among the remaining features are dropped and counted per site; ±inf is an error naming the column.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.profiles.io import (
    NA_CUTOFF,
    check_finite,
    feature_columns,
    feature_matrix,
    is_feature_column,
    iter_record_batches,
    na_features,
    require_columns,
    schema_columns,
)

PLATE_COL, WELL_COL, SITE_COL = "Metadata_Plate", "Metadata_Well", "Metadata_Site"
SITE_COLS: tuple[str, ...] = (PLATE_COL, WELL_COL, SITE_COL)
WELL_COLS: tuple[str, ...] = ("Metadata_Plate", "Metadata_Well")
N_CELLS_COL = "Metadata_n_cells"
N_SITES_COL = "Metadata_n_sites"
N_WELLS_COL = "Metadata_n_wells"


# --------------------------------------------------------------------------------------------
# Table-level aggregation (sites → wells → treatments)
# --------------------------------------------------------------------------------------------
def group_codes(df: pd.DataFrame, by: Sequence[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Group number of each row (-1 where a key is missing) and the sorted distinct keys."""
    grouped = df.groupby(list(by), sort=True, dropna=True, observed=True)
    codes = grouped.ngroup().fillna(-1).to_numpy(dtype=np.int64)  # NaN for a missing key
    keys = grouped.size().index.to_frame(index=False)
    return codes, keys


def group_rows(codes: np.ndarray) -> list[np.ndarray]:
    """The row indices of each group, groups in increasing code order, rows in table order
    (``codes``: one integer per row, e.g. :func:`group_codes`'s or ``pd.factorize``'s, none negative)."""
    codes = np.asarray(codes)
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if len(order) else []


def group_mean(X: np.ndarray, codes: np.ndarray, n_groups: int, chunk_rows: int = 1 << 15) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of ``X`` per group code (rows with code -1 are ignored).

    Sums accumulate in float64 (a sparse indicator product over chunks of ``chunk_rows`` rows, so
    a float32 ``X`` is never copied whole to float64); the means come back in ``X``'s dtype."""
    import scipy.sparse

    codes = np.asarray(codes, dtype=np.int64)
    keep = codes >= 0
    counts = np.bincount(codes[keep], minlength=n_groups).astype(np.int64)
    sums = np.zeros((n_groups, X.shape[1]), dtype=np.float64)
    for lo in range(0, len(codes), chunk_rows):
        hi = min(lo + chunk_rows, len(codes))
        c = codes[lo:hi]
        rows = np.flatnonzero(c >= 0)
        if not rows.size:
            continue
        groups, local = np.unique(c[rows], return_inverse=True)
        ind = scipy.sparse.csr_matrix((np.ones(rows.size), (local, rows)), shape=(len(groups), hi - lo))
        sums[groups] += ind @ X[lo:hi].astype(np.float64, copy=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (sums / counts[:, np.newaxis]).astype(X.dtype, copy=False)
    return out, counts


def aggregate(
    df: pd.DataFrame,
    by: Sequence[str],
    features: Sequence[str] | None = None,
    how: str = "mean",
    count_col: str | None = None,
    source: str = "table",
) -> pd.DataFrame:
    """Group ``df`` by the ``by`` columns and reduce each feature with ``how`` (mean or median).

    Rows with a missing key are dropped. Float32 features stay float32 (means accumulate in
    float64). The result holds the keys, an optional row count column and the features, sorted by
    key."""
    if how not in ("mean", "median"):
        raise ValueError(f"how must be 'mean' or 'median', not {how!r}")
    by = list(by)
    require_columns(df, by, source, "grouping column")
    feats = list(features) if features is not None else feature_columns(df, source)
    require_columns(df, feats, source, "feature column")
    _check_finite_frame(df, feats, source)
    if how == "median":
        grouped = df.groupby(by, sort=True, dropna=True, observed=True)
        out = grouped[feats].median()
        if count_col:
            out.insert(0, count_col, grouped.size().astype(np.int64))
        return out.reset_index()
    codes, keys = group_codes(df, by)
    means, counts = group_mean(feature_matrix(df, feats), codes, len(keys))
    if count_col:
        keys[count_col] = counts
    return pd.concat([keys, pd.DataFrame(means, columns=feats)], axis=1)


def aggregate_wells(
    sites: pd.DataFrame, well_cols: Sequence[str] = WELL_COLS, features: Sequence[str] | None = None
) -> pd.DataFrame:
    """Well profiles: the mean of a well's site profiles (paper: fields of view → well by mean)."""
    return aggregate(sites, well_cols, features, "mean", count_col=N_SITES_COL, source="sites")


def aggregate_treatments(
    wells: pd.DataFrame, treatment_cols: Sequence[str], features: Sequence[str] | None = None
) -> pd.DataFrame:
    """Treatment profiles: the mean of a treatment's replicate wells (paper: wells → treatment by mean)."""
    return aggregate(wells, treatment_cols, features, "mean", count_col=N_WELLS_COL, source="wells")


def _check_finite_frame(df: pd.DataFrame, feats: Sequence[str], source: str) -> None:
    """Raise an InputError naming the first feature column of ``df`` that holds ±inf."""
    for c in feats:
        if np.isinf(df[c].to_numpy()).any():
            check_finite(df[[c]].to_numpy(), [c], source)


# --------------------------------------------------------------------------------------------
# Streaming single cells → site medians → well means
# --------------------------------------------------------------------------------------------
@dataclass
class CellAggregation:
    """Result of :func:`aggregate_cells`.

    ``sites``: one row per site (site keys, ``Metadata_n_cells`` kept, features = median), or
    ``None`` when the sites were written to ``sites_out`` instead of kept in memory.
    ``wells``: one row per well (well keys, ``Metadata_n_sites``, ``Metadata_n_cells``, features
    = mean of the site medians). ``accounting``: cells read / NaN-dropped (in all and per site),
    sites, empty sites, cells with a missing key, features left out, and which path ran."""

    sites: pd.DataFrame | None
    wells: pd.DataFrame
    features: list[str]
    accounting: dict = field(default_factory=dict)


class _NotContiguous(Exception):
    """A site's rows reappear after the site ended: streaming needs the partitioned path."""


def _runs(keys: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Starts, ends and key tuples of the runs of equal consecutive keys."""
    n = len(keys)
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
    for c in keys.columns:
        v = keys[c].to_numpy()
        change[1:] |= v[1:] != v[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], n)
    run_keys = list(keys.iloc[starts].itertuples(index=False, name=None))
    return starts, ends, run_keys


class _Sink:
    """Receives finished sites; keeps or writes site medians and running well sums."""

    def __init__(self, site_cols, well_cols, features, dtype, sites_out):
        self.site_cols = list(site_cols)
        self.well_idx = [self.site_cols.index(c) for c in well_cols]
        self.well_cols = list(well_cols)
        self.features = list(features)
        self.dtype = dtype
        self.sites_out = sites_out
        self._writer = None
        self._keys: list[tuple] = []
        self._medians: list[np.ndarray] = []
        self._counts: list[int] = []
        self._kept: list[pd.DataFrame] = []
        self.well_sum: dict[tuple, np.ndarray] = {}
        self.well_sites: dict[tuple, int] = {}
        self.well_cells: dict[tuple, int] = {}
        self.cells_dropped_nan = 0
        self.dropped_per_site: dict[tuple, int] = {}
        self.sites_empty: list[tuple] = []
        self.n_sites = 0

    def add(self, key: tuple, X: np.ndarray) -> None:
        bad = np.isnan(X).any(axis=1)
        n_bad = int(bad.sum())
        if n_bad:
            self.cells_dropped_nan += n_bad
            self.dropped_per_site[key] = n_bad
            X = X[~bad]
        if len(X) == 0:
            self.sites_empty.append(key)
            return
        med = np.median(X, axis=0)
        self.n_sites += 1
        wkey = tuple(key[i] for i in self.well_idx)
        acc = self.well_sum.get(wkey)
        if acc is None:
            self.well_sum[wkey] = med.astype(np.float64)
            self.well_sites[wkey] = 1
            self.well_cells[wkey] = len(X)
        else:
            acc += med
            self.well_sites[wkey] += 1
            self.well_cells[wkey] += len(X)
        self._keys.append(key)
        self._medians.append(med)
        self._counts.append(len(X))
        if len(self._keys) >= 8192:
            self._flush()

    def _flush(self) -> None:
        if not self._keys:
            return
        frame = pd.DataFrame(self._keys, columns=self.site_cols)
        frame[N_CELLS_COL] = np.asarray(self._counts, dtype=np.int64)
        feats = pd.DataFrame(np.vstack(self._medians).astype(self.dtype, copy=False), columns=self.features)
        frame = pd.concat([frame, feats], axis=1)
        self._keys, self._medians, self._counts = [], [], []
        if self.sites_out is None:
            self._kept.append(frame)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._writer is None:
            Path(self.sites_out).parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(str(self.sites_out), table.schema)
        self._writer.write_table(table)

    def finish(self) -> tuple[pd.DataFrame | None, pd.DataFrame]:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        sites = None
        if self.sites_out is None:
            if self._kept:
                sites = pd.concat(self._kept, ignore_index=True)
            else:
                sites = pd.DataFrame(columns=[*self.site_cols, N_CELLS_COL, *self.features])
            sites = sites.sort_values(self.site_cols, kind="stable").reset_index(drop=True)
        wkeys = sorted(self.well_sum, key=_sort_key)
        wells = pd.DataFrame(wkeys, columns=self.well_cols)
        wells[N_SITES_COL] = np.asarray([self.well_sites[k] for k in wkeys], dtype=np.int64)
        wells[N_CELLS_COL] = np.asarray([self.well_cells[k] for k in wkeys], dtype=np.int64)
        if wkeys:
            means = np.vstack([self.well_sum[k] / self.well_sites[k] for k in wkeys]).astype(self.dtype)
        else:
            means = np.empty((0, len(self.features)), dtype=self.dtype)
        wells = pd.concat([wells, pd.DataFrame(means, columns=self.features)], axis=1)
        return sites, wells


def _sort_key(key: tuple):
    return tuple((0, v) if not isinstance(v, str) else (1, v) for v in key)


def _reduce_contiguous(batches: Iterable[tuple[pd.DataFrame, np.ndarray]], sink: _Sink) -> None:
    """One pass over batches whose sites are contiguous: each site is reduced when it ends."""
    closed: set[tuple] = set()
    carry_key: tuple | None = None
    carry: list[np.ndarray] = []
    for keys, X in batches:
        starts, ends, run_keys = _runs(keys)
        for s, e, key in zip(starts, ends, run_keys):
            if key == carry_key:
                carry.append(X[s:e])
                continue
            if carry_key is not None:
                sink.add(carry_key, carry[0] if len(carry) == 1 else np.concatenate(carry))
                closed.add(carry_key)
            if key in closed:
                raise _NotContiguous(key)
            carry_key, carry = key, [X[s:e]]
    if carry_key is not None:
        sink.add(carry_key, carry[0] if len(carry) == 1 else np.concatenate(carry))


def _check_contiguous(key_batches: Iterable[pd.DataFrame]) -> tuple[bool, int]:
    """Whether every site's rows are contiguous across the stream, and the number of rows."""
    closed: set[tuple] = set()
    carry_key = None
    n = 0
    contiguous = True
    for keys in key_batches:
        n += len(keys)
        if not contiguous:
            continue
        keys = keys[~keys.isna().any(axis=1).to_numpy()]
        _, _, run_keys = _runs(keys)
        for key in run_keys:
            if key == carry_key:
                continue
            if carry_key is not None:
                closed.add(carry_key)
            if key in closed:
                contiguous = False
                break
            carry_key = key
    return contiguous, n


class _Source:
    """A stream of (site keys, feature matrix) batches from files or a DataFrame."""

    def __init__(self, source, site_cols, features, batch_rows):
        self.site_cols = list(site_cols)
        self.batch_rows = int(batch_rows)
        self.frame: pd.DataFrame | None = None
        self.paths: list[Path] = []
        self.features_dropped: list[str] = []
        self.origin = "cells"
        self._layout: tuple[bool, int] | None = None
        if isinstance(source, pd.DataFrame):
            self.frame = source
            require_columns(source, self.site_cols, "cells", "site column")
            self.features = list(features) if features is not None else feature_columns(source, "cells")
            require_columns(source, self.features, "cells", "feature column")
            self.dtype = feature_matrix(source.iloc[:0], self.features).dtype
            return
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if not paths:
            raise InputError("no cell table given", fix="pass at least one Parquet or CSV file")
        self.paths = [Path(p) for p in paths]
        self.origin = str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} more)"
        schemas = []
        for p in self.paths:
            if not p.exists():
                raise InputError(f"{p}: file not found", fix="check the path")
            schema = schema_columns(p)
            missing = [c for c in self.site_cols if c not in schema]
            if missing:
                raise InputError(f"{p}: site column {missing[0]!r} not found", fix="pass --site-cols naming existing columns")
            schemas.append(schema)
        if features is not None:
            self.features = list(features)
            for p, schema in zip(self.paths, schemas):
                missing = [c for c in self.features if c not in schema]
                if missing:
                    raise InputError(f"{p}: feature column {missing[0]!r} not found", fix="pass features present in every file")
        else:
            per_file = [[c for c, t in s.items() if _is_feature(c, t)] for s in schemas]
            common = set(per_file[0]).intersection(*map(set, per_file[1:]))
            self.features = [c for c in per_file[0] if c in common]
            every = {c for f in per_file for c in f}
            self.features_dropped = sorted(every - common)
            if not self.features:
                raise InputError(f"{self.paths[0]}: no feature column common to all files", fix="check the tables")
        types = {np.dtype(s[c]) for s in schemas for c in self.features}
        self.dtype = np.dtype(np.float32) if types == {np.dtype(np.float32)} else np.dtype(np.float64)

    def layout(self) -> tuple[bool, int]:
        """Whether every site's rows are contiguous, and the number of rows: one pass over the keys,
        once (a second aggregation pass, without a dropped feature, reads the same keys)."""
        if self._layout is None:
            self._layout = _check_contiguous(self.key_batches())
        return self._layout

    def key_batches(self) -> Iterator[pd.DataFrame]:
        if self.frame is not None:
            for s in range(0, len(self.frame), self.batch_rows):
                yield self.frame.iloc[s : s + self.batch_rows][self.site_cols].reset_index(drop=True)
            return
        for p in self.paths:
            for b in iter_record_batches(p, self.site_cols, self.batch_rows):
                yield b.to_pandas()

    def batches(self) -> Iterator[tuple[pd.DataFrame, np.ndarray, str]]:
        if self.frame is not None:
            for s in range(0, len(self.frame), self.batch_rows):
                part = self.frame.iloc[s : s + self.batch_rows]
                X = np.ascontiguousarray(part[self.features].to_numpy(dtype=self.dtype))
                yield part[self.site_cols].reset_index(drop=True), X, "cells"
            return
        for p in self.paths:
            for b in iter_record_batches(p, self.site_cols + self.features, self.batch_rows):
                keys = b.select(self.site_cols).to_pandas()
                X = np.empty((b.num_rows, len(self.features)), dtype=self.dtype)
                for j, name in enumerate(self.features):
                    X[:, j] = b.column(name).to_numpy(zero_copy_only=False)
                yield keys, X, str(p)


class _NpzSource:
    """Single cells from a DeepProfiler features folder (:func:`raycp.io.npz.find_feature_files`):
    one file per site, so every site is contiguous; features are named ``<Metadata_Model>_<i>``
    (DeepProfiler's model name when the file records it, else ``DeepProfiler``)."""

    def __init__(self, folder, site_cols, features, batch_rows):
        from raycp.io.npz import find_feature_files, read_npz

        if list(site_cols) != list(SITE_COLS):
            raise InputError(f"{folder}: a DeepProfiler folder keys cells by {list(SITE_COLS)}",
                             fix="leave --site-cols at its default for npz folders")
        self.site_cols = list(site_cols)
        self.batch_rows = int(batch_rows)
        self.files = find_feature_files(str(folder))
        self.origin = str(folder)
        self.features_dropped: list[str] = []
        self._read = read_npz
        first = read_npz(self.files[0].url)
        model = str(first.metadata.get("Metadata_Model") or "DeepProfiler")
        self.dim = first.features.shape[1]
        names = [f"{model}_{i}" for i in range(self.dim)]
        if features is not None:
            missing = [c for c in features if c not in names]
            if missing:
                raise InputError(f"{folder}: feature {missing[0]!r} not in the npz files ({names[0]} … {names[-1]})",
                                 fix="leave the features unset for npz folders")
        self.all_names = names
        self.features = list(features) if features is not None else names
        self.dtype = np.dtype(np.float32) if first.features.dtype == np.float32 else np.dtype(np.float64)
        self.sites_without_cells = 0

    def _sites(self) -> Iterator[tuple[pd.DataFrame, np.ndarray, str]]:
        cols = [self.all_names.index(f) for f in self.features]
        self.sites_without_cells = 0
        for f in self.files:
            feats = self._read(f.url).features
            if feats.shape[1] != self.dim:
                raise InputError(f"{f.url}: {feats.shape[1]} features, the first file has {self.dim}",
                                 fix="aggregate one model's features at a time")
            if len(feats) == 0:
                self.sites_without_cells += 1
                continue
            keys = pd.DataFrame({PLATE_COL: [f.plate] * len(feats), WELL_COL: [f.well] * len(feats),
                                 SITE_COL: [f.site] * len(feats)})
            yield keys, np.ascontiguousarray(feats[:, cols], dtype=self.dtype), f.url

    def layout(self) -> tuple[bool, int]:
        """One file per site: contiguous by construction, so no pass over the files is needed (the
        row count only sizes partitions, which a contiguous source never uses)."""
        return True, 0

    def batches(self) -> Iterator[tuple[pd.DataFrame, np.ndarray, str]]:
        yield from self._sites()


def _is_npz_folder(source) -> bool:
    if isinstance(source, pd.DataFrame):
        return False
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if len(paths) != 1 or not Path(paths[0]).is_dir():
        return False
    root = Path(paths[0])
    return any(root.rglob("*.npz")) and not any(root.rglob("*.parquet"))


def _is_feature(name: str, dtype) -> bool:
    try:
        return is_feature_column(name, np.dtype(dtype))
    except TypeError:
        return False


def _clean(batches: Iterable[tuple[pd.DataFrame, np.ndarray, str]], features, acct,
           nan_counts: np.ndarray) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Drop cells with a missing site key (counted), reject ±inf (naming the column), and count
    the NaNs of each feature over the cells kept (``nan_counts``, updated in place)."""
    for keys, X, origin in batches:
        acct["cells_read"] += len(keys)
        check_finite(X, features, origin)
        missing = keys.isna().any(axis=1).to_numpy()
        if missing.any():
            acct["cells_missing_key"] += int(missing.sum())
            keys = keys[~missing].reset_index(drop=True)
            X = X[~missing]
        isnan = np.isnan(X)
        empty = isnan.all(axis=1)  # a cell NaN in every feature is a missing row, not evidence on a feature
        acct["cells_all_nan"] = acct.get("cells_all_nan", 0) + int(empty.sum())
        nan_counts += isnan[~empty].sum(axis=0)
        yield keys, X


def aggregate_cells(
    source: pd.DataFrame | str | os.PathLike | Sequence[str | os.PathLike],
    site_cols: Sequence[str] = SITE_COLS,
    well_cols: Sequence[str] = WELL_COLS,
    features: Sequence[str] | None = None,
    batch_rows: int = 65_536,
    memory_budget_bytes: int = 512 << 20,
    spill_dir: str | os.PathLike | None = None,
    sites_out: str | os.PathLike | None = None,
    na_cutoff: float = NA_CUTOFF,
) -> CellAggregation:
    """Single cells → site medians → well means, streaming in bounded memory.

    ``source``: a DataFrame, Parquet/CSV file(s) (a folder of Parquet files works too), or a
    DeepProfiler features folder of per-site ``.npz`` files in any of its layouts
    (:mod:`raycp.io.npz`); with several files, features are the feature columns common to all
    (the others are counted in ``accounting['features_dropped']``). ``well_cols`` must be a subset of ``site_cols``.
    Site medians go to ``sites_out`` (Parquet, written incrementally) when given, else they are
    returned. Non-contiguous sites are hash-partitioned on disk (under ``spill_dir``) into
    partitions of about ``memory_budget_bytes``.

    NaN, per feature then per cell: a feature NaN in more than ``na_cutoff`` of the cells (e.g.
    one NaN in every cell after MAD-normalising a constant feature) is dropped and listed in
    ``accounting['features_dropped_na']``; cells are then dropped only for the NaNs left
    (``cells_dropped_nan``, per site too). The first pass assumes no feature is dropped (one read
    of the input in the usual case); when one is, a second pass runs without it.
    Raises :class:`InputError` for ±inf, missing columns, or when every feature is dropped."""
    site_cols, well_cols = list(site_cols), list(well_cols)
    if not set(well_cols) <= set(site_cols):
        raise InputError(f"well columns {well_cols} must be among the site columns {site_cols}", fix="add them to --site-cols")
    if not 0.0 <= float(na_cutoff) <= 1.0:
        raise InputError(f"NaN cutoff {na_cutoff} is outside [0, 1]", fix="pass --na-cutoff between 0 and 1 (pycytominer: 0.05)")
    src = (_NpzSource(Path(source if isinstance(source, (str, os.PathLike)) else source[0]), site_cols, features,
                      batch_rows) if _is_npz_folder(source) else _Source(source, site_cols, features, batch_rows))
    first = _aggregate_pass(src, site_cols, well_cols, memory_budget_bytes, spill_dir, sites_out)
    acct, nan_counts, n_cells = first["acct"], first["nan_counts"], first["cells"]
    if n_cells == 0 and acct.get("cells_all_nan", 0):
        raise InputError(f"{src.origin}: every cell is NaN in every feature column", fix="check the table")
    dropped = na_features(nan_counts, n_cells, src.features, na_cutoff)
    result = first
    if dropped:
        if len(dropped) == len(src.features):
            raise InputError(f"{src.origin}: every feature column is NaN in more than {na_cutoff:g} of the cells "
                             f"(first: {dropped[0]!r})", fix="check the table, or raise --na-cutoff")
        gone = set(dropped)
        src.features = [f for f in src.features if f not in gone]
        result = _aggregate_pass(src, site_cols, well_cols, memory_budget_bytes, spill_dir, sites_out)
        acct = result["acct"]
    sink = result["sink"]
    acct["features"] = len(src.features)
    acct["na_cutoff"] = float(na_cutoff)
    acct["features_dropped_na"] = dropped
    acct["features_nan_fraction"] = {f: float(c) / n_cells for f, c in zip(first["features"], nan_counts)
                                     if c and n_cells} if n_cells else {}
    acct["cells_dropped_nan"] = sink.cells_dropped_nan
    acct["cells_dropped_nan_per_site"] = {_fmt_key(k): v for k, v in sink.dropped_per_site.items()}
    acct["sites"] = sink.n_sites
    acct["sites_empty"] = len(sink.sites_empty)
    acct["wells"] = len(result["wells"])
    acct["passes"] = 2 if dropped else 1
    if len(result["wells"]) == 0:
        raise InputError(f"{src.origin}: no well profile: of {acct['cells_read']} cells, {acct['cells_missing_key']} "
                         f"have no {'/'.join(site_cols)}, {acct.get('cells_all_nan', 0)} are NaN in every feature and "
                         f"{sink.cells_dropped_nan} have a NaN feature", fix="check the site columns (--site-cols) "
                         "and the NaN cutoff (--na-cutoff)")
    if isinstance(src, _NpzSource):
        acct["input"] = "deepprofiler_npz"
        acct["sites_without_cells"] = src.sites_without_cells
    return CellAggregation(sites=result["sites"], wells=result["wells"], features=list(src.features), accounting=acct)


def _aggregate_pass(src: _Source, site_cols, well_cols, memory_budget_bytes, spill_dir, sites_out) -> dict:
    """One streaming pass over the cells with the source's current features."""
    acct = {
        "cells_read": 0,
        "cells_missing_key": 0,
        "cells_dropped_nan": 0,
        "sites": 0,
        "sites_empty": 0,
        "wells": 0,
        "features": len(src.features),
        "features_dropped": src.features_dropped,
        "path": "contiguous",
        "partitions": 0,
    }
    nan_counts = np.zeros(len(src.features), dtype=np.int64)
    sink = _Sink(site_cols, well_cols, src.features, src.dtype, sites_out)
    contiguous, n_rows = src.layout()
    if contiguous:
        _reduce_contiguous(_clean(src.batches(), src.features, acct, nan_counts), sink)
    else:
        itemsize = np.dtype(src.dtype).itemsize
        n_parts = int(min(256, max(1, math.ceil(n_rows * len(src.features) * itemsize / memory_budget_bytes))))
        acct["path"], acct["partitions"] = "partitioned", n_parts
        _reduce_partitioned(_clean(src.batches(), src.features, acct, nan_counts), sink, site_cols, n_parts, spill_dir)
    sites, wells = sink.finish()
    cells = acct["cells_read"] - acct["cells_missing_key"] - acct.get("cells_all_nan", 0)
    return {"acct": acct, "nan_counts": nan_counts, "cells": cells, "sink": sink, "sites": sites, "wells": wells,
            "features": list(src.features)}


def _fmt_key(key: tuple) -> str:
    return "/".join(str(v) for v in key)


def _reduce_partitioned(batches, sink: _Sink, site_cols: list[str], n_parts: int, spill_dir) -> None:
    """Hash-partition cells by site into temporary Parquet files, then reduce each partition."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="raycp-sites-", dir=spill_dir) as tmp:
        writers: dict[int, pq.ParquetWriter] = {}
        n_feat = len(sink.features)
        for keys, X in batches:
            if not len(keys):
                continue
            part = pd.util.hash_pandas_object(keys, index=False).to_numpy() % np.uint64(n_parts)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(n_parts + 1))
            for p in range(n_parts):
                lo, hi = bounds[p], bounds[p + 1]
                if lo == hi:
                    continue
                idx = order[lo:hi]
                table = pa.Table.from_pandas(keys.iloc[idx].reset_index(drop=True), preserve_index=False)
                flat = pa.array(np.ascontiguousarray(X[idx]).reshape(-1))
                table = table.append_column("__x", pa.FixedSizeListArray.from_arrays(flat, n_feat))
                w = writers.get(p)
                if w is None:
                    w = writers[p] = pq.ParquetWriter(os.path.join(tmp, f"part-{p:04d}.parquet"), table.schema)
                w.write_table(table)
        for w in writers.values():
            w.close()
        for p in sorted(writers):
            table = pq.read_table(os.path.join(tmp, f"part-{p:04d}.parquet"))
            keys = table.drop(["__x"]).to_pandas()
            X = table.column("__x").combine_chunks().flatten().to_numpy().reshape(-1, n_feat)
            order = np.lexsort([pd.factorize(keys[c], sort=True)[0] for c in reversed(site_cols)])
            _reduce_contiguous([(keys.iloc[order].reset_index(drop=True), X[order])], sink)
