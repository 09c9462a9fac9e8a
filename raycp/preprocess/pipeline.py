"""Ray Data adapters: stream a screen's sites through the pure cores, one stage at a time.

Every stage is ``from_pandas(index blocks) → map_batches(task, one site per call)``: the task
(:mod:`raycp.preprocess.tasks`) reads the site's channel files (fsspec, in parallel threads), runs
the core, writes the site's outputs itself (atomic writes, names from plate/well/site) and returns
one small accounting row.
The driver only sees those rows (and, for illumination, per-plate partial sums), so memory stays
flat whatever the screen size; nothing is materialised.

Every URL a stage writes comes from :class:`raycp.layout.RunLayout` (``<run>`` = ``data.output``):
per-site outputs named from plate/well/site, a receipt per finished site under ``<stage>/_sites``
(written last), and ``ledger.parquet``, ``ledger.json``, ``config.yaml``, ``_SUCCESS`` per stage.

Re-running a stage lists its own ``_sites`` folder once, skips the sites with a receipt and
retries the quarantined ones; outputs are byte-identical.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycp.errors import ConfigError
from raycp.io import urls
from raycp.io.index import (
    IS_CONTROL,
    KEYS,
    PLANE_PREFIXES,
    PLATE,
    SITE,
    TREATMENT,
    WELL,
    ScreenIndex,
    read_index,
    url_col,
)
from raycp.layout import RunLayout, list_site_files
from raycp.ledger import PROCESSED, QUARANTINED, Ledger, StageOutcome, short_reason
from raycp.preprocess import compress as compress_core
from raycp.preprocess import illumination as illum_core
from raycp.preprocess import locations as loc_core
from raycp.preprocess.config import PreprocessConfig
from raycp.preprocess.site import corrects_illumination, metadata_columns, no_nuclei, nuclei_source, site_key
from raycp.preprocess.tasks import StageSpec, illumination_batch, site_batch, write_nuclei

#: Extra per-site ledger columns of each stage (0 for quarantined sites).
LEDGER_EXTRAS = {
    "illum": (),
    "compress": ("raw_bytes", "file_bytes", "png_bytes"),
    "nuclei": ("n_nuclei",),
    "crops": ("n_cells", "n_border"),
}
COMPRESSED_MARK = b"raycp.preprocessed"
#: At most this many sites per Ray task (one call of the stage function per task), and at least
#: this many blocks per CPU while there are enough sites.
SITES_PER_TASK = 32
BLOCKS_PER_CPU = 2

Progress = Callable[..., Iterable]


# -- driver side --------------------------------------------------------------------------------------

def load_index(url: str, channels: list[str] | None = None) -> tuple[ScreenIndex, bool]:
    """The index and whether it is a compressed index (8-bit PNGs already corrected and stretched)."""
    import pyarrow.parquet as pq

    index = read_index(url, channels=channels)
    compressed = False
    if url.endswith(".parquet"):
        fs, path = urls.filesystem(url)
        with fs.open(path, "rb") as fh:
            compressed = (pq.read_schema(fh).metadata or {}).get(COMPRESSED_MARK) == b"compressed"
    return index, compressed


def _stream(ray, table: pd.DataFrame, fn: Callable, spec: StageSpec, *, min_per_block: int, compute
            ) -> Iterator[dict]:
    """Accounting rows of ``table``'s sites, computed by Ray Data tasks (one CPU each); ``fn``
    gets a whole block of at least ``min_per_block`` sites (up to :data:`SITES_PER_TASK`).

    Tasks, not actors: the per-site work is stateless but for small caches that live in the
    worker process (:func:`raycp.preprocess.tasks.site_batch`), so no actor pool has to start per stage and every CPU
    works on a small machine. The source is the in-memory index, so there are no read tasks
    to starve.
    """
    from raycp import runtime
    from raycp.sites import index_blocks

    cpus = max(1, int(runtime.cluster_cpus()))
    concurrency = min(cpus, compute.read_concurrency) if compute is not None and compute.read_concurrency else cpus
    # A task takes one block: many sites per block amortise Ray Data's gap between two tasks of a
    # worker (0.1-0.3 s measured on 2 cores: the executor polls for finished tasks every 0.1 s),
    # while two blocks per CPU keep the workers evenly busy to the end.
    per_block = max(min_per_block, min(SITES_PER_TASK, math.ceil(len(table) / (cpus * BLOCKS_PER_CPU))))
    n_blocks = max(1, math.ceil(len(table) / per_block))
    concurrency = min(concurrency, n_blocks)
    ds = ray.data.from_pandas(index_blocks(table.reset_index(drop=True), n_blocks))
    ds = ds.map_batches(fn, fn_kwargs={"spec_json": spec.to_json()}, batch_size=None, batch_format="pandas",
                        compute=ray.data.TaskPoolStrategy(size=concurrency), num_cpus=1)
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        yield from batch.to_dict("records")


def _list_receipts(layout: RunLayout, stage: str) -> set[tuple[str, str, int]]:
    """Sites with a receipt: one listing of the stage's own ``_sites`` folder."""
    return list_site_files(layout.receipts(stage), ".json")


