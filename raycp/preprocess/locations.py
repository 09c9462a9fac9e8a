"""Importers of nuclei centres made by CellProfiler (the paper crops around these; Methods).

Sources, chosen by the URL:

- ``*.sqlite`` / ``*.db``: CellProfiler ExportToDatabase (an image table ``Image``/``Per_Image``
  with ``ImageNumber`` + plate/well/site metadata, a nuclei table ``Nuclei``/``Per_Nuclei``/
  ``Per_Object`` with ``ImageNumber`` + ``Nuclei_Location_Center_X/Y``);
- ``*.parquet`` / ``*.csv`` / ``*.csv.gz``: one table of every site (plate/well/site columns as
  ``Metadata_*``, ``Image_Metadata_*`` or pycytominer's ``*_x`` variants);
- a template with ``{plate}``, ``{well}``, ``{site}``: one CellProfiler CSV per site, e.g.
  DeepProfiler's ``locations/{plate}/{well}-{site}-Nuclei.csv``; read inside the site's task.

Everything comes out in one canonical form: ``Metadata_Plate/Well/Site``,
``Nuclei_Number_Object_Number``, ``Nuclei_Location_Center_X/Y`` (pixels, 0-based, x = column).
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.index import PLATE, SITE, WELL, site_keys
from raycp.io.tables import as_text, read_csv_text, text_columns
from raycp.preprocess.nuclei import NUMBER, X, Y

_KEY_ALIASES = {
    PLATE: ("Metadata_Plate", "Image_Metadata_Plate", "Metadata_Plate_x", "Image_Metadata_Plate_x"),
    WELL: ("Metadata_Well", "Image_Metadata_Well", "Metadata_Well_x", "Image_Metadata_Well_x"),
    SITE: ("Metadata_Site", "Image_Metadata_Site", "Metadata_Site_x", "Image_Metadata_Site_x",
           "Metadata_Field", "Image_Metadata_Field"),
}
_XY_ALIASES = {
    X: ("Nuclei_Location_Center_X", "Location_Center_X", "Metadata_X"),
    Y: ("Nuclei_Location_Center_Y", "Location_Center_Y", "Metadata_Y"),
}
_NUMBER_ALIASES = ("Nuclei_Number_Object_Number", "Metadata_Nuclei_Number_Object_Number", "ObjectNumber",
                   "Number_Object_Number")
_IMAGE_TABLES = ("Image", "Per_Image")
_NUCLEI_TABLES = ("Nuclei", "Per_Nuclei", "Per_Object")


def is_template(source: str) -> bool:
    return "{" in source and "}" in source


def _pick(frame: pd.DataFrame, aliases: tuple[str, ...]) -> str | None:
    return next((c for c in aliases if c in frame.columns), None)


def canonical(frame: pd.DataFrame, *, source: str, keys: bool = True) -> pd.DataFrame:
    """Rename a CellProfiler-style table to the canonical columns and check the values."""
    out = pd.DataFrame(index=frame.index)
    if keys:
        for key, aliases in _KEY_ALIASES.items():
            col = _pick(frame, aliases)
            if col is None:
                raise InputError(f"{source}: no {key} column (looked for {', '.join(aliases)})",
                                 fix="add plate/well/site columns to the locations table")
            out[key] = frame[col]
        site_keys(out, source=source, rows="nuclei")
    for key, aliases in _XY_ALIASES.items():
        col = _pick(frame, aliases)
        if col is None:
            raise InputError(f"{source}: no {key} column (looked for {', '.join(aliases)})",
                             fix="export the nuclei's Location_Center_X/Y from CellProfiler")
        values = pd.to_numeric(frame[col], errors="coerce")
        if values.isna().any():
            raise InputError(f"{source}: {int(values.isna().sum())} nuclei have no numeric {col}",
                             fix="drop the rows without a location")
        out[key] = values.astype(np.float64)
    number = _pick(frame, _NUMBER_ALIASES)
    if number:
        out[NUMBER] = pd.to_numeric(frame[number]).astype(np.int64)
    elif keys:
        out[NUMBER] = (out.groupby([PLATE, WELL, SITE]).cumcount() + 1).astype(np.int64)
    else:
        out[NUMBER] = np.arange(1, len(out) + 1, dtype=np.int64)
    cols = ([PLATE, WELL, SITE] if keys else []) + [NUMBER, X, Y]
    return out[cols].reset_index(drop=True)


def read_table(url: str) -> pd.DataFrame:
    """Every site's nuclei centres from a CellProfiler SQLite, Parquet or CSV file (canonical form)."""
    lower = url.lower()
    if lower.endswith((".sqlite", ".db", ".sqlite3")):
        return _read_sqlite(url)
    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: locations file not found", fix="check nuclei.locations") from None
    if lower.endswith(".parquet"):
        frame = text_columns(pd.read_parquet(io.BytesIO(data)))
    elif lower.endswith((".csv", ".csv.gz")):
        frame = read_csv_text(data, url=url)
    else:
        raise InputError(f"{url}: unknown locations format",
                         fix="use a CellProfiler .sqlite, a .parquet or .csv table, or a per-site template")
    return canonical(frame, source=url)


def _find_table(tables: set[str], names: tuple[str, ...], *, url: str, what: str) -> str | None:
    """The one table called ``names[i]`` or ``<prefix>_<names[i]>`` (ExportToDatabase's table
    prefix, e.g. ``MyExpt_Per_Image``); several candidates are an error naming them."""
    for name in names:
        found = sorted(t for t in tables if t == name or t.endswith(f"_{name}"))
        exact = [t for t in found if t == name]
        if exact:
            return exact[0]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(f"{url}: several {what} tables: {', '.join(found)}",
                             fix="keep one experiment per database, or export its nuclei centres to a CSV/Parquet table")
    return None


