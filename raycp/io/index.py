"""The screen index (paper Methods, "image preprocessing"): one row per site.

Canonical columns:

- ``Metadata_Plate`` (str), ``Metadata_Well`` (str, ``C03`` style), ``Metadata_Site`` (int)
- ``URL_<Channel>`` for each channel (an fsspec URL), optionally ``Frame_<Channel>`` (page of a
  multi-page TIFF, default 0), ``Series_<Channel>`` (image series of a multi-series file, default 0)
  and ``Channel_<Channel>`` (one channel of a multi-channel plane, default -1 = grey); the plane
  address of CellProfiler's LoadData (:class:`raycp.io.images.PlaneRef`)
- ``Metadata_Treatment`` (str) and ``Metadata_IsControl`` (bool)
- any other ``Metadata_*`` columns, carried through every stage.

The channel order is stored in the Parquet schema metadata (``raycp.channels``).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.tables import as_text, read_csv_text

PLATE, WELL, SITE = "Metadata_Plate", "Metadata_Well", "Metadata_Site"
TREATMENT, IS_CONTROL = "Metadata_Treatment", "Metadata_IsControl"
KEYS = (PLATE, WELL, SITE)
DEFAULT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
MAX_CHANNELS = 8
_CHANNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_WELL = re.compile(r"^([A-Z]|A[A-F])[\s_-]*0*(\d{1,3})$", re.IGNORECASE)
_ROW_COLUMN = re.compile(r"^R0*(\d{1,3})[\s_-]*C0*(\d{1,3})$", re.IGNORECASE)
MAX_ROWS = 32  # 1536-well plates: rows A..AF


def url_col(channel: str) -> str:
    return f"URL_{channel}"


def frame_col(channel: str) -> str:
    return f"Frame_{channel}"


def series_col(channel: str) -> str:
    return f"Series_{channel}"


def plane_channel_col(channel: str) -> str:
    return f"Channel_{channel}"


PLANE_PREFIXES = ("Frame_", "Series_", "Channel_")
"""Index columns that address a plane inside a channel's file (with their defaults 0, 0, -1)."""
PLANE_DEFAULTS = {"Frame_": 0, "Series_": 0, "Channel_": -1}


def _int_or(value, default: int) -> int:
    if value is None or (isinstance(value, float) and value != value):
        return default
    return int(value)


def plane_refs(row, channels) -> list:
    """The :class:`~raycp.io.images.PlaneRef` of each channel of one index row (a dict or Series)."""
    from raycp.io.images import PlaneRef

    return [PlaneRef(str(row[url_col(c)]), _int_or(row.get(frame_col(c)), 0), _int_or(row.get(series_col(c)), 0),
                     _int_or(row.get(plane_channel_col(c)), -1)) for c in channels]


def row_letters(row: int) -> str:
    """Plate row number (1-based) -> letters: 1 -> ``A``, 26 -> ``Z``, 27 -> ``AA`` (1536-well plates)."""
    letters = ""
    while row > 0:
        row, rem = divmod(row - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def well_id(row: int | str, column: int | str) -> str:
    """A well from its row (letters, or a 1-based number) and 1-based column: ``("C", 3)`` and
    ``(3, 3)`` both give ``C03``. Raises ``ValueError`` for anything else."""
    r = str(row).strip()
    c = str(column).strip()
    if r.isdigit():
        if not 1 <= int(r) <= MAX_ROWS:
            raise ValueError(f"row {row!r} is outside 1..{MAX_ROWS}")
        r = row_letters(int(r))
    if not c.isdigit() or int(c) < 1:
        raise ValueError(f"column {column!r} is not a positive number")
    return normalize_well(f"{r}{int(c):02d}")


def normalize_well(well) -> str:
    """The one spelling of a well id that raycp keys on: row letters in upper case, the column
    with at least two digits (``C03``, ``AF48``).

    Accepted spellings (surrounding blanks ignored): ``C3``, ``C03``, ``c003``, ``C-03``,
    ``C_03``, and the Opera Phenix / Operetta row-column form ``r03c03`` (row 3 = C). Anything
    else is returned stripped but otherwise unchanged, so that an unusual naming still joins with
    itself."""
    text = str(well).strip()
    match = _ROW_COLUMN.match(text)
    if match:
        row, col = int(match.group(1)), int(match.group(2))
        if 1 <= row <= MAX_ROWS and col >= 1:
            return f"{row_letters(row)}{col:02d}"
        return text
    match = _WELL.match(text)
    if not match or int(match.group(2)) < 1:
        return text
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def check_channels(channels: list[str] | tuple[str, ...]) -> list[str]:
    channels = list(channels)
    if not 1 <= len(channels) <= MAX_CHANNELS:
        raise InputError(f"{len(channels)} channels given", fix=f"use 1 to {MAX_CHANNELS} channels")
    for ch in channels:
        if not _CHANNEL_NAME.match(ch):
            raise InputError(f"channel name {ch!r} is not a plain identifier",
                             fix="use names like DNA, ER, RNA, AGP, Mito")
    if len(set(channels)) != len(channels):
        raise InputError(f"duplicate channel names in {channels}", fix="name each channel once")
    return channels


@dataclass(frozen=True)
class ScreenIndex:
    """A validated index: the table and its channel order; an importer adds ``notes`` (what it
    matched, e.g. plate-map coverage) and ``warnings`` (what a user should look at) to print."""

    table: pd.DataFrame
    channels: tuple[str, ...]
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.table)

    @property
    def url_columns(self) -> list[str]:
        return [url_col(c) for c in self.channels]

    def planes(self, row: pd.Series | dict) -> list:
        """The :class:`~raycp.io.images.PlaneRef` of each channel of one row, in channel order."""
        return plane_refs(row, self.channels)

    def plates(self) -> list[str]:
        return sorted(self.table[PLATE].unique().tolist())