def _read_receipts(layout: RunLayout, stage: str, keys: list[dict], *, chunk: int = 256) -> Iterator[dict]:
    """Accounting rows of finished sites from their receipts, read in parallel, a chunk at a time
    (so a large screen's receipts never sit in memory together)."""
    def one(key: dict) -> dict:
        text = urls.read_bytes(layout.receipt(stage, key[PLATE], key[WELL], key[SITE])).decode()
        return {**key, "status": PROCESSED, "reason": "", "receipt": text}

    with ThreadPoolExecutor(max_workers=16) as pool:
        for start in range(0, len(keys), chunk):
            yield from pool.map(one, keys[start:start + chunk])


@dataclass(kw_only=True)
class StageResult(StageOutcome):
    """What an image stage did: its ledger and figures (:class:`StageOutcome`)."""

    stage: str


def _ledger_row(stage: str, row: dict) -> dict:
    receipt = json.loads(row["receipt"]) if row.get("receipt") else {}
    out = {PLATE: row[PLATE], WELL: row[WELL], SITE: int(row[SITE]), "status": row["status"],
           "reason": row["reason"] or ""}
    for col in LEDGER_EXTRAS[stage]:
        out[col] = int(receipt.get(col, 0))
    return out


def _run_site_stage(stage: str, index: ScreenIndex, spec: StageSpec, *, compute, progress: Progress | None,
                    on_row: Callable[[dict], None] | None = None) -> Ledger:
    """Skip sites with a receipt, stream the others through :func:`site_batch`, account for all."""
    from raycp import runtime

    layout = RunLayout(spec.run)
    urls.ensure_writable(layout.folder(stage))
    table = index.table
    done = _list_receipts(layout, stage)
    is_done = np.array([(p, w, int(s)) in done for p, w, s in table[list(KEYS)].itertuples(index=False)], dtype=bool)
    ledger = Ledger(stage)
    resumed = _read_receipts(layout, stage, [site_key(r) for r in table[is_done].to_dict("records")])
    todo = table[~is_done]

    def rows() -> Iterator[dict]:
        yield from resumed
        if len(todo):
            ray = runtime.connection()
            yield from _stream(ray, todo, site_batch, spec, min_per_block=1, compute=compute)

    stream = rows()
    if progress is not None:
        stream = progress(stream, total=len(table), description=f"{stage}: sites")
    for row in stream:
        if on_row is not None and row["status"] == PROCESSED:
            on_row(row)
        ledger.rows.append(_ledger_row(stage, row))
    return ledger


