"""DeepProfiler-compatible per-site feature files: ``features/<plate>/<well>_<site>.npz``.

Keys ``features`` (cells × D float32), ``metadata`` (a dict of the site's metadata, stored as a
0-d object array) and ``locations`` (cells × 2: nucleus x, y). Files of an earlier DeepProfiler
``profiling.py`` hold the features under ``f`` (``np.savez_compressed(file, f=feats)``), with no
metadata, as ``<features>/<plate>_<well>_<site>.npz``; they read the same.

A features folder in any of DeepProfiler's layouts (:func:`find_feature_files`)::

    <root>/<plate>/<well>/<site>.npz      (nested)
    <root>/<plate>/<well>_<site>.npz      (flat per plate; raycp writes this one)
    <root>/<plate>_<well>_<site>.npz      (the earliest profiling.py)
 pycytominer / CytoTable users read
these with ``numpy.load(..., allow_pickle=True)``. raycp reads them *without* unpickling
arbitrary objects: the ``metadata`` entry goes through an unpickler that only rebuilds plain
Python values and numpy scalars/arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
import zipfile
from dataclasses import dataclass

import numpy as np

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.index import normalize_well

FEATURE_KEYS = ("features", "f")
"""The npz key of the features: DeepProfiler's, then its earliest ``profiling.py``'s."""

_SAFE_GLOBALS = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "str"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "complex"), ("builtins", "bool"), ("builtins", "bytes"), ("collections", "OrderedDict"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


@dataclass(frozen=True)
class SiteFeatures:
    features: np.ndarray
    metadata: dict
    locations: np.ndarray | None


def _load_member(zf: zipfile.ZipFile, name: str, *, url: str) -> np.ndarray:
    fp = io.BytesIO(zf.read(name))
    version = np.lib.format.read_magic(fp)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fp) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(fp))
    if dtype.hasobject:
        try:
            array = _SafeUnpickler(fp).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise InputError(f"{url}: {name} holds objects raycp will not unpickle ({exc})",
                             fix="keep npz metadata to plain values (strings, numbers)") from None
        return np.asarray(array, dtype=object).reshape(shape)
    return np.lib.format.read_array(io.BytesIO(zf.read(name)), allow_pickle=False)


def read_npz(url: str) -> SiteFeatures:
    """Read a DeepProfiler feature file (local or object store)."""
    try:
        data = urls.read_bytes(url)
    except FileNotFoundError:
        raise InputError(f"{url}: feature file not found", fix="check the features folder") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InputError(f"{url}: not an .npz file", fix="point at DeepProfiler's features/<plate>/*.npz") from None
    names = {n.removesuffix(".npy") for n in zf.namelist()}
    key = next((k for k in FEATURE_KEYS if k in names), None)
    if key is None:
        raise InputError(f"{url}: no 'features' (or older 'f') array (has {sorted(names)})",
                         fix="not a DeepProfiler feature file")
    features = _load_member(zf, f"{key}.npy", url=url)
    if features.ndim != 2:
        raise InputError(f"{url}: {key} has shape {features.shape}, not cells × features",
                         fix="not a DeepProfiler feature file")
    meta = _load_member(zf, "metadata.npy", url=url).item() if "metadata" in names else {}
    locations = _load_member(zf, "locations.npy", url=url) if "locations" in names else None
    return SiteFeatures(features=features, metadata=dict(meta), locations=locations)


def encode_npz(features: np.ndarray, metadata: dict, locations: np.ndarray) -> bytes:
    """DeepProfiler's layout, bytes-identical for identical inputs (fixed zip timestamps)."""
    buf = io.BytesIO()
    meta = np.empty((), dtype=object)
    meta[()] = dict(metadata)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in (("features", np.ascontiguousarray(features, dtype=np.float32)),
                            ("metadata", meta),
                            ("locations", np.ascontiguousarray(locations, dtype=np.float64))):
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=True)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


@dataclass(frozen=True)
class FeatureFile:
    """One site's npz file in a DeepProfiler features folder, with the keys its path gives."""

    url: str
    plate: str
    well: str
    site: str


def find_feature_files(root: str) -> list[FeatureFile]:
    """Every ``.npz`` under ``root`` (a local folder or URL) with plate, well and site read from
    its path in one of DeepProfiler's layouts (module docstring), sorted by plate, well, site.

    Raises :class:`InputError` when there is none, or for a file whose path fits no layout."""
    fs, base = urls.filesystem(root)
    try:
        found = sorted(p for p in fs.find(base) if p.lower().endswith(".npz"))
    except FileNotFoundError:
        raise InputError(f"{root}: folder not found", fix="point at DeepProfiler's features folder") from None
    if not found:
        raise InputError(f"{root}: no .npz feature file", fix="point at DeepProfiler's outputs/results/features folder")
    out = []
    prefix = base.rstrip("/") + "/"
    for path in found:
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        parts = rel[: -len(".npz")].split("/")
        if len(parts) == 3:
            plate, well, site = parts
        elif len(parts) == 2 and "_" in parts[1]:
            plate, (well, site) = parts[0], parts[1].rsplit("_", 1)
        elif len(parts) == 1 and parts[0].count("_") >= 2:
            plate, well, site = parts[0].rsplit("_", 2)
        else:
            raise InputError(f"{root}/{rel}: cannot tell its plate, well and site from the path",
                             fix="use DeepProfiler's layout: <plate>/<well>/<site>.npz or <plate>/<well>_<site>.npz")
        url = root.rstrip("/") + "/" + rel if "://" in root else os.path.join(root, *rel.split("/"))
        out.append(FeatureFile(url=url, plate=plate, well=normalize_well(well), site=site))
    return sorted(out, key=lambda f: (f.plate, f.well, _site_order(f.site), f.site))


def _site_order(site: str) -> int:
    digits = site.lstrip("sf")
    return int(digits) if digits.isdigit() else -1
