"""Importers into the canonical screen index (see :mod:`raycp.io.index`).

Three source formats users have today:

- CellProfiler LoadData CSV, read as CellProfiler reads it (``cellprofiler_core`` ``LoadData``):
  an image is ``URL_<name>``, else ``PathName_<name>`` + ``FileName_<name>`` (``Image_`` prefixes
  accepted); ``Series_<name>`` and ``Frame_<name>`` pick the plane of a multi-series or multi-page
  file, ``Channel_<name>`` one channel of a multi-channel plane (see
  :class:`raycp.io.images.PlaneRef`); ``Metadata_Row`` + ``Metadata_Column`` make
  ``Metadata_Well`` when there is none. Relative and Windows-style path names resolve against the
  CSV's folder;
- a DeepProfiler project's ``index.csv`` with its ``config.json`` channel list;
- a folder of Opera Phenix / Operetta images named ``r03c03f03p01-ch1sk1fk1fl1.tiff``.

Metadata stays text (:mod:`raycp.io.tables`) and every well spelling goes through
:func:`raycp.io.index.normalize_well`. A plate map is matched to the sites on (plate and) well;
the importer reports how many sites it matched, and refuses a plate map that matches none.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import replace

import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.index import (
    IS_CONTROL,
    PLANE_DEFAULTS,
    PLATE,
    SITE,
    TREATMENT,
    WELL,
    ScreenIndex,
    frame_col,
    normalize_well,
    plane_channel_col,
    plane_numbers,
    row_letters,
    series_col,
    url_col,
    validate,
    well_id,
)
from raycp.io.tables import every_column, is_metadata, read_table

PHENIX_NAME = re.compile(
    r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<field>\d{2,3})p(?P<plane>\d{2})-ch(?P<ch>\d+)"
    r"sk\d+fk\d+fl\d+\.tiff?$",
    re.IGNORECASE,
)

#: LoadData column families that locate an image (CellProfiler's C_URL, C_FILE_NAME, C_PATH_NAME)
#: and those that pick a plane inside it (C_SERIES, C_FRAME, C_CHANNEL), with raycp's index column.
IMAGE_FAMILIES = ("URL", "FileName", "PathName")
PLANE_FAMILIES = {"Frame": frame_col, "Series": series_col, "Channel": plane_channel_col}
OBJECT_FAMILIES = ("ObjectsURL", "ObjectsFileName", "ObjectsPathName", "ObjectsFrame", "ObjectsSeries",
                   "ObjectsChannel")
_FAMILIES = (*OBJECT_FAMILIES, *IMAGE_FAMILIES, *PLANE_FAMILIES)
# CellProfiler's is_well_row_token / is_well_column_token (cellprofiler_core.utilities.measurement)
_ROW_TOKENS = ("wellrow", "well_row", "row")
_COLUMN_TOKENS = ("wellcol", "well_col", "wellcolumn", "well_column", "column", "col")


def _loaddata_text(name: str) -> bool:
    return is_metadata(name) or _family(name)[0] in (*IMAGE_FAMILIES, "ObjectsURL", "ObjectsFileName",
                                                     "ObjectsPathName")


def _family(column: str) -> tuple[str | None, str]:
    """``FileName_OrigDNA`` / ``Image_FileName_OrigDNA`` -> ``("FileName", "OrigDNA")``."""
    name = column[len("Image_"):] if column.startswith("Image_") else column
    for family in _FAMILIES:  # Objects* first: "ObjectsFileName_" also starts like no image family
        if name.startswith(family + "_"):
            return family, name[len(family) + 1:]
    return None, column


def _dirname(url: str) -> str:
    return posixpath.dirname(url) if "://" in url else os.path.dirname(url)


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


# -- plate maps ------------------------------------------------------------------------------------

def read_platemap(url: str) -> pd.DataFrame:
    """A plate map (CSV/TSV/Parquet), every column text. Columns without the ``Metadata_`` prefix
    get it (pycytominer's ``annotate`` habit); the well is ``Metadata_Well`` or JUMP's
    ``well_position``, spelled any way :func:`normalize_well` reads."""
    pm = read_table(url, text=every_column, what="plate map")
    pm = pm.rename(columns={c: c if str(c).startswith("Metadata_") else f"Metadata_{c}" for c in pm.columns})
    if WELL not in pm.columns and "Metadata_well_position" in pm.columns:
        pm = pm.rename(columns={"Metadata_well_position": WELL})
    if WELL not in pm.columns:
        raise InputError(f"{url}: plate map has no well column (has {list(pm.columns)[:8]})",
                         fix="name the well column Metadata_Well (or well_position)")
    blank = pm[WELL].map(_blank)
    if blank.any():
        raise InputError(f"{url}: {int(blank.sum())} plate-map row(s) have no well (first: row {int(blank.idxmax()) + 1})",
                         fix="give every plate-map row a well")
    pm[WELL] = pm[WELL].map(normalize_well)
    if PLATE in pm.columns:
        pm[PLATE] = pm[PLATE].map(lambda v: None if _blank(v) else str(v).strip())
    return pm


def _keys(frame: pd.DataFrame, on: list[str], n: int = 3) -> str:
    rows = frame[on].drop_duplicates().head(n).itertuples(index=False, name=None)
    return ", ".join("/".join(map(str, r)) for r in rows)


def _join_platemap(table: pd.DataFrame, platemap: str, treatment_col: str | None) -> tuple[pd.DataFrame, list, list]:
    pm = read_platemap(platemap)
    on = [WELL] + ([PLATE] if PLATE in pm.columns else [])
    dup = pm.duplicated(on, keep=False)
    if dup.any():
        raise InputError(f"{platemap}: {int(dup.sum())} plate-map rows share a {'/'.join(on)} "
                         f"(first: {_keys(pm[dup], on, 1)})", fix="list each well once per plate")
    overlap = [c for c in pm.columns if c in table.columns and c not in on]
    out = table.drop(columns=overlap).merge(pm.assign(_raycp_pm=True), on=on, how="left", validate="many_to_one")
    matched = out.pop("_raycp_pm").notna().to_numpy()
    n, total = int(matched.sum()), len(out)
    name = os.path.basename(platemap.rstrip("/")) or platemap
    if n == 0:
        raise InputError(f"{platemap}: the plate map matched 0 of {total} sites on {'/'.join(on)}: "
                         f"sites have {_keys(table, on)}; the plate map has {_keys(pm, on)}",
                         fix="the plate map and the images must name the same plates and wells (wells may be "
                             "spelled A1, A01 or r01c01; plates must match exactly)")
    tcol = _treatment_column(out, treatment_col) if treatment_col else None
    blank = int(out.loc[matched, tcol].map(_blank).sum()) if tcol in pm.columns else 0
    note = f"plate map {name}: {n} of {total} sites matched on {'/'.join(on)}"
    if tcol in pm.columns:
        note += f", {blank} of them with a blank {tcol}"
    warnings = []
    if n < total:
        missing = out.loc[~matched, on]
        warnings.append(f"plate map {name} matched {n} of {total} sites; {total - n} site(s) get no plate-map "
                        f"values (first: {_keys(missing, on)})")
    return out, [note], warnings


def _treatment_column(table: pd.DataFrame, name: str) -> str:
    """The treatment column as given, or with the ``Metadata_`` prefix a plate map's columns got."""
    if name in table.columns:
        return name
    if f"Metadata_{name}" in table.columns:
        return f"Metadata_{name}"
    return name


def annotate(table: pd.DataFrame, *, treatment_col: str | None, control_values: tuple[str, ...],
             platemap: str | None = None, source: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Add ``Metadata_Treatment`` / ``Metadata_IsControl`` from a column, joining a plate map
    (``Metadata_Well`` + treatment columns, optionally ``Metadata_Plate``) when given.

    Returns the table and the lines to show a user: notes (sites matched by the plate map, N of
    M, and how many of them have a blank treatment) and warnings (fewer than all matched).
    Raises :class:`InputError` when the plate map matches no site (both sides' keys shown)."""
    out = table.copy()
    notes: list[str] = []
    warnings: list[str] = []
    if platemap is not None:
        out, notes, warnings = _join_platemap(out, platemap, treatment_col)
    if treatment_col is not None:
        col = _treatment_column(out, treatment_col)
        if col not in out.columns:
            raise InputError(f"{source}: treatment column {treatment_col!r} not found",
                             fix=f"choose one of {[c for c in out.columns if c.startswith('Metadata_')]}")
        treatment = [None if _blank(v) else str(v) for v in out[col]]
        out[TREATMENT] = pd.Series(treatment, index=out.index, dtype=object)
        controls = {str(v).strip() for v in control_values}
        out[IS_CONTROL] = [t is not None and t.strip() in controls for t in treatment]
        if controls and not any(out[IS_CONTROL]):
            seen = sorted({t for t in treatment if t is not None})
            warnings.append(f"no site has a control treatment {sorted(controls)} in {col}; treatments are e.g. "
                            f"{seen[:5]}: check --control")
        if platemap is None:
            blank = sum(t is None for t in treatment)
            if blank:
                warnings.append(f"{blank} of {len(out)} sites have a blank {col}: they get no treatment")
    return out, notes, warnings


def _annotated_index(table: pd.DataFrame, channels: list[str], *, treatment_col, control_values, platemap,
                     source: str, check_files: bool, notes=()) -> ScreenIndex:
    table = table.copy()
    if WELL in table.columns:  # both sides of the plate-map join spell wells and plates alike
        table[WELL] = [v if _blank(v) else normalize_well(v) for v in table[WELL]]
    if PLATE in table.columns:
        table[PLATE] = [v if _blank(v) else str(v).strip() for v in table[PLATE]]
    table, more_notes, warnings = annotate(table, treatment_col=treatment_col, control_values=control_values,
                                           platemap=platemap, source=source)
    index = validate(table, channels, source=source, check_files=check_files)
    return replace(index, notes=(*notes, *more_notes), warnings=tuple(warnings))


# -- LoadData --------------------------------------------------------------------------------------

def _loaddata_columns(table: pd.DataFrame, csv_url: str) -> dict[str, dict[str, str]]:
    """Image name -> family -> the CSV column, for every LoadData image/object column."""
    images: dict[str, dict[str, str]] = {}
    for column in table.columns:
        family, name = _family(str(column))
        if family is None:
            continue
        have = images.setdefault(name, {})
        if family in have:
            raise InputError(f"{csv_url}: columns {have[family]!r} and {column!r} both give {family} of {name}",
                             fix="keep one of them")
        have[family] = str(column)
    return images


def _pick_image(images: dict, src: str, csv_url: str) -> tuple[str, dict[str, str]]:
    for name in dict.fromkeys((src, src if src.startswith("Orig") else f"Orig{src}")):
        families = images.get(name)
        if families and any(f in families for f in IMAGE_FAMILIES):
            return name, families
        if families:
            raise InputError(f"{csv_url}: {name} is loaded as objects ({', '.join(sorted(families.values()))}), "
                             "not as an image", fix="map an image column (FileName_/URL_) to the channel")
    have = sorted(n for n, f in images.items() if any(x in f for x in IMAGE_FAMILIES))
    raise InputError(f"{csv_url}: unknown channel {src!r}: no FileName_{src}, URL_{src} or Orig{src} columns",
                     fix=f"map one of the LoadData images {have}")


def _check_local(value: str, *, csv_url: str, column: str, row: int) -> None:
    if urls.is_windows_absolute(value):
        raise InputError(f"{csv_url}: {column} row {row} is the Windows path \"{value}\", which no Ray worker can open",
                         fix=f"rewrite {column} to where the images are now (a path relative to the CSV, "
                             "an absolute path on this machine, or an s3:// URL)")


def _image_urls(table: pd.DataFrame, families: dict[str, str], base: str, csv_url: str) -> list[str]:
    """One URL per row as CellProfiler builds it: URL_ if present, else PathName_ + FileName_
    (a blank PathName_ means the CSV's folder)."""
    out = []
    url_c, file_c, path_c = (families.get(f) for f in IMAGE_FAMILIES)
    for i in range(len(table)):
        row = i + 1
        if url_c is not None:
            value = table[url_c].iloc[i]
            if _blank(value):
                raise InputError(f"{csv_url}: {url_c} row {row} is blank", fix=f"give every row a {url_c}")
            _check_local(str(value), csv_url=csv_url, column=url_c, row=row)
            out.append(urls.input_url(str(value), base))
            continue
        if file_c is None:
            raise InputError(f"{csv_url}: {path_c} has no matching FileName_ column",
                             fix=f"add {path_c.replace('PathName', 'FileName', 1)} (CellProfiler needs both)")
        name = table[file_c].iloc[i]
        if _blank(name):
            raise InputError(f"{csv_url}: {file_c} row {row} is blank", fix=f"give every row a {file_c}")
        name = str(name).strip()
        _check_local(name, csv_url=csv_url, column=file_c, row=row)
        folder = table[path_c].iloc[i] if path_c is not None else None
        if _blank(folder):
            out.append(urls.input_url(name, base))
            continue
        folder = str(folder).strip()
        _check_local(folder, csv_url=csv_url, column=path_c, row=row)
        if "://" in folder or folder.lower().startswith("file:"):
            folder = urls.input_path(folder)
        out.append(urls.input_url(folder.rstrip("/\\") + "/" + name.replace("\\", "/"), base))
    return out


def _synthesize_well(table: pd.DataFrame, csv_url: str) -> pd.DataFrame:
    """CellProfiler's LoadData makes Metadata_Well from a row and a column when there is none."""
    if WELL in table.columns:
        return table
    lower = {c.lower(): c for c in table.columns if c.startswith("Metadata_")}
    row = next((lower[f"metadata_{t}"] for t in _ROW_TOKENS if f"metadata_{t}" in lower), None)
    col = next((lower[f"metadata_{t}"] for t in _COLUMN_TOKENS if f"metadata_{t}" in lower), None)
    if row is None or col is None:
        return table
    wells = []
    for i, (r, c) in enumerate(zip(table[row], table[col]), 1):
        try:
            wells.append(well_id(r, c))
        except ValueError as exc:
            raise InputError(f"{csv_url}: {row}/{col} row {i} ({r!r}, {c!r}) is not a well: {exc}",
                             fix="write rows as letters (or 1-based numbers) and columns as numbers") from None
    out = table.copy()
    out[WELL] = wells
    return out


def from_loaddata(csv_url: str, *, channel_map: Mapping[str, str], treatment_col: str | None = None,
                  control_values: tuple[str, ...] = (), platemap: str | None = None,
                  check_files: bool = True) -> ScreenIndex:
    """CellProfiler LoadData CSV -> index (see the module docstring for the columns honoured).

    ``channel_map`` maps LoadData image names (``OrigDNA``, or ``DNA`` for ``OrigDNA``) to raycp
    channels. Raises :class:`InputError` naming the CSV, the column and the row for a Windows
    drive path, a blank file name, a plane number that is not a whole number, or a plate map
    that matches no site."""
    table = read_table(csv_url, text=_loaddata_text, what="LoadData CSV")
    table = _synthesize_well(table, csv_url)
    base = _dirname(csv_url)
    images = _loaddata_columns(table, csv_url)
    out = pd.DataFrame({c: table[c] for c in table.columns if str(c).startswith("Metadata_")})
    channels, used = [], set()
    for src, ch in channel_map.items():
        name, families = _pick_image(images, src, csv_url)
        used.add(name)
        out[url_col(ch)] = _image_urls(table, families, base, csv_url)
        for family, index_col in PLANE_FAMILIES.items():
            if family in families:
                default = PLANE_DEFAULTS[f"{family}_"]
                out[index_col(ch)] = plane_numbers(table[families[family]], default, lowest=default, source=csv_url,
                                                   column=families[family]).to_numpy()
        channels.append(ch)
    for key in (PLATE, WELL, SITE):
        if key not in out.columns:
            raise InputError(f"{csv_url}: missing column {key}",
                             fix="LoadData CSVs need Metadata_Plate, Metadata_Well (or a row and a column) "
                                 "and Metadata_Site")
    unmapped = sorted(n for n, f in images.items() if n not in used and any(x in f for x in IMAGE_FAMILIES))
    notes = [f"LoadData images not mapped to a channel (not read): {', '.join(unmapped)}"] if unmapped else []
    return _annotated_index(out, channels, treatment_col=treatment_col, control_values=control_values,
                            platemap=platemap, source=csv_url, check_files=check_files, notes=notes)


# -- DeepProfiler ----------------------------------------------------------------------------------

def from_deepprofiler(index_url: str, *, config_url: str | None = None, images_root: str | None = None,
                      check_files: bool = True) -> ScreenIndex:
    """DeepProfiler ``inputs/metadata/index.csv`` + ``inputs/config/config.json`` -> index.

    Channels come from ``dataset.images.channels``; the treatment from
    ``dataset.metadata.label_field`` and controls from ``control_value``. Image paths are
    relative to ``inputs/images`` (DeepProfiler's layout) unless ``images_root`` is given; every
    column is read as text."""
    table = read_table(index_url, text=every_column, what="DeepProfiler index")
    meta_dir = _dirname(index_url)
    inputs = _dirname(meta_dir)
    config_url = config_url or urls.join(inputs, "config", "config.json")
    try:
        config = json.loads(urls.read_bytes(config_url))
    except FileNotFoundError:
        raise InputError(f"{config_url}: DeepProfiler config not found",
                         fix="pass --dp-config pointing at the project's config.json") from None
    dataset = config.get("dataset", {})
    channels = list(dataset.get("images", {}).get("channels", []))
    if not channels:
        raise InputError(f"{config_url}: no dataset.images.channels list", fix="add the channel list")
    missing = [c for c in channels if c not in table.columns]
    if missing:
        raise InputError(f"{index_url}: channel column(s) {missing} from {config_url} not in the index",
                         fix="the index needs one column per configured channel")
    root = images_root or urls.join(inputs, "images")
    out = pd.DataFrame({c: table[c] for c in table.columns if c.startswith("Metadata_")})
    for ch in channels:
        for i, p in enumerate(table[ch], 1):
            if _blank(p):
                raise InputError(f"{index_url}: {ch} row {i} is blank", fix=f"give every row a {ch} image")
            _check_local(str(p), csv_url=index_url, column=ch, row=i)
        out[url_col(ch)] = [urls.input_url(str(p), root) for p in table[ch]]
    label = dataset.get("metadata", {}).get("label_field")
    control = dataset.get("metadata", {}).get("control_value")
    extra = [c for c in table.columns if c not in channels and not c.startswith("Metadata_")]
    for c in extra:
        out[f"Metadata_{c}"] = table[c]
    return _annotated_index(out, channels, treatment_col=f"Metadata_{label}" if label else None,
                            control_values=(control,) if control else (), platemap=None, source=index_url,
                            check_files=check_files)


# -- Opera Phenix / Operetta folders -----------------------------------------------------------------

def parse_phenix_name(name: str) -> dict | None:
    """``r03c03f03p01-ch1sk1fk1fl1.tiff`` -> well C03, site 3, plane 1, channel 1 (else None)."""
    match = PHENIX_NAME.match(name)
    if not match:
        return None
    return {
        "well": normalize_well(f"r{match['row']}c{match['col']}"),
        "site": int(match["field"]),
        "plane": int(match["plane"]),
        "channel": int(match["ch"]),
    }


def from_phenix_folder(folder: str, *, plate: str, channel_map: Mapping[int, str],
                       platemap: str | None = None, treatment_col: str | None = None,
                       control_values: tuple[str, ...] = (), plane: int = 1,
                       check_files: bool = True) -> ScreenIndex:
    """A folder of Phenix/Operetta exports -> index (one listing of that folder, at import only).

    ``channel_map`` maps the ``chN`` number to a raycp channel (``{5: "DNA", 2: "ER", ...}``);
    numbers not in the map (e.g. brightfield) are ignored, and so is every plane but ``plane``.
    """
    fs, path = urls.filesystem(folder)
    try:
        names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise InputError(f"{folder}: folder not found", fix="check the image folder URL") from None
    rows: dict[tuple[str, int], dict] = {}
    for name in names:
        parsed = parse_phenix_name(name)
        if parsed is None or parsed["plane"] != plane or parsed["channel"] not in channel_map:
            continue
        key = (parsed["well"], parsed["site"])
        row = rows.setdefault(key, {PLATE: plate, WELL: parsed["well"], SITE: parsed["site"]})
        row[url_col(channel_map[parsed["channel"]])] = urls.join(folder, name)
    if not rows:
        raise InputError(f"{folder}: no Phenix-named images (rXXcXXfXXpXX-chNsk1fk1fl1.tiff) "
                         f"for channels {sorted(channel_map)}",
                         fix="check the folder and the --channel-map numbers")
    table = pd.DataFrame(list(rows.values()))
    channels = list(dict.fromkeys(channel_map.values()))
    for ch in channels:
        if url_col(ch) not in table.columns:
            raise InputError(f"{folder}: no images for channel {ch}",
                             fix="check the --channel-map numbers against the file names")
    return _annotated_index(table, channels, treatment_col=treatment_col, control_values=control_values,
                            platemap=platemap, source=folder, check_files=check_files)


__all__ = ["annotate", "from_deepprofiler", "from_loaddata", "from_phenix_folder", "parse_phenix_name",
           "read_platemap", "row_letters"]
