"""The ``index`` stage: read and validate the screen index (paper Methods, "Image data")."""

from __future__ import annotations

import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.outputs import write_parquet
from raycp.ledger import Ledger
from raycp.stages.base import Context, Stage


def _site_missing(row: dict, cols: list[str]) -> str:
    for c in cols:
        url = row[c]
        if not isinstance(url, str) or not url or not urls.exists(url):
            return f"missing image {url} ({c})"
    return ""


def run_index(ctx: Context) -> dict:
    """Every site whose images are all present is processed, the others quarantined naming the
    missing file. Writes a snapshot of the index and the per-plate counts.

    Raises :class:`InputError` when the index marks no control well (sphering is fitted on them)."""
    from concurrent.futures import ThreadPoolExecutor

    from raycp.io.index import IS_CONTROL, KEYS, PLATE, TREATMENT, WELL, url_col
    from raycp.preprocess.pipeline import load_index

    cfg = ctx.cfg
    index, compressed = load_index(cfg.data.index, channels=list(cfg.data.channels))
    table = index.table
    cols = [url_col(c) for c in cfg.data.channels]
    rows = table[[*KEYS, *cols]].to_dict("records")
    with ThreadPoolExecutor(max_workers=32) as pool:
        missing = list(pool.map(lambda r: _site_missing(r, cols), rows))
    ledger = Ledger("index")
    for r, why in zip(rows, missing):
        key = {k: r[k] for k in KEYS}
        (ledger.quarantined(key, why) if why else ledger.processed(key))
    ledger.write(ctx.folder("index"))
    write_parquet(table, ctx.layout.index_snapshot)
    ctrl = table[IS_CONTROL].astype(bool) if IS_CONTROL in table.columns else pd.Series(False, index=table.index)
    figures = {"plates": int(table[PLATE].nunique()), "wells": int(table.groupby([PLATE, WELL]).ngroups),
               "sites": int(len(table)), "compressed_index": bool(compressed),
               "treatments": int(table.loc[~ctrl, TREATMENT].nunique()) if TREATMENT in table.columns else 0,
               "control_wells": int(table.loc[ctrl].groupby([PLATE, WELL]).ngroups)}
    if not figures["control_wells"]:
        raise InputError(f"{cfg.data.index}: no control wells (Metadata_IsControl)",
                         fix="mark the negative-control wells: sphering is fitted on them")
    return {**ledger.summary(), **figures}


def _science(cfg) -> dict:
    return {"index": cfg.data.index, "channels": list(cfg.data.channels)}


STAGE = Stage("index", "index (sites found)", run_index, _science, expensive=True, section="data")