def _finish(stage: str, run, layout: RunLayout, ledger: Ledger, figures: dict) -> StageResult:
    from raycp import config as cfg

    folder = layout.folder(stage)
    if ledger.rows:
        ledger.write(folder)
    cfg.save_resolved(run, folder)
    result = StageResult(stage=stage, ledger=ledger, figures=figures)
    urls.atomic_write_text(layout.success(stage), json.dumps(result.summary, indent=2, sort_keys=True))
    return result


def stage_spec(stage: str, run, index: ScreenIndex, **kw) -> StageSpec:
    return StageSpec(stage=stage, run=run.data.output, channels=list(index.channels),
                     config=PreprocessConfig.of(run).model_dump(mode="json"), **kw)


# -- the four stages ------------------------------------------------------------------------------

def run_illumination(run, index: ScreenIndex, *, progress: Progress | None = None) -> StageResult:
    """Stage 1: per plate × channel functions from a distributed sum of 25 % thumbnails."""
    from raycp import runtime

    pre = PreprocessConfig.of(run)
    layout = RunLayout(run.data.output)
    folder = layout.folder("illum")
    urls.ensure_writable(folder)
    table = index.table
    ledger = Ledger("illum")
    todo_plates = []
    for plate, grp in table.groupby(PLATE, sort=True):
        info = _read_plate_json(folder, plate)
        wanted = sorted((w, int(s)) for w, s in grp[[WELL, SITE]].itertuples(index=False))
        if info is not None and sorted((r[WELL], int(r[SITE])) for r in info["sites"]) == wanted \
                and info.get("config") == pre.illumination.model_dump(mode="json"):
            ledger.rows.extend(_illum_ledger_rows(info["sites"]))
        else:
            todo_plates.append(plate)
    todo = table[table[PLATE].isin(todo_plates)]
    expected = todo.groupby(PLATE).size().to_dict()
    seen = dict.fromkeys(expected, 0)
    sums: dict[str, dict[tuple[int, int], illum_core.PlateSum]] = {p: {} for p in expected}
    quarantined: dict[str, list[dict]] = {p: [] for p in expected}

    def finish_plate(plate: str) -> list[dict]:
        """Functions of one complete plate from its summed thumbnails; its sites' ledger rows."""
        candidates = sorted(sums.pop(plate).values(), key=lambda a: (-a.count, a.shape))
        rows = quarantined.pop(plate)
        if candidates:
            main = candidates[0]
            for other in candidates[1:]:
                reason = (f"image size {other.shape[0]}×{other.shape[1]} differs from the plate's "
                          f"{main.shape[0]}×{main.shape[1]} ({main.count} sites) "
                          "(fix: all sites of a plate must have one image size)")
                rows.extend({**s, "status": QUARANTINED, "reason": reason} for s in other.sites)
            rows.extend(main.sites)
            functions = illum_core.plate_functions(main, main.shape, median_radius=pre.illumination.median_radius,
                                                   robust_percentile=pre.illumination.robust_percentile)
            illum_core.save_plate(folder, plate, index.channels, functions, {
                "plate": plate, "channels": list(index.channels), "shape": list(main.shape),
                "n_sites": main.count, "config": pre.illumination.model_dump(mode="json"),
                "sites": _sorted_sites(rows)})
        return _sorted_sites(rows)

    if len(todo):
        ray = runtime.connection()
        spec = stage_spec("illum", run, index, correct=False)
        stream: Iterable = _stream(ray, todo, illumination_batch, spec, min_per_block=8, compute=run.compute)
        if progress is not None:
            stream = _progress_by_sites(progress, stream, total=len(todo), description="illum: sites")
        # A plate is finished as soon as all its sites are accounted for, and its sums are
        # dropped then: the driver holds the running sums of a few plates, whatever the screen.
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            futures = []
            for part in stream:
                sites = json.loads(part["sites"])
                if part[PLATE]:
                    shape = (int(part["height"]), int(part["width"]))
                    incoming = illum_core.PlateSum.from_bytes(part[PLATE], shape, part["count"], part["sum"], sites)
                    sums[part[PLATE]].setdefault(shape, illum_core.PlateSum(part[PLATE], shape)).merge(incoming)
                else:
                    for q in sites:
                        quarantined[q[PLATE]].append(q)
                for plate in {s[PLATE] for s in sites}:
                    seen[plate] += sum(1 for s in sites if s[PLATE] == plate)
                    if seen[plate] == expected[plate]:
                        futures.append(pool.submit(finish_plate, plate))
            for future in futures:
                ledger.rows.extend(_illum_ledger_rows(future.result()))
    return _finish("illum", run, layout, ledger, {"plates": int(table[PLATE].nunique())})


