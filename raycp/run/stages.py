"""The stages of ``raycp run``, one function each: call the stage's library API, return its summary.

Every stage reads what earlier stages wrote under the run's output URL and writes under its own
folder (:data:`FOLDERS`); the runner adds ``status.json`` and the resolved config. A summary holds
the stage's accounting (``total`` = ``processed`` + ``quarantined``, with ``reasons``) and its
figures. The scientific steps are the paper's (Methods): aggregation (site medians → well means),
sphering on control wells, the evaluation (map_paper, mAP, folds of enrichment) and the treatment
effect.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from raycp.errors import InputError
from raycp.io import urls
from raycp.io.outputs import jsonable, read_parquet, write_json, write_parquet
from raycp.ledger import Ledger

FOLDERS = {"index": "index", "illum": "illum", "compress": "compressed", "nuclei": "nuclei", "crops": "crops",
           "train": "train", "extract": "features", "profiles": "profiles", "evaluate": "evaluate",
           "effect": "effect", "report": "report"}


@dataclass
class Context:
    """What a stage needs: the run config, the progress wrapper, a printer, and earlier summaries."""

    cfg: object  # PipelineConfig
    progress: Callable | None = None
    echo: Callable[[str], None] = print
    summaries: dict = field(default_factory=dict)

    @property
    def out(self) -> str:
        return self.cfg.data.output

    def folder(self, stage: str) -> str:
        return urls.join(self.out, FOLDERS[stage])


# -- small writers --------------------------------------------------------------------------------

def save_png(draw: Callable[[Path], Path], url: str) -> None:
    """Run a plotting function that writes a local PNG and store the bytes at ``url``."""
    with tempfile.TemporaryDirectory(prefix="raycp-plot-") as tmp:
        path = draw(Path(tmp) / "plot.png")
        urls.atomic_write_bytes(url, Path(path).read_bytes())


def _summary(ledger_summary: dict, **figures) -> dict:
    return {**ledger_summary, **figures}


def _sum_summaries(parts: dict[str, dict]) -> dict:
    """One accounting over several sub-runs (feature sets): totals add, reasons are prefixed."""
    total = {"total": 0, "processed": 0, "quarantined": 0, "reasons": {}}
    for name, s in parts.items():
        for k in ("total", "processed", "quarantined"):
            total[k] += int(s.get(k, 0))
        for reason, n in (s.get("reasons") or {}).items():
            total["reasons"][f"{name}: {reason}"] = n
    return total


# -- index ----------------------------------------------------------------------------------------

def _site_missing(row: dict, cols: list[str]) -> str:
    for c in cols:
        url = row[c]
        if not isinstance(url, str) or not url or not urls.exists(url):
            return f"missing image {url} ({c})"
    return ""


def run_index(ctx: Context) -> dict:
    """Read and validate the screen index; every site whose images are all present is processed,
    the others quarantined naming the missing file. Writes a snapshot and the per-plate layout."""
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
    folder = ctx.folder("index")
    ledger.write(folder)
    write_parquet(table, urls.join(folder, "screen.parquet"))
    ctrl = table[IS_CONTROL].astype(bool) if IS_CONTROL in table.columns else pd.Series(False, index=table.index)
    figures = {"plates": int(table[PLATE].nunique()), "wells": int(table.groupby([PLATE, WELL]).ngroups),
               "sites": int(len(table)), "compressed_index": bool(compressed),
               "treatments": int(table.loc[~ctrl, TREATMENT].nunique()) if TREATMENT in table.columns else 0,
               "control_wells": int(table.loc[ctrl].groupby([PLATE, WELL]).ngroups)}
    if not figures["control_wells"]:
        raise InputError(f"{cfg.data.index}: no control wells (Metadata_IsControl)",
                         fix="mark the negative-control wells: sphering is fitted on them")
    return _summary(ledger.summary(), **figures)


# -- image stages ---------------------------------------------------------------------------------

def _preprocess(step: str):
    def run(ctx: Context) -> dict:
        from raycp.preprocess import pipeline

        index, compressed = pipeline.load_index(ctx.cfg.data.index, channels=list(ctx.cfg.data.channels))
        if compressed and step in ("illum", "compress"):
            raise InputError(f"{ctx.cfg.data.index}: is a compressed index already",
                             fix="give raycp run the original index (16-bit TIFFs)")
        fn = {"illum": pipeline.run_illumination, "compress": pipeline.run_compression,
              "nuclei": pipeline.run_nuclei, "crops": pipeline.run_crops}[step]
        kwargs = {"compressed_input": compressed} if step in ("nuclei", "crops") else {}
        if step == "illum" and not ctx.cfg.illumination.enabled:
            return {"total": 0, "processed": 0, "quarantined": 0, "reasons": {}, "skipped": "illumination.enabled=false"}
        result = fn(ctx.cfg, index, progress=ctx.progress, **kwargs)
        return jsonable(result.summary)

    run.__name__ = f"run_{step}"
    run.__doc__ = f"The image stage {step!r} (:mod:`raycp.preprocess.pipeline`); resumes per site."
    return run


run_illum, run_compress, run_nuclei, run_crops = (_preprocess(s) for s in ("illum", "compress", "nuclei", "crops"))


# -- training -------------------------------------------------------------------------------------

def run_train(ctx: Context) -> dict:
    """Weakly supervised training (paper Methods): resumes from the latest checkpoint."""
    if not ctx.cfg.train.enabled:
        return {"total": 0, "processed": 0, "quarantined": 0, "reasons": {}, "skipped": "train.enabled=false"}
    from raycp.train import trainer

    cfg = ctx.cfg.train_config()
    prep = trainer.prepare(cfg)
    s = prep.summary()
    ctx.echo(f"  {s['crops']} crops ({s['train']} train / {s['val']} val, {cfg.split.strategy}) · {s['classes']} "
             f"classes · balanced epoch {s['epoch_samples']} · {cfg.optim.epochs} epochs")
    with _EpochWatcher(cfg, ctx.echo):
        result = trainer.fit(cfg)
    last = result.last
    val = last.get("val") or {}
    return jsonable({"total": s["crops"], "processed": s["crops"], "quarantined": 0, "reasons": {},
                     "epochs": len(result.history), "classes": len(result.classes),
                     "train_macro_f1": last.get("train", {}).get("macro_f1"), "val_macro_f1": val.get("macro_f1"),
                     "val_accuracy": val.get("accuracy"), "val_loss": val.get("loss"),
                     "model": result.model_dir, "reports": result.reports, "history": result.history})


class _EpochWatcher:
    """Prints each checkpointed epoch while Ray Train runs (the workers' own output stays quiet)."""

    def __init__(self, cfg, echo: Callable[[str], None], interval: float = 2.0) -> None:
        import threading

        self.cfg, self.echo, self.interval = cfg, echo, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raycp-epochs", daemon=True)

    def _watch(self) -> None:
        import time

        from raycp.train import trainer

        seen = {e for e, _ in trainer.checkpoint_dirs(self.cfg)}
        start = time.perf_counter()
        while not self._stop.wait(self.interval):
            try:
                epochs = {e for e, _ in trainer.checkpoint_dirs(self.cfg)}
            except OSError:
                continue
            for e in sorted(epochs - seen):
                self.echo(f"  epoch {e + 1}/{self.cfg.optim.epochs} checkpointed ({time.perf_counter() - start:.0f} s)")
            seen |= epochs

    def __enter__(self) -> _EpochWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- extraction -----------------------------------------------------------------------------------

def run_extract(ctx: Context) -> dict:
    """Every feature set over every site (:func:`raycp.extract.pipeline.run_extract`); each resumes per site."""
    from raycp.extract.pipeline import run_extract as extract

    parts, figures = {}, {}
    for model in ctx.cfg.features:
        ctx.echo(f"  feature set {model.folder_name} ({model.kind})")
        result = extract(ctx.cfg.extract_config(model), progress=ctx.progress)
        parts[model.folder_name] = result.ledger.summary()
        f = result.figures
        figures[model.folder_name] = {k: f.get(k) for k in ("cells", "features", "sites_resumed", "cells_per_s",
                                                            "device", "forward_calls", "pipeline_s")}
        ctx.echo(f"    {f.get('cells')} cells × {f.get('features')} features · {f.get('cells_per_s')} cells/s")
    return jsonable({**_sum_summaries(parts), "feature_sets": figures, "per_set": parts})


# -- profiles -------------------------------------------------------------------------------------

def well_annotations(index_table: pd.DataFrame) -> pd.DataFrame:
    """One row per well: the index's Metadata_ columns that are constant within a well."""
    from raycp.io.index import KEYS, PLATE, WELL

    meta = [c for c in index_table.columns if c.startswith("Metadata_") and c not in KEYS and not c.startswith("Metadata_Frame")]
    wells = index_table[[PLATE, WELL, *meta]].drop_duplicates([PLATE, WELL]).reset_index(drop=True)
    return wells


def run_profiles(ctx: Context) -> dict:
    """Site medians (written by extraction) → well means (paper: sites → well by mean), annotated
    with the index's well metadata; one ``wells.parquet`` per feature set."""
    from raycp.io.index import PLATE, WELL
    from raycp.preprocess.pipeline import load_index
    from raycp.profiles.aggregate import aggregate_wells

    index, _ = load_index(ctx.cfg.data.index, channels=list(ctx.cfg.data.channels))
    annotations = well_annotations(index.table)
    all_wells = annotations[[PLATE, WELL]]
    parts, figures = {}, {}
    for model in ctx.cfg.features:
        name = model.folder_name
        sites = read_parquet(urls.join(ctx.out, "features", name, "sites.parquet"))
        feats = [c for c in sites.columns if not c.startswith("Metadata_")]
        wells = aggregate_wells(sites, [PLATE, WELL], feats)
        cells = sites.groupby([PLATE, WELL])["Metadata_n_cells"].sum().rename("Metadata_n_cells").reset_index()
        keep = [c for c in annotations.columns if c not in wells.columns or c in (PLATE, WELL)]
        wells = wells.merge(cells, on=[PLATE, WELL]).merge(annotations[keep], on=[PLATE, WELL], how="left")
        wells = wells[[c for c in wells.columns if c.startswith("Metadata_")] + feats]
        standardized = name in ctx.cfg.profiles.standardize
        if standardized:
            wells = _standardize(ctx, wells, feats)
        write_parquet(wells, urls.join(ctx.folder("profiles"), name, "wells.parquet"))
        got = set(map(tuple, wells[[PLATE, WELL]].to_numpy()))
        ledger = Ledger(f"profiles/{name}")
        for key in all_wells.to_dict("records"):
            (ledger.processed(key) if (key[PLATE], key[WELL]) in got
             else ledger.quarantined(key, "no site of this well has features (all quarantined upstream)"))
        ledger.write(urls.join(ctx.folder("profiles"), name))
        parts[name] = ledger.summary()
        figures[name] = {"wells": len(wells), "features": len(feats), "sites": len(sites), "standardized": standardized,
                         "cells": int(sites["Metadata_n_cells"].sum()),
                         "median_cells_per_well": float(wells["Metadata_n_cells"].median())}
    return jsonable({**_sum_summaries(parts), "feature_sets": figures})


def _standardize(ctx: Context, wells: pd.DataFrame, feats: list[str]) -> pd.DataFrame:
    """z-scores against the screen's control wells (:mod:`raycp.profiles.normalize`): a change of
    units, not a batch correction (one mean and sd for all plates), so "no correction" stays so."""
    from raycp.evaluate import control_mask_from_query
    from raycp.profiles.io import feature_matrix
    from raycp.profiles.normalize import standardize_to_controls

    ctrl = control_mask_from_query(wells, ctx.cfg.profiles.control_query)
    Z = standardize_to_controls(feature_matrix(wells, feats), ctrl)
    return pd.concat([wells.drop(columns=feats), pd.DataFrame(Z, columns=feats, index=wells.index)], axis=1)


def _wells(ctx: Context, name: str) -> pd.DataFrame:
    return read_parquet(urls.join(ctx.folder("profiles"), name, "wells.parquet"))


def _scope(ctx: Context) -> str | None:
    return "Metadata_Plate" if ctx.cfg.profiles.sphere_scope == "plate" else None


# -- evaluation -----------------------------------------------------------------------------------

def _evaluate_one(ctx: Context, name: str, wells: pd.DataFrame, folder: str) -> list[dict]:
    from raycp.evaluate import control_mask_from_query, evaluate, sweep_lambdas
    from raycp.evaluate.plots import plot_map_vs_lambda, plot_pr_curve, plot_umaps
    from raycp.profiles.io import feature_matrix_na
    from raycp.profiles.sphere import sphere

    p = ctx.cfg.profiles
    common = dict(treatment_cols=p.treatment_cols, annotation_col=p.annotation_col, sep=p.annotation_sep,
                  sphere_scope_col=_scope(ctx), na_cutoff=p.na_cutoff, source=f"{name} wells")
    rows = []
    for label, lam in (("none", None), ("sphered", p.sphere_lambda)):
        run = evaluate(wells, control_query=p.control_query, sphere_lambda=lam, **common)
        s = run.evaluation.summary
        rows.append({"feature_set": name, "correction": label if lam is None else f"sphered λ={lam:g}",
                     "map_paper": s["map_paper"], "map": s["map"], "folds_of_enrichment": s["folds_of_enrichment"],
                     "significant_queries": s["n_queries_foe_significant_bh"], "queries": s["n_queries_foe"],
                     "treatments": s["n_treatments"]})
        sub = urls.join(folder, label)
        write_parquet(run.evaluation.queries, urls.join(sub, "queries.parquet"))
        write_parquet(run.evaluation.pr_curve, urls.join(sub, "pr_curve.parquet"))
        write_json(urls.join(sub, "metrics.json"), {**s, "accounting": run.accounting})
        save_png(lambda path, c=run.evaluation.pr_curve, lb=label: plot_pr_curve(c, path, label=f"{name} · {lb}"),
                 urls.join(sub, "pr_curve.png"))
    sweep = sweep_lambdas(wells, p.treatment_cols, p.annotation_col, p.control_query, p.lambdas,
                          sep=p.annotation_sep, sphere_scope_col=_scope(ctx), na_cutoff=p.na_cutoff,
                          source=f"{name} wells")
    sweep.insert(0, "feature_set", name)
    write_parquet(sweep, urls.join(folder, "lambda_curve.parquet"))
    save_png(lambda path: plot_map_vs_lambda(sweep, path), urls.join(folder, "lambda_curve.png"))
    if p.umap:
        fm = feature_matrix_na(wells, na_cutoff=p.na_cutoff, source=f"{name} wells")
        X, ok = fm.X, fm.ok
        ctrl = control_mask_from_query(wells, p.control_query)
        groups = None if _scope(ctx) is None else wells[_scope(ctx)].to_numpy()[ok]
        after = sphere(X[ok], ctrl[ok], p.sphere_lambda, groups)
        save_png(lambda path: plot_umaps(X[ok], after, wells["Metadata_Plate"].to_numpy()[ok], ctrl[ok], path),
                 urls.join(folder, "umap.png"))
    return rows


def run_evaluate(ctx: Context) -> dict:
    """The paper's evaluation of every feature set without correction and sphered (λ from the
    config), the λ curve (Fig. 6B) and UMAPs (Fig. 6A/C); ``comparison.parquet`` holds the table."""
    rows = []
    for model in ctx.cfg.features:
        name = model.folder_name
        ctx.echo(f"  evaluating {name}")
        rows += _evaluate_one(ctx, name, _wells(ctx, name), urls.join(ctx.folder("evaluate"), name))
    table = pd.DataFrame(rows)
    write_parquet(table, urls.join(ctx.folder("evaluate"), "comparison.parquet"))
    n = len(ctx.cfg.features)
    return jsonable({"total": n, "processed": n, "quarantined": 0, "reasons": {}, "comparison": rows})


# -- treatment effect -----------------------------------------------------------------------------

def effect_feature_set(cfg) -> str:
    names = [f.folder_name for f in cfg.features]
    want = cfg.profiles.effect_features
    return want if want in names else names[0]


def run_effect(ctx: Context) -> dict:
    """Treatment effect (paper Methods): per plate, distance of each treated well to the median
    control well, z-scored on the control wells' distances, averaged per treatment; on sphered well
    profiles of one feature set. Writes the ranking and the weakest/median/strongest subsets."""
    from raycp.evaluate import control_mask_from_query
    from raycp.profiles.effect import effect_of_wells, select_subsets

    p = ctx.cfg.profiles
    name = effect_feature_set(ctx.cfg)
    wells = _wells(ctx, name)
    ctrl = control_mask_from_query(wells, p.control_query)
    res = effect_of_wells(wells, p.treatment_cols, ctrl, sphere_lambda=p.sphere_lambda, sphere_scope_col=_scope(ctx),
                          na_cutoff=p.na_cutoff, source=f"{name} wells")
    dropped = res.accounting["wells_dropped_nan"]
    folder = ctx.folder("effect")
    write_parquet(res.treatments, urls.join(folder, "effect.parquet"))
    subsets = select_subsets(res.treatments, p.effect_fraction)
    for sub, table in subsets.items():
        write_parquet(table, urls.join(folder, "subsets", f"{sub}.parquet"))
    n = int(len(wells))
    return jsonable({"total": n, "processed": n - dropped, "quarantined": dropped,
                     "reasons": {"well profile has NaN features": dropped} if dropped else {},
                     "feature_set": name, "treatments": len(res.treatments), **res.accounting,
                     "subset_sizes": {k: len(v) for k, v in subsets.items()}})
