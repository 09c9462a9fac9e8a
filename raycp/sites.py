"""The Ray adapter every per-site stage shares: stream the index's sites through a pure function.

Each site is read (all channels, fsspec + tifffile) inside a Ray Data task and handed to
``fn(site_array, row) -> result``. A site whose read or ``fn`` raises is not lost: it comes
back with a one-line reason for the stage's ledger. Results stream back in index order;
nothing is materialised on the driver beyond what the caller keeps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from raycp.io.images import read_site
from raycp.io.index import KEYS, ScreenIndex
from raycp.ledger import short_reason


def process_site(index: ScreenIndex, row: dict, fn: Callable[[np.ndarray, dict], Any]) -> tuple[Any, str | None]:
    """Read one site and apply ``fn``; return ``(result, None)`` or ``(None, reason)``."""
    try:
        site = read_site(index.planes(row))
        return fn(site, row), None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a quarantine reason
        return None, short_reason(exc)


def index_blocks(table, n_blocks: int) -> list:
    """Split an index into about ``n_blocks`` contiguous row blocks (Ray Data's unit of parallelism)."""
    n = max(1, min(len(table), n_blocks))
    step = -(-len(table) // n)
    return [table.iloc[i:i + step] for i in range(0, len(table), step)]


def map_sites(index: ScreenIndex, fn: Callable[[np.ndarray, dict], Any]) -> Iterator[tuple[dict, Any, str | None]]:
    """Yield ``(key, result, reason)`` per site, computed on the Ray cluster.

    ``result`` must be JSON-serialisable (it crosses the object store as text so no user data
    is ever unpickled); large outputs belong in files written by ``fn`` itself.
    """
    from raycp import runtime

    ray = runtime.connection()
    channels = index.channels

    def task(row: dict) -> dict:
        local = ScreenIndex(index.table.iloc[:0], channels)
        result, reason = process_site(local, row, fn)
        return {**{k: row[k] for k in KEYS},
                "result": json.dumps(result) if reason is None else "",
                "reason": reason or ""}

    ds = ray.data.from_pandas(index_blocks(index.table, int(runtime.cluster_cpus()) * 4)).map(task)
    for out in ds.iter_rows():
        key = {k: (int(out[k]) if k == "Metadata_Site" else str(out[k])) for k in KEYS}
        if out["reason"]:
            yield key, None, out["reason"]
        else:
            yield key, json.loads(out["result"]), None


_MALLOC_TRIM = None
_RELEASE_CALLS = 0


def release_memory(every: int = 1) -> None:
    """Give freed heap pages back to the OS (glibc keeps them per thread arena otherwise, and a
    worker's memory would creep up with the number of sites it has seen), on every ``every``-th
    call of this process: trimming costs the next site the page faults of its memory."""
    global _MALLOC_TRIM, _RELEASE_CALLS
    _RELEASE_CALLS += 1
    if _RELEASE_CALLS % every:
        return
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


class JsonSpec:
    """Mixin of the dataclasses a stage ships to its Ray workers: JSON both ways (no user data is
    ever pickled), keys sorted so equal specs give equal text."""

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls(**json.loads(text))