def _progress_by_sites(progress: Progress, parts: Iterable[dict], *, total: int, description: str) -> Iterator[dict]:
    """Advance a per-site progress bar from partial-sum rows (each covers several sites)."""
    def expand() -> Iterator[tuple[dict | None]]:
        for part in parts:
            n = len(json.loads(part["sites"]))
            for i in range(n):
                yield part if i == n - 1 else None

    for item in progress(expand(), total=total, description=description):
        if item is not None:
            yield item


def _sorted_sites(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r[PLATE], r[WELL], int(r[SITE])))


def _illum_ledger_rows(rows: list[dict]) -> list[dict]:
    return [{PLATE: r[PLATE], WELL: r[WELL], SITE: int(r[SITE]), "status": r["status"], "reason": r["reason"]}
            for r in rows]


def _read_plate_json(folder: str, plate: str) -> dict | None:
    try:
        return json.loads(urls.read_bytes(illum_core.plate_json_url(folder, plate)))
    except (FileNotFoundError, ValueError):
        return None


def run_compression(run, index: ScreenIndex, *, progress: Progress | None = None) -> StageResult:
    """Stage 2: PNGs + a new index pointing at them; compression ratio and control histograms."""
    layout = RunLayout(run.data.output)
    spec = stage_spec("compress", run, index, correct=corrects_illumination(run, run.data.output, compressed=False))
    channels = list(index.channels)
    hist = {"controls": np.zeros((len(channels), 256), dtype=np.int64),
            "all": np.zeros((len(channels), 256), dtype=np.int64)}
    totals = {"raw_bytes": 0, "file_bytes": 0, "png_bytes": 0}
    controls = {(p, w, int(s)) for p, w, s, c in index.table[[*KEYS, IS_CONTROL]].itertuples(index=False) if c}

    def on_row(row: dict) -> None:
        receipt = json.loads(row["receipt"])
        h = np.asarray(receipt["histogram"], dtype=np.int64)
        hist["all"] += h
        if (row[PLATE], row[WELL], int(row[SITE])) in controls:
            hist["controls"] += h
        for k in totals:
            totals[k] += int(receipt[k])

    ledger = _run_site_stage("compress", index, spec, compute=run.compute, progress=progress, on_row=on_row)
    folder = layout.folder("compress")
    processed = {(r[PLATE], r[WELL], r[SITE]) for r in ledger.rows if r["status"] == PROCESSED}
    new = index.table[[(p, w, int(s)) in processed for p, w, s in index.table[list(KEYS)].itertuples(index=False)]]
    new = new.drop(columns=[c for c in new.columns if c.startswith(PLANE_PREFIXES)]).copy()
    for ch in channels:
        new[url_col(ch)] = [layout.png(p, w, int(s), ch) for p, w, s in new[list(KEYS)].itertuples(index=False)]
    if len(new):
        _write_compressed_index(new, channels, urls.join(folder, "sites.parquet"))
    rows = [{"group": g, "channel": ch, "bin": b, "count": int(hist[g][c, b])}
            for g in ("controls", "all") for c, ch in enumerate(channels) for b in range(256)]
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    urls.atomic_write_bytes(urls.join(folder, "histograms.parquet"), buf.getvalue())
    n_controls = int(sum(1 for k in processed if k in controls))
    group = "controls" if n_controls else "all"
    figures = {
        "ratio_vs_raw": round(totals["raw_bytes"] / totals["png_bytes"], 3) if totals["png_bytes"] else None,
        "ratio_vs_files": round(totals["file_bytes"] / totals["png_bytes"], 3) if totals["png_bytes"] else None,
        **totals, "control_sites": n_controls,
        # 8-bit intensity at the 1st / 50th / 99th percentile of each channel's histogram
        f"{group}_p1_p50_p99": {ch: compress_core.histogram_percentiles(hist[group][c]) for c, ch in enumerate(channels)},
    }
    return _finish("compress", run, layout, ledger, figures)


