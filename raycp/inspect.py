"""Site summaries: what a screen's images look like before any processing.

Pure core :func:`site_summary` (one site -> per-channel statistics) and the Ray adapter
:func:`summarize_screen` that streams every site of an index through it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycp.io.index import KEYS, ScreenIndex
from raycp.ledger import Ledger

#: Percentiles reported per channel; 0.05 and 99.95 are the paper's stretch limits (Methods).
PERCENTILES = (0.05, 1.0, 50.0, 99.0, 99.95)


def site_summary(site: np.ndarray, channels: tuple[str, ...] | list[str]) -> list[dict]:
    """Per channel: shape, dtype, min/max/mean and :data:`PERCENTILES` of a ``C×H×W`` site."""
    rows = []
    for ch, plane in zip(channels, site, strict=True):
        pct = np.percentile(plane, PERCENTILES)
        row = {
            "channel": ch,
            "height": int(plane.shape[0]),
            "width": int(plane.shape[1]),
            "dtype": str(plane.dtype),
            "min": int(plane.min()),
            "max": int(plane.max()),
            "mean": float(plane.mean(dtype=np.float64)),
        }
        row.update({f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct)})
        rows.append(row)
    return rows


def summarize_screen(index: ScreenIndex, *, progress=None) -> tuple[pd.DataFrame, Ledger]:
    """Read every site of ``index`` on Ray and summarise it; unreadable sites are quarantined.

    ``progress(iterable, total=, description=)`` wraps the result stream (the CLI's progress bar).
    """
    from raycp.sites import map_sites

    def summarize(site: np.ndarray, row: dict) -> list[dict]:
        return site_summary(site, index.channels)

    ledger = Ledger("summary")
    frames = []
    stream = map_sites(index, summarize)
    if progress is not None:
        stream = progress(stream, total=len(index), description="summarising sites")
    for key, result, reason in stream:
        if reason is None:
            ledger.processed(key)
            frames.append(pd.DataFrame([{**key, **r} for r in result]))
        else:
            ledger.quarantined(key, reason)
    stats = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*KEYS, "channel"])
    return stats, ledger
