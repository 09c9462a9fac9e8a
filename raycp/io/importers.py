"""Importers into the canonical screen index (see :mod:`raycp.io.index`).

Three source formats users have today:

- CellProfiler LoadData CSV (``FileName_Orig<Ch>`` + ``PathName_Orig<Ch>``, or ``URL_Orig<Ch>``,
  optional ``Frame_Orig<Ch>``);
- a DeepProfiler project's ``index.csv`` with its ``config.json`` channel list;
- a folder of Opera Phenix / Operetta images named ``r03c03f03p01-ch1sk1fk1fl1.tiff``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections.abc import Mapping

import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.index import (
    IS_CONTROL, PLATE, SITE, TREATMENT, WELL, ScreenIndex, frame_col, normalize_well, url_col,
    validate,
)

PHENIX_NAME = re.compile(
    r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<field>\d{2,3})p(?P<plane>\d{2})-ch(?P<ch>\d+)"
    r"sk\d+fk\d+fl\d+\.tiff?$",
    re.IGNORECASE,
)


def _read_table(url: str) -> pd.DataFrame:
    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: file not found", fix="check the path") from None
    if url.endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data), compression="gzip" if url.endswith(".gz") else None)


def _dirname(url: str) -> str:
    return posixpath.dirname(url) if "://" in url else os.path.dirname(url)


def annotate(table: pd.DataFrame, *, treatment_col: str | None, control_values: tuple[str, ...],
             platemap: str | None = None, source: str) -> pd.DataFrame:
    """Add ``Metadata_Treatment`` / ``Metadata_IsControl`` from a column, joining a plate map
    (``Metadata_Well`` + treatment columns, optionally ``Metadata_Plate``) when given."""
    out = table.copy()
    if platemap is not None:
        pm = _read_table(platemap)
        if WELL not in pm.columns:
            raise InputError(f"{platemap}: plate map has no {WELL} column",
                             fix="name the well column Metadata_Well")
        pm = pm.copy()
        pm[WELL] = pm[WELL].astype(str).map(normalize_well)
        on = [WELL] + ([PLATE] if PLATE in pm.columns else [])
        if PLATE in pm.columns:
            pm[PLATE] = pm[PLATE].astype(str)
        overlap = [c for c in pm.columns if c in out.columns and c not in on]
        out = out.drop(columns=overlap).merge(pm, on=on, how="left", validate="many_to_one")
    if treatment_col is not None:
        if treatment_col not in out.columns:
            raise InputError(f"{source}: treatment column {treatment_col!r} not found",
                             fix=f"choose one of {[c for c in out.columns if c.startswith('Metadata_')]}")
        out[TREATMENT] = out[treatment_col].astype("string").astype(object)
        out[IS_CONTROL] = out[TREATMENT].isin(control_values)
    return out


def from_loaddata(csv_url: str, *, channel_map: Mapping[str, str], treatment_col: str | None = None,
                  control_values: tuple[str, ...] = (), platemap: str | None = None,
                  check_files: bool = True) -> ScreenIndex:
    """CellProfiler LoadData CSV -> index.

    ``channel_map`` maps LoadData channel names (``OrigDNA`` or ``DNA``) to raycp channels.
    Relative ``PathName_*`` values are resolved against the CSV's folder.
    """
    table = _read_table(csv_url)
    base = _dirname(csv_url)
    out = pd.DataFrame({c: table[c] for c in table.columns if c.startswith("Metadata_")})
    channels = []
    for src, ch in channel_map.items():
        name = src if src.startswith("Orig") else f"Orig{src}"
        file_c, path_c, url_c = f"FileName_{name}", f"PathName_{name}", f"URL_{name}"
        if url_c in table.columns:
            col = table[url_c].astype(str)
        elif file_c in table.columns and path_c in table.columns:
            col = [urls.resolve(urls.join(str(p), str(f)) if str(p) not in ("", "nan") else str(f), base)
                   for p, f in zip(table[path_c], table[file_c])]
        else:
            have = sorted({c.split("_", 1)[1] for c in table.columns
                           if c.startswith(("FileName_", "URL_"))})
            raise InputError(f"{csv_url}: unknown channel {src!r}: no {file_c}/{path_c} or {url_c} columns",
                             fix=f"map one of the LoadData channels {have}")
        out[url_col(ch)] = list(col)
        if f"Frame_{name}" in table.columns:
            out[frame_col(ch)] = table[f"Frame_{name}"].astype(int)
        channels.append(ch)
    for key in (PLATE, WELL, SITE):
        if key not in out.columns:
            raise InputError(f"{csv_url}: missing column {key}",
                             fix="LoadData CSVs need Metadata_Plate, Metadata_Well and Metadata_Site")
    out = annotate(out, treatment_col=treatment_col, control_values=control_values,
                   platemap=platemap, source=csv_url)
    return validate(out, channels, source=csv_url, check_files=check_files)


def from_deepprofiler(index_url: str, *, config_url: str | None = None, images_root: str | None = None,
                      check_files: bool = True) -> ScreenIndex:
    """DeepProfiler ``inputs/metadata/index.csv`` + ``inputs/config/config.json`` -> index.

    Channels come from ``dataset.images.channels``; the treatment from
    ``dataset.metadata.label_field`` and controls from ``control_value``. Image paths are
    relative to ``inputs/images`` (DeepProfiler's layout) unless ``images_root`` is given.
    """
    table = _read_table(index_url)
    meta_dir = _dirname(index_url)
    inputs = _dirname(meta_dir)
    config_url = config_url or urls.join(inputs, "config", "config.json")
    try:
        config = json.loads(urls.read_bytes(config_url))
    except FileNotFoundError:
        raise InputError(f"{config_url}: DeepProfiler config not found",
                         fix="pass --config pointing at the project's config.json") from None
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
        out[url_col(ch)] = [urls.resolve(str(p), root) for p in table[ch]]
    label = dataset.get("metadata", {}).get("label_field")
    control = dataset.get("metadata", {}).get("control_value")
    extra = [c for c in table.columns if c not in channels and not c.startswith("Metadata_")]
    for c in extra:
        out[f"Metadata_{c}"] = table[c]
    out = annotate(out, treatment_col=f"Metadata_{label}" if label else None,
                   control_values=(control,) if control else (), source=index_url)
    return validate(out, channels, source=index_url, check_files=check_files)


def parse_phenix_name(name: str) -> dict | None:
    """``r03c03f03p01-ch1sk1fk1fl1.tiff`` -> well C03, site 3, plane 1, channel 1 (else None)."""
    match = PHENIX_NAME.match(name)
    if not match:
        return None
    row, col = int(match["row"]), int(match["col"])
    return {
        "well": f"{_row_letters(row)}{col:02d}",
        "site": int(match["field"]),
        "plane": int(match["plane"]),
        "channel": int(match["ch"]),
    }


def _row_letters(row: int) -> str:
    letters = ""
    while row > 0:
        row, rem = divmod(row - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


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
    table = annotate(table, treatment_col=treatment_col, control_values=control_values,
                     platemap=platemap, source=folder)
    return validate(table, channels, source=folder, check_files=check_files)