def _write_compressed_index(table: pd.DataFrame, channels: list[str], url: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table.reset_index(drop=True), preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[b"raycp.channels"] = json.dumps(channels).encode()
    meta[COMPRESSED_MARK] = b"compressed"
    buf = io.BytesIO()
    pq.write_table(arrow.replace_schema_metadata(meta), buf)
    urls.atomic_write_bytes(url, buf.getvalue())


def _check_channel(index: ScreenIndex, channel: str, what: str) -> None:
    if channel not in index.channels:
        raise ConfigError(f"{what} {channel!r} is not among the index's channels {list(index.channels)}",
                          fix=f"set {what} to one of them")


def run_nuclei(run, index: ScreenIndex, *, progress: Progress | None = None,
               compressed_input: bool = False) -> StageResult:
    """Stage 3: nuclei centres per site, imported (CellProfiler) or detected on the DNA channel."""
    pre = PreprocessConfig.of(run)
    layout = RunLayout(run.data.output)
    source = pre.nuclei.locations
    if source and not loc_core.is_template(source):
        ledger = _import_locations(run, index, source, progress=progress)
        return _finish("nuclei", run, layout, ledger, {"source": source})
    locate = "template" if source else "detect"
    if locate == "detect":
        _check_channel(index, pre.nuclei.channel, "nuclei.channel")
    correct = locate == "detect" and corrects_illumination(pre, run.data.output, compressed=compressed_input)
    spec = stage_spec("nuclei", run, index, correct=correct, locate=locate, compressed_input=compressed_input)
    ledger = _run_site_stage("nuclei", index, spec, compute=run.compute, progress=progress)
    return _finish("nuclei", run, layout, ledger, {"source": source or "detect"})


def _import_locations(run, index: ScreenIndex, source: str, *, progress: Progress | None) -> Ledger:
    """A whole-screen table (SQLite/Parquet/CSV) split into per-site files on the driver (no images)."""
    layout = RunLayout(run.data.output)
    urls.ensure_writable(layout.folder("nuclei"))
    locations = loc_core.read_table(source)
    groups = {k: g for k, g in locations.groupby([PLATE, WELL, SITE], sort=False)}
    ledger = Ledger("nuclei")

    def one(key: dict) -> dict:
        group = groups.get((key[PLATE], key[WELL], key[SITE]))
        try:
            if group is None or len(group) == 0:
                raise no_nuclei(key, f"in {source}")
            table = group.drop(columns=[PLATE, WELL, SITE]).reset_index(drop=True)
            write_nuclei(layout, key, table)
            receipt = json.dumps({"n_nuclei": int(len(table))}, sort_keys=True)
            urls.atomic_write_text(layout.receipt("nuclei", key[PLATE], key[WELL], key[SITE]), receipt)
            return {**key, "status": PROCESSED, "reason": "", "receipt": receipt}
        except Exception as exc:  # noqa: BLE001
            return {**key, "status": QUARANTINED, "reason": short_reason(exc), "receipt": ""}

    keys = [site_key(r) for r in index.table[list(KEYS)].to_dict("records")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        stream: Iterable = pool.map(one, keys)
        if progress is not None:
            stream = progress(stream, total=len(keys), description="nuclei: sites")
        for row in stream:
            ledger.rows.append(_ledger_row("nuclei", row))
    return ledger


def treatment_labels(index: ScreenIndex) -> dict[str, int]:
    """``Metadata_Label``: the position of each treatment in the sorted list of the index's treatments."""
    values = sorted({str(t) for t in index.table[TREATMENT] if t is not None and not (isinstance(t, float) and math.isnan(t))})
    return {t: i for i, t in enumerate(values)}


def run_crops(run, index: ScreenIndex, *, progress: Progress | None = None,
              compressed_input: bool = False) -> StageResult:
    """Stage 4: fused read → correct → 8 bits → locate → crop, one Parquet shard per site."""
    pre = PreprocessConfig.of(run)
    layout = RunLayout(run.data.output)
    if pre.crops.mask:
        _check_channel(index, pre.crops.mask_channel, "crops.mask_channel")
    locate = nuclei_source(pre, run.data.output)
    if locate == "detect":
        _check_channel(index, pre.nuclei.channel, "nuclei.channel")
        if pre.nuclei.channel == pre.crops.mask_channel and pre.crops.mask:
            raise ConfigError("nuclei.channel cannot be the mask channel", fix="set nuclei.channel=DNA")
    labels = treatment_labels(index)
    spec = stage_spec("crops", run, index, correct=corrects_illumination(pre, run.data.output, compressed=compressed_input),
                      compressed_input=compressed_input, locate=locate, labels=labels,
                      metadata_columns=metadata_columns(index.table))
    ledger = _run_site_stage("crops", index, spec, compute=run.compute, progress=progress)
    folder = layout.folder("crops")
    done = [r for r in _sorted_sites(ledger.rows) if r["status"] == PROCESSED]
    manifest = pd.DataFrame({
        PLATE: [r[PLATE] for r in done], WELL: [r[WELL] for r in done],
        SITE: np.array([r[SITE] for r in done], dtype=np.int64),
        "path": [RunLayout.crops_path(r[PLATE], r[WELL], r[SITE]) for r in done],
        "n_cells": np.array([r["n_cells"] for r in done], dtype=np.int64),
    })
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    urls.atomic_write_bytes(urls.join(folder, "manifest.parquet"), buf.getvalue())
    urls.atomic_write_text(urls.join(folder, "labels.json"), json.dumps(labels, indent=2, sort_keys=True))
    if pre.crops.export_deepprofiler and done:
        _concat_sc_metadata(layout, done)
    figures = {"cells": int(manifest["n_cells"].sum()),
               "border_cells": int(sum(r["n_border"] for r in done)), "locate": locate}
    return _finish("crops", run, layout, ledger, figures)


def _concat_sc_metadata(layout: RunLayout, done: list[dict]) -> None:
    """``sc-metadata.csv`` from the per-site parts, streamed through a local temp file."""
    base = layout.deepprofiler
    with tempfile.TemporaryDirectory() as tmpdir:
        local = os.path.join(tmpdir, "sc-metadata.csv")
        with open(local, "wb") as out:
            for i, r in enumerate(done):
                data = urls.read_bytes(urls.join(base, "_parts", r[PLATE], f"{r[WELL]}_{r[SITE]}.csv"))
                out.write(data if i == 0 else data.split(b"\n", 1)[1])
        urls.upload_file(local, urls.join(base, "sc-metadata.csv"))


def run_all(run, index: ScreenIndex, *, progress: Progress | None = None,
            on_stage: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """illum → compress → nuclei → crops; each stage resumes where it stopped."""
    results = []
    pre = PreprocessConfig.of(run)
    steps = ([run_illumination] if pre.illumination.enabled else []) + [run_compression, run_nuclei, run_crops]
    for step in steps:
        result = step(run, index, progress=progress)
        results.append(result)
        if on_stage is not None:
            on_stage(result)
    return results
