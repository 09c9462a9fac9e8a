"""The image stages' work on one site, inside a Ray Data task (callable without Ray in tests).

Each task gets a block of index rows and the stage's :class:`StageSpec` as JSON (no user data is
ever unpickled); per site it reads the channel files, runs the pure cores, writes the site's
outputs itself (atomic writes, URLs from :class:`raycp.layout.RunLayout`), writes the site's
receipt last and returns one small accounting row: processed with the receipt, or quarantined
with a one-line reason. Illumination returns per-plate partial sums instead. The driver side
(streaming, resume, ledgers) is :mod:`raycp.preprocess.pipeline`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycp.io import urls
from raycp.io.index import KEYS, PLATE, SITE, TREATMENT, WELL
from raycp.layout import RunLayout
from raycp.ledger import PROCESSED, QUARANTINED, short_reason
from raycp.preprocess import compress as compress_core
from raycp.preprocess import crops as crops_core
from raycp.preprocess import illumination as illum_core
from raycp.preprocess import nuclei as nuclei_core
from raycp.preprocess.config import PreprocessConfig
from raycp.preprocess.locations import check_inside
from raycp.preprocess.site import SiteReader, site_crops, site_key, site_nuclei, where
from raycp.sites import JsonSpec, release_memory

#: A worker gives its freed heap back to the OS after this many sites (:func:`release_memory`).
TRIM_EVERY_SITES = 8


@dataclass
class StageSpec(JsonSpec):
    """What a worker needs for one image stage, as JSON."""

    stage: str
    run: str
    channels: list[str]
    config: dict
    correct: bool = True                  # apply the plate's illumination functions
    compressed_input: bool = False        # the index points at compressed 8-bit PNGs
    locate: str = "detect"                # crops/nuclei: detect | file | template
    labels: dict[str, int] = field(default_factory=dict)
    metadata_columns: list[str] = field(default_factory=list)


class SiteContext(SiteReader):
    """Per-worker state of a stage: its spec and config, and the :class:`SiteReader`."""

    def __init__(self, spec: StageSpec, *, threads: int | None = None) -> None:
        super().__init__(spec.run, correct=spec.correct, threads=threads or min(8, len(spec.channels)))
        self.spec = spec
        self.cfg = PreprocessConfig.model_validate(spec.config)


def _write_receipt(ctx: SiteContext, key: dict, receipt: dict) -> dict:
    urls.atomic_write_text(ctx.layout.receipt(ctx.spec.stage, key[PLATE], key[WELL], key[SITE]),
                           json.dumps(receipt, sort_keys=True))
    return receipt


def process_compress(ctx: SiteContext, row: dict) -> dict:
    """Correct, stretch to the 0.05/99.95 percentiles, 8 bits, one PNG per channel."""
    key = site_key(row)
    channels = list(ctx.spec.channels)
    planes, file_bytes = ctx.read(row, channels)
    functions = ctx.functions(key[PLATE], channels)
    cc = ctx.cfg.compression
    png_total = 0
    limits, hists = [], []
    for c, ch in enumerate(channels):
        u8, _, lo, hi = compress_core.compress_plane(planes[c], None if functions is None else functions[c],
                                                     low=cc.low_percentile, high=cc.high_percentile,
                                                     keep_corrected=False)
        data = compress_core.png_bytes(u8, cc.png_level)
        urls.atomic_write_bytes(ctx.layout.png(key[PLATE], key[WELL], key[SITE], ch), data)
        png_total += len(data)
        limits.append([lo, hi])
        hists.append(compress_core.histogram(u8).tolist())
    return _write_receipt(ctx, key, {
        "raw_bytes": int(sum(p.nbytes for p in planes)), "file_bytes": file_bytes, "png_bytes": png_total,
        "height": int(planes[0].shape[0]), "width": int(planes[0].shape[1]), "dtype": str(planes[0].dtype),
        "limits": limits, "histogram": hists,
    })


def process_nuclei(ctx: SiteContext, row: dict) -> dict:
    """Nuclei centres of one site (detected on the corrected DNA channel, or its per-site CSV)."""
    key = site_key(row)
    plane = None
    if ctx.spec.locate != "template":
        dna = ctx.cfg.nuclei.channel
        (raw,), _ = ctx.read(row, [dna])
        functions = ctx.functions(key[PLATE], [dna])
        plane = illum_core.correct(raw, None if functions is None else functions[0])
    locate = "template" if ctx.spec.locate == "template" else "detect"
    table = site_nuclei(locate, run=ctx.run, key=key, nuclei_cfg=ctx.cfg.nuclei, dna_plane=plane)
    if plane is not None:
        check_inside(table, plane.shape, source=where(key))
    write_nuclei(ctx.layout, key, table)
    return _write_receipt(ctx, key, {"n_nuclei": int(len(table))})


def write_nuclei(layout: RunLayout, key: dict, table: pd.DataFrame) -> None:
    """A site's nuclei table (keys + :data:`raycp.preprocess.nuclei.COLUMNS`), atomically."""
    out = table.copy()
    for k in (SITE, WELL, PLATE):
        out.insert(0, k, key[k])
    if nuclei_core.AREA not in out.columns:
        out[nuclei_core.AREA] = np.int64(0)
        out[nuclei_core.BORDER] = False
    out = out[[PLATE, WELL, SITE, *nuclei_core.COLUMNS]]
    buf = io.BytesIO()
    out.to_parquet(buf, index=False)
    urls.atomic_write_bytes(layout.nuclei(key[PLATE], key[WELL], key[SITE]), buf.getvalue())


