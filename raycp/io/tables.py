"""Reading users' tables (CSV/TSV, Parquet) with their metadata kept as text.

Plate names like ``000123``, BBBC022's plate ``20585`` or a well ``01`` are identifiers, not
numbers: a CSV reader that infers types turns ``000123`` into the integer 123, which then matches
nothing keyed by ``000123`` and cannot be merged with a text column. Every metadata column read
here keeps the characters written in the file. Missing values are the usual CSV markers (an empty
field, ``NA``, ``NaN``, ``null`` ..., pandas' defaults, so that R's ``NA`` stays missing); they
come back as missing, never as the text ``"nan"``.

Parquet stores types; an integer metadata column there has no text left to keep, so it is turned
into the integer's decimal text (``20585``), and an integral float (a pandas integer column that
held a missing value) into the same text without ``.0``, so joins with text keys work.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls

METADATA_PREFIXES: tuple[str, ...] = ("Metadata_", "Image_Metadata_")
"""Column-name prefixes of metadata (raycp's and CellProfiler's image-table export)."""

TextRule = Callable[[str], bool]

TEXT_DTYPE = pd.Series(["text"]).dtype
"""pandas' default dtype for text: ``str`` (missing = NaN) from pandas 3, ``object`` before."""


def is_metadata(name: str) -> bool:
    """``Metadata_*`` / ``Image_Metadata_*`` columns are metadata (kept as text)."""
    return str(name).startswith(METADATA_PREFIXES)


def every_column(name: str) -> bool:
    """Every column is text (plate maps, DeepProfiler index files)."""
    return True


def as_text(values: pd.Series) -> pd.Series:
    """A column as text (pandas' default text dtype, :data:`TEXT_DTYPE`): strings kept as they
    are, integers and integral floats as their decimal digits, other numbers as ``str``,
    missing stays missing."""
    return values.astype(object).map(lambda v: None if _missing(v) else _scalar_text(v)).astype(TEXT_DTYPE)


def _missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _scalar_text(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def text_columns(frame: pd.DataFrame, rule: TextRule = is_metadata) -> pd.DataFrame:
    """``frame`` with every column chosen by ``rule`` turned into text (see :func:`as_text`)."""
    out = frame.copy()
    for col in out.columns:
        if rule(str(col)):
            out[col] = as_text(out[col])
    return out


def csv_separator(url: str) -> str:
    return "\t" if ".tsv" in url.lower() else ","


def read_csv_text(data: bytes | str, *, url: str, text: TextRule = is_metadata,
                  usecols: Sequence[str] | None = None, nrows: int | None = None) -> pd.DataFrame:
    """Parse CSV/TSV bytes (or a local path); the columns chosen by ``text`` stay text."""
    compression = "gzip" if url.lower().endswith(".gz") else None
    sep = csv_separator(url.removesuffix(".gz"))

    def source():
        return io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data

    try:
        header = pd.read_csv(source(), sep=sep, compression=compression, nrows=0).columns
        dtype = {c: str for c in header if text(str(c))}
        frame = pd.read_csv(source(), sep=sep, compression=compression, dtype=dtype, low_memory=False,
                            usecols=list(usecols) if usecols is not None else None, nrows=nrows)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(f"{url}: cannot read the table ({' '.join(str(exc).split())})",
                         fix="check that the file is a valid CSV table with a header row") from None
    for col in frame.columns:
        if text(str(col)):
            frame[col] = as_text(frame[col])
    return frame


def read_table(url: str, *, text: TextRule = is_metadata, what: str = "table") -> pd.DataFrame:
    """A whole user table (``.csv``, ``.csv.gz``, ``.tsv`` or ``.parquet`` at any fsspec URL) with
    the columns chosen by ``text`` as text.

    Raises :class:`InputError` for a missing file or an unreadable table."""
    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: {what} not found", fix="check the path") from None
    if url.lower().endswith((".parquet", ".pq")):
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise InputError(f"{url}: not a readable Parquet {what} ({type(exc).__name__})",
                             fix="check that the file is a valid Parquet table") from None
        return text_columns(frame, text)
    return read_csv_text(data, url=url, text=text)