def _read_sqlite(url: str) -> pd.DataFrame:
    """Nuclei centres from CellProfiler's ExportToDatabase SQLite.

    Objects are joined to their image on ``(TableNumber, ImageNumber)`` when both tables have
    ``TableNumber`` (CellProfiler numbers images per batch, so a database merged from several
    batches, like the JUMP sources, repeats ``ImageNumber`` across ``TableNumber`` s), else on
    ``ImageNumber``. Tables may carry ExportToDatabase's prefix (``MyExpt_Per_Image``)."""
    import sqlite3

    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: locations database not found", fix="check nuclei.locations") from None
    with tempfile.TemporaryDirectory() as tmp:  # sqlite needs a local file
        path = os.path.join(tmp, "locations.sqlite")
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise InputError(f"{url}: not a SQLite database ({exc})", fix="point at CellProfiler's .sqlite") from None
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            image = _find_table(tables, _IMAGE_TABLES, url=url, what="image")
            nuclei = _find_table(tables, _NUCLEI_TABLES, url=url, what="nuclei")
            if image is None or nuclei is None:
                raise InputError(f"{url}: no image/nuclei tables (has {sorted(tables)})",
                                 fix=f"expected one of {_IMAGE_TABLES} and one of {_NUCLEI_TABLES} "
                                     "(optionally with ExportToDatabase's prefix, e.g. MyExpt_Per_Image)")
            # table names come from the database's own catalogue, quoted; never from user text
            images = pd.read_sql_query(f'SELECT * FROM "{image}"', con)
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{nuclei}")')]
            wanted = [c for c in cols
                      if c in ("TableNumber", "ImageNumber", *_NUMBER_ALIASES, *_XY_ALIASES[X], *_XY_ALIASES[Y])]
            objects = pd.read_sql_query(f'SELECT {", ".join(chr(34) + c + chr(34) for c in wanted)} FROM "{nuclei}"', con)
        except sqlite3.Error as exc:
            raise InputError(f"{url}: unreadable SQLite ({exc})", fix="point at CellProfiler's .sqlite") from None
        finally:
            con.close()
    if "ImageNumber" not in images.columns or "ImageNumber" not in objects.columns:
        raise InputError(f"{url}: tables {image}/{nuclei} lack ImageNumber", fix="export with ImageNumber")
    on = ["TableNumber", "ImageNumber"] if "TableNumber" in images.columns and "TableNumber" in objects.columns \
        else ["ImageNumber"]
    for frame in (images, objects):
        for col in on:
            frame[col] = as_text(frame[col]).str.strip()
    dup = images.duplicated(on, keep=False)
    if dup.any():
        first = images.loc[dup, on].iloc[0].tolist()
        raise InputError(f"{url}: {int(dup.sum())} rows of {image} share a {'/'.join(on)} (first: {first})",
                         fix="each image must have its own (TableNumber,) ImageNumber; export the batches "
                             "with TableNumber")
    keys = {k: _pick(images, a) for k, a in _KEY_ALIASES.items()}
    missing = [k for k, c in keys.items() if c is None]
    if missing:
        raise InputError(f"{url}: image table {image} has no {', '.join(missing)}",
                         fix="export plate/well/site metadata with the images")
    merged = objects.merge(images[[*on, *keys.values()]], on=on, how="left", indicator=True)
    orphans = merged["_merge"] == "left_only"
    if orphans.any():
        first = merged.loc[orphans, on].iloc[0].tolist()
        raise InputError(f"{url}: {int(orphans.sum())} of {len(merged)} nuclei in {nuclei} belong to no image of "
                         f"{image} (first: {'/'.join(on)} {'/'.join(map(str, first))})",
                         fix="export the database again (or the nuclei centres as a CSV/Parquet table with plate, "
                             "well and site)")
    return canonical(merged.drop(columns="_merge"), source=url)


def read_site_csv(template: str, plate: str, well: str, site: int) -> pd.DataFrame:
    """One site's CellProfiler CSV from a ``{plate}/{well}-{site}-Nuclei.csv``-style template.

    Wells are tried as written in the index (``B07``) and unpadded (``B7``)."""
    letters = well.rstrip("0123456789")
    unpadded = f"{letters}{int(well[len(letters):])}" if letters and well[len(letters):].isdigit() else well
    tried = []
    for w in dict.fromkeys((well, unpadded)):
        url = template.format(plate=plate, well=w, site=site)
        tried.append(url)
        try:
            data = urls.read_bytes(url)
        except FileNotFoundError:
            continue
        return canonical(read_csv_text(data, url=url), source=url, keys=False)
    raise InputError(f"{tried[0]}: nuclei locations file not found", fix="check nuclei.locations' template")


def check_inside(table: pd.DataFrame, shape: tuple[int, int], *, source: str) -> None:
    """Every centre must lie in the image; else the site is quarantined naming the first outlier."""
    h, w = shape
    xs, ys = table[X].to_numpy(), table[Y].to_numpy()
    bad = ~((xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1) & np.isfinite(xs) & np.isfinite(ys))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{source}: nucleus {int(table[NUMBER].iloc[i])} at ({xs[i]:.1f}, {ys[i]:.1f}) is outside "
                         f"the {h}×{w} image ({int(bad.sum())} of {len(table)} outside)",
                         fix="check that the locations belong to this site and are in pixels")