def process_crops(ctx: SiteContext, row: dict) -> dict:
    """The site's crops (:func:`raycp.preprocess.site.site_crops`) as one shard, and optionally
    DeepProfiler's per-cell PNG strips."""
    key = site_key(row)
    spec, cfg = ctx.spec, ctx.cfg
    mask_channel = cfg.crops.mask_channel if cfg.crops.mask else None
    got = site_crops(ctx, row, cfg, channels=[c for c in spec.channels if c != mask_channel],
                     compressed=spec.compressed_input, locate=spec.locate, mask_channel=mask_channel,
                     labels=spec.labels, metadata_columns=spec.metadata_columns)
    arrow = _string_nulls(crops_core.crops_table(got.crops, got.meta, got.channels))
    urls.atomic_write_bytes(ctx.layout.crops(key[PLATE], key[WELL], key[SITE]), crops_core.table_bytes(arrow))
    if cfg.crops.export_deepprofiler:
        _export_deepprofiler(ctx.layout, key, got.meta, got.crops)
    return _write_receipt(ctx, key, {"n_cells": int(len(got.meta)), "n_border": got.n_border,
                                     "channels": got.channels})


def _string_nulls(table):
    """All-null and large-string metadata columns become strings: every shard has one schema."""
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type) or pa.types.is_large_string(f.type):
            table = table.set_column(i, pa.field(f.name, pa.string()), table.column(i).cast(pa.string()))
    return table


def _export_deepprofiler(layout: RunLayout, key: dict, meta: pd.DataFrame, crops: np.ndarray) -> None:
    """DeepProfiler ``export-sc``: one PNG strip per cell + this site's rows of ``sc-metadata.csv``."""
    base = layout.deepprofiler
    names = []
    for i, r in enumerate(meta.itertuples(index=False)):
        x, y = getattr(r, crops_core.CELL_X), getattr(r, crops_core.CELL_Y)
        target = int(getattr(r, crops_core.LABEL))
        name = crops_core.deepprofiler_image_name(key[PLATE], key[WELL], key[SITE], target, x, y)
        urls.atomic_write_bytes(urls.join(base, name), compress_core.png_bytes(crops_core.deepprofiler_strip(crops[i])))
        names.append(name)
    part = pd.DataFrame({
        PLATE: meta[PLATE], WELL: meta[WELL], SITE: meta[SITE],
        "Nuclei_Location_Center_X": meta[crops_core.CELL_X], "Nuclei_Location_Center_Y": meta[crops_core.CELL_Y],
        TREATMENT: meta[TREATMENT], crops_core.TOUCHES_BORDER: meta[crops_core.TOUCHES_BORDER],
        "Key": f"{key[PLATE]}/{key[WELL]}/{key[SITE]}", "Target": meta[crops_core.LABEL], "Image_Name": names,
    })
    urls.atomic_write_text(urls.join(base, "_parts", key[PLATE], f"{key[WELL]}_{key[SITE]}.csv"),
                           part.to_csv(index=False))


