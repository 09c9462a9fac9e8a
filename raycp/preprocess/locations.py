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
from raycp.io.index import PLATE, SITE, WELL, normalize_well
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
        out[PLATE] = out[PLATE].astype(str)
        out[WELL] = out[WELL].astype(str).map(normalize_well)
        try:
            out[SITE] = out[SITE].astype(np.int64)
        except (TypeError, ValueError):
            raise InputError(f"{source}: site numbers are not integers", fix="number sites 1, 2, 3 ...") from None
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
        frame = pd.read_parquet(io.BytesIO(data))
    elif lower.endswith((".csv", ".csv.gz")):
        frame = pd.read_csv(io.BytesIO(data), compression="gzip" if lower.endswith(".gz") else None)
    else:
        raise InputError(f"{url}: unknown locations format",
                         fix="use a CellProfiler .sqlite, a .parquet or .csv table, or a per-site template")
    return canonical(frame, source=url)


def _read_sqlite(url: str) -> pd.DataFrame:
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
            image = next((t for t in _IMAGE_TABLES if t in tables), None)
            nuclei = next((t for t in _NUCLEI_TABLES if t in tables), None)
            if image is None or nuclei is None:
                raise InputError(f"{url}: no image/nuclei tables (has {sorted(tables)})",
                                 fix=f"expected one of {_IMAGE_TABLES} and one of {_NUCLEI_TABLES}")
            # table names come from the fixed lists above, never from user text
            images = pd.read_sql_query(f'SELECT * FROM "{image}"', con)
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{nuclei}")')]
            wanted = [c for c in cols if c in ("ImageNumber", *_NUMBER_ALIASES, *_XY_ALIASES[X], *_XY_ALIASES[Y])]
            objects = pd.read_sql_query(f'SELECT {", ".join(chr(34) + c + chr(34) for c in wanted)} FROM "{nuclei}"', con)
        except sqlite3.Error as exc:
            raise InputError(f"{url}: unreadable SQLite ({exc})", fix="point at CellProfiler's .sqlite") from None
        finally:
            con.close()
    if "ImageNumber" not in images.columns or "ImageNumber" not in objects.columns:
        raise InputError(f"{url}: tables {image}/{nuclei} lack ImageNumber", fix="export with ImageNumber")
    images["ImageNumber"] = pd.to_numeric(images["ImageNumber"]).astype(np.int64)
    objects["ImageNumber"] = pd.to_numeric(objects["ImageNumber"]).astype(np.int64)
    keys = {k: _pick(images, a) for k, a in _KEY_ALIASES.items()}
    missing = [k for k, c in keys.items() if c is None]
    if missing:
        raise InputError(f"{url}: image table {image} has no {', '.join(missing)}",
                         fix="export plate/well/site metadata with the images")
    merged = objects.merge(images[["ImageNumber", *keys.values()]], on="ImageNumber", how="inner")
    return canonical(merged, source=url)


def read_site_csv(template: str, plate: str, well: str, site: int) -> pd.DataFrame:
    """One site's CellProfiler CSV from a ``{plate}/{well}-{site}-Nuclei.csv``-style template.

    Wells are tried as written in the index (``B07``) and unpadded (``B7``)."""
    unpadded = well[0] + str(int(well[1:])) if well[1:].isdigit() else well
    tried = []
    for w in dict.fromkeys((well, unpadded)):
        url = template.format(plate=plate, well=w, site=site)
        tried.append(url)
        try:
            data = urls.read_bytes(url)
        except FileNotFoundError:
            continue
        frame = pd.read_csv(io.BytesIO(data))
        return canonical(frame, source=url, keys=False)
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