def validate(table: pd.DataFrame, channels: list[str] | tuple[str, ...], *, source: str = "index",
             check_files: bool = False) -> ScreenIndex:
    """Check and normalise an index table; raise one :class:`InputError` naming every problem."""
    channels = check_channels(channels)
    if len(table) == 0:
        raise InputError(f"{source}: the index has no rows", fix="point at a non-empty index")
    required = [*KEYS, *[url_col(c) for c in channels]]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {', '.join(missing)}",
                         fix="an index needs Metadata_Plate/Well/Site and URL_<channel> per channel")
    allowed = set(required) | {f"{prefix}{c}" for c in channels for prefix in PLANE_PREFIXES}
    unknown = [c for c in table.columns if c not in allowed and not c.startswith("Metadata_")]
    if unknown:
        extra_ch = [c[4:] for c in unknown if c.startswith("URL_")]
        hint = (f"channel(s) {', '.join(extra_ch)} are not in the channel list {channels}"
                if extra_ch else "extra columns must be named Metadata_*")
        raise InputError(f"{source}: unknown column(s) {', '.join(unknown)}", fix=hint)

    out = site_keys(table.copy(), source=source)
    for col in (PLATE, WELL):
        for name in out[col].unique():
            urls.safe_name(name, what=f"{source}: {col}")
    for ch in channels:
        col = url_col(ch)
        empty = out[col].isna() | (out[col].astype(str).str.strip() == "")
        if empty.any():
            r = out[empty].iloc[0]
            raise InputError(f"{source}: {int(empty.sum())} site(s) have no {ch} image "
                             f"(first: {r[PLATE]} {r[WELL]} site {r[SITE]})",
                             fix=f"fill {col} for every site or drop the channel")
        out[col] = out[col].astype(str)
        for prefix, default in PLANE_DEFAULTS.items():
            pcol = f"{prefix}{ch}"
            if pcol in out.columns:
                out[pcol] = plane_numbers(out[pcol], default, lowest=default, source=source, column=pcol)
    dup = out.duplicated(list(KEYS), keep=False)
    if dup.any():
        d = out[dup].drop_duplicates(list(KEYS)).head(3)
        first = "; ".join(f"{p} {w} site {s}" for p, w, s in d[list(KEYS)].itertuples(index=False))
        raise InputError(f"{source}: {int(dup.sum())} rows share a (plate, well, site): {first}",
                         fix="each site must appear once; check the Metadata_Site numbering")
    if TREATMENT not in out.columns:
        out[TREATMENT] = None
    treatment = out[TREATMENT]
    out[TREATMENT] = treatment.astype(object).where(treatment.notna(), None).map(
        lambda v: v if v is None else str(v))
    if IS_CONTROL not in out.columns:
        out[IS_CONTROL] = False
    out[IS_CONTROL] = out[IS_CONTROL].fillna(False).astype(bool)
    out = out.sort_values(list(KEYS), kind="stable").reset_index(drop=True)
    index = ScreenIndex(out, tuple(channels))
    if check_files:
        check_files_exist(index, source=source)
    return index


def site_keys(frame: pd.DataFrame, *, source: str, rows: str = "row(s)") -> pd.DataFrame:
    """``frame`` with its plate, well and site keys in the one form raycp joins on: the plate as
    text, the well through :func:`normalize_well`, the site an int64. A blank key is an error
    naming the first row (``rows`` says what a row is, e.g. ``nuclei``)."""
    for col in KEYS:
        blank = frame[col].isna() | (frame[col].astype(str).str.strip() == "")
        if blank.any():
            i = int(np.flatnonzero(blank.to_numpy())[0])
            raise InputError(f"{source}: {int(blank.sum())} {rows} have no {col} (first: row {i + 1})",
                             fix=f"fill {col} for every site")
    frame[PLATE] = as_text(frame[PLATE]).str.strip()
    frame[WELL] = as_text(frame[WELL]).map(normalize_well)
    frame[SITE] = site_numbers(frame[SITE], source=source)
    return frame


