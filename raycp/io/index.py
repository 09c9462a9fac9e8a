"""The screen index (paper Methods, "image preprocessing"): one row per site.

Canonical columns:

- ``Metadata_Plate`` (str), ``Metadata_Well`` (str, ``C03`` style), ``Metadata_Site`` (int)
- ``URL_<Channel>`` for each channel (an fsspec URL), optionally ``Frame_<Channel>`` (page of a
  multi-page TIFF, default 0)
- ``Metadata_Treatment`` (str) and ``Metadata_IsControl`` (bool)
- any other ``Metadata_*`` columns, carried through every stage.

The channel order is stored in the Parquet schema metadata (``raycp.channels``).
"""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls

PLATE, WELL, SITE = "Metadata_Plate", "Metadata_Well", "Metadata_Site"
TREATMENT, IS_CONTROL = "Metadata_Treatment", "Metadata_IsControl"
KEYS = (PLATE, WELL, SITE)
DEFAULT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
MAX_CHANNELS = 8
_CHANNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


def url_col(channel: str) -> str:
    return f"URL_{channel}"


def frame_col(channel: str) -> str:
    return f"Frame_{channel}"


def normalize_well(well: str) -> str:
    """``B7`` / ``b07`` / ``B007`` -> ``B07``; anything else is returned unchanged."""
    match = _WELL.match(str(well).strip())
    if not match:
        return str(well).strip()
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
    """A validated index: the table and its channel order."""

    table: pd.DataFrame
    channels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.table)

    @property
    def url_columns(self) -> list[str]:
        return [url_col(c) for c in self.channels]

    def site_urls(self, row: pd.Series | dict) -> tuple[list[str], list[int]]:
        """The channel URLs and TIFF frames of one row, in channel order."""
        urls_ = [row[url_col(c)] for c in self.channels]
        frames = [int(row.get(frame_col(c), 0) or 0) for c in self.channels]
        return urls_, frames

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
    allowed = set(required) | {frame_col(c) for c in channels}
    unknown = [c for c in table.columns if c not in allowed and not c.startswith("Metadata_")]
    if unknown:
        extra_ch = [c[4:] for c in unknown if c.startswith("URL_")]
        hint = (f"channel(s) {', '.join(extra_ch)} are not in the channel list {channels}"
                if extra_ch else "extra columns must be named Metadata_*")
        raise InputError(f"{source}: unknown column(s) {', '.join(unknown)}", fix=hint)

    out = table.copy()
    out[PLATE] = out[PLATE].astype(str)
    out[WELL] = out[WELL].astype(str).map(normalize_well)
    try:
        out[SITE] = out[SITE].astype(np.int64)
    except (TypeError, ValueError):
        raise InputError(f"{source}: Metadata_Site must be an integer",
                         fix="number sites 1, 2, 3 ...") from None
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
        fcol = frame_col(ch)
        if fcol in out.columns:
            out[fcol] = out[fcol].fillna(0).astype(np.int64)
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
        table = pd.read_csv(io.BytesIO(data), compression="infer" if url.endswith(".gz") else None)
        stored = None
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
                             fix="use channel names present in the index")
        drop = [c for c in table.columns
                if (c.startswith("URL_") or c.startswith("Frame_")) and c.split("_", 1)[1] not in channels]
        table = table.drop(columns=drop)
    return validate(table, channels, source=url, check_files=check_files)