PROCESSORS = {"compress": process_compress, "nuclei": process_nuclei, "crops": process_crops}


def process_row(ctx: SiteContext, row: dict) -> dict:
    """One accounting row: processed with its receipt, or quarantined with a one-line reason."""
    key = site_key(row)
    try:
        receipt = PROCESSORS[ctx.spec.stage](ctx, row)
        return {**key, "status": PROCESSED, "reason": "", "receipt": json.dumps(receipt, sort_keys=True)}
    except Exception as exc:  # noqa: BLE001 - every failure becomes the site's quarantine reason
        return {**key, "status": QUARANTINED, "reason": short_reason(exc), "receipt": ""}


#: One context per worker process, reused by the tasks of a stage (Ray reuses task workers).
_CONTEXTS: dict[str, SiteContext] = {}


def _context(spec_json: str) -> SiteContext:
    ctx = _CONTEXTS.get(spec_json)
    if ctx is None:
        for old in _CONTEXTS.values():
            old.close()
        _CONTEXTS.clear()
        ctx = _CONTEXTS[spec_json] = SiteContext(StageSpec.from_json(spec_json))
    return ctx


def site_batch(batch: pd.DataFrame, spec_json: str) -> pd.DataFrame:
    """The Ray Data task of the per-site stages: one accounting row per site of ``batch``."""
    ctx = _context(spec_json)
    rows = []
    for row in batch.to_dict("records"):
        rows.append(process_row(ctx, row))
        # not after every site: the next site reuses the freed pages, and trimming made each one
        # fault its ~60 MB back in (measured +25 ms of CPU a site, a third of its processing)
        release_memory(every=TRIM_EVERY_SITES)
    return pd.DataFrame(rows, columns=[*KEYS, "status", "reason", "receipt"])


def illumination_batch(batch: pd.DataFrame, spec_json: str) -> pd.DataFrame:
    """The illumination task: its sites' thumbnails summed per (plate, image size) — partial sums
    of the plate means, merged on the driver."""
    out = pd.DataFrame(illumination_partials(_context(spec_json), batch.to_dict("records")),
                       columns=[PLATE, "height", "width", "count", "sum", "sites"])
    release_memory()
    return out


def illumination_partials(ctx: SiteContext, rows: list[dict]) -> list[dict]:
    scale = ctx.cfg.illumination.scale
    sums: dict[tuple, illum_core.PlateSum] = {}
    quarantined = []
    for row in rows:
        key = site_key(row)
        try:
            planes, _ = ctx.read(row, list(ctx.spec.channels))
            thumbs = illum_core.site_thumbnails(planes, scale)
        except Exception as exc:  # noqa: BLE001
            quarantined.append({**key, "status": QUARANTINED, "reason": short_reason(exc)})
            continue
        shape = tuple(int(s) for s in planes[0].shape)
        acc = sums.setdefault((key[PLATE], shape), illum_core.PlateSum(key[PLATE], shape))
        acc.add(thumbs, {**key, "status": PROCESSED, "reason": ""})
    out = [{PLATE: p, "height": s[0], "width": s[1], "count": a.count, "sum": a.to_bytes(),
            "sites": json.dumps(a.sites)} for (p, s), a in sums.items()]
    if quarantined:
        out.append({PLATE: "", "height": 0, "width": 0, "count": 0, "sum": b"", "sites": json.dumps(quarantined)})
    return out
