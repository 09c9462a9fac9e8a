"""Small tabular outputs of a stage (JSON summaries, Parquet tables), written atomically to any
fsspec URL or local path."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd

from raycp.io import urls


def jsonable(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def write_json(url: str, payload: dict) -> None:
    urls.atomic_write_text(str(url), json.dumps(jsonable(payload), indent=2) + "\n")


def write_parquet(frame: pd.DataFrame, url: str) -> None:
    """Without the index, column names as strings."""
    buf = io.BytesIO()
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    frame.to_parquet(buf, index=False)
    urls.atomic_write_bytes(str(url), buf.getvalue())


def read_parquet(url: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(urls.read_bytes(str(url))))


def save_png(draw, url: str) -> None:
    """Run a plotting function ``draw(local_path) -> path`` that writes a PNG and store its bytes
    at ``url`` (any URL), atomically."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="raycp-plot-") as tmp:
        path = draw(Path(tmp) / "plot.png")
        urls.atomic_write_bytes(url, Path(path).read_bytes())