def _whole_numbers(values: pd.Series, *, source: str, column: str, expected: str, fix: str,
                   default: int | None = None, lowest: int | None = None) -> pd.Series:
    """``values`` (numbers or text) as int64, blanks as ``default`` when given; one error naming
    the first row that is not a whole number (≥ ``lowest``)."""
    text = as_text(values).str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    if default is not None:
        numbers = numbers.where(text.notna() & (text != ""), default)
    bad = numbers.isna() | (numbers % 1 != 0)
    if lowest is not None:
        bad |= numbers < lowest
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{source}: {column} row {i + 1} is '{values.iloc[i]}', {expected}", fix=fix)
    return numbers.astype(np.int64)


def site_numbers(values: pd.Series, *, source: str, column: str = SITE) -> pd.Series:
    """Site numbers as int64 from numbers or text (``"01"`` -> 1); one error naming the first
    row that is not a whole number."""
    return _whole_numbers(values, source=source, column=column, expected="not a site number",
                          fix="number sites 1, 2, 3 ...")


def plane_numbers(values: pd.Series, default: int, *, lowest: int, source: str, column: str) -> pd.Series:
    """A Frame_/Series_/Channel_ column as int64 (blank = ``default``); one error naming the
    first row that is not a whole number ≥ ``lowest``."""
    return _whole_numbers(values, source=source, column=column, expected=f"not a whole number ≥ {lowest}",
                          fix=f"write {column} as 0, 1, 2 ... (CellProfiler numbers frames and series from 0)",
                          default=default, lowest=lowest)


def check_files_exist(index: ScreenIndex, *, source: str = "index", workers: int = 32) -> None:
    """Check every image URL exists, in parallel; report all missing files at once."""
    all_urls = sorted({u for col in index.url_columns for u in index.table[col]})

    def probe(u: str) -> str | None:
        try:
            return None if urls.exists(u) else u
        except Exception:  # noqa: BLE001 - unreachable counts as missing
            return u

    with ThreadPoolExecutor(max_workers=workers) as pool:
        missing = [u for u in pool.map(probe, all_urls) if u is not None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{source}: {len(missing)} of {len(all_urls)} image file(s) missing: {shown}",
                         fix="fix the paths in the source table, or upload the missing images")


def write_index(index: ScreenIndex, url: str) -> None:
    """Write the index as Parquet (atomic); the channel order goes in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(index.table, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"raycp.channels"] = json.dumps(list(index.channels)).encode()
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    urls.atomic_write_bytes(url, buf.getvalue())


def read_index(url: str, *, channels: list[str] | None = None, check_files: bool = False) -> ScreenIndex:
    """Read and validate an index (Parquet written by raycp, or CSV in the canonical layout)."""
    import pyarrow.parquet as pq

    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: index not found", fix="run `raycp index build` first") from None
    if url.endswith((".csv", ".csv.gz")):
        table = read_csv_text(data, url=url, text=lambda c: c.startswith(("Metadata_", "URL_")))
        stored = None
        base = posixpath.dirname(url) if "://" in url else os.path.dirname(os.path.abspath(url))
        for col in [c for c in table.columns if c.startswith("URL_")]:  # relative to the CSV, as LoadData's
            table[col] = [v if v is None or (isinstance(v, float) and v != v) else urls.input_url(str(v), base)
                          for v in table[col]]
    else:
        try:
            pt = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{url}: not a Parquet index ({exc})",
                             fix="pass the sites.parquet written by `raycp index build`") from None
        stored = json.loads((pt.schema.metadata or {}).get(b"raycp.channels", b"null"))
        table = pt.to_pandas()
    if channels is None:
        channels = stored or [c[4:] for c in table.columns if c.startswith("URL_")]
    else:
        missing = [c for c in channels if url_col(c) not in table.columns]
        if missing:
            raise InputError(f"{url}: unknown channel(s) {', '.join(missing)}; "
                             f"the index has {[c[4:] for c in table.columns if c.startswith('URL_')]}",
                             fix="use channel names present in the index (data.channels in the config, or "
                                 "--set data.channels=[...])")
        drop = [c for c in table.columns
                if c.startswith(("URL_", *PLANE_PREFIXES)) and c.split("_", 1)[1] not in channels]
        table = table.drop(columns=drop)
    return validate(table, channels, source=url, check_files=check_files)
