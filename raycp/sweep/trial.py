"""One trial of the subset sweep: train a CNN on one subset, then extract, profile and evaluate its
features over the whole run — the run's own stages, under the trial's folder.

A trial is a raycp run of its own (``data.output`` = ``<sweep>/trials/<trial_id>``) that reads
its base run's crops (``source_run``; a trial varying ``crops.*`` makes its own): Ray Train (:func:`raycp.train.trainer.build_trainer`,
its run named after the trial id, so a restored trial resumes its checkpoints), then the
registered ``extract``, ``profiles`` and ``evaluate`` stages (:func:`raycp.run.runner.run_pipeline`,
so a restored trial also skips the stages it finished). Tune is not imported here: the Tune
adapter (:mod:`raycp.sweep.tuning`) passes its ``TuneReportCallback``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

from raycp.io import urls
from raycp.layout import RunLayout


def own_crops(overrides: Mapping) -> bool:
    """Whether a trial makes its own crops: it varies a ``crops`` setting (e.g. ``crops.size``)."""
    return any(str(k).startswith("crops.") for k in overrides)


def trial_config(base, base_run: str, trial_dir: str, overrides: Mapping):
    """The trial's :class:`~raycp.run.config.PipelineConfig`: the base run's config with its own
    output, the base run's crops (its own when it varies a ``crops`` setting), the trained CNN as
    its one feature set, ``overrides`` (the trial's axes) applied. Raises
    :class:`~raycp.errors.ConfigError` for an invalid override."""
    from raycp.config import apply_overrides

    source = {} if own_crops(overrides) else {"source_run": base_run}
    return apply_overrides(base, {"data.output": trial_dir, **source, "train.enabled": True,
                                  "features": [{"kind": "trained"}], "profiles.umap": False, **overrides})


def _stages(*names: str):
    from raycp.stages import REGISTRY, make_registry

    return make_registry(*(REGISTRY[n] for n in names))


def _own_index(cfg, treatments: list[str], label: str) -> str:
    """The image stages into the trial's own folder, then its subset's training index over its own
    crops (the same treatments and every control cell): ``<trial>/subset.parquet``."""
    from raycp.io.outputs import write_parquet
    from raycp.run.runner import run_pipeline
    from raycp.sweep.subsets import subset_index
    from raycp.trainset.sources import crop_cells

    run_pipeline(cfg, registry=_stages("illum", "compress", "nuclei", "crops"), echo=lambda line: None)
    layout = RunLayout(cfg.data.output)
    url = urls.join(cfg.data.output, "subset.parquet")
    write_parquet(subset_index(crop_cells(layout.folder("crops"), label=label), treatments, source="run", label=label),
                  url)
    return url


def _trained(cfg, tcfg) -> dict | None:
    """The exported model's ``model.json`` when this trial's training finished (all its epochs)."""
    url = urls.join(RunLayout(cfg.data.output).model, "model.json")
    if not urls.exists(url):
        return None
    info = json.loads(urls.read_bytes(url))
    return info if int(info.get("epochs_trained", 0)) >= tcfg.optim.epochs else None


def _unseen_map(cfg, index, label: str) -> dict:
    """map_paper (sphered) over the queries of treatments the trial did not train on: what the
    model learnt that carries to treatments it never saw (NaN for ``all``: it saw every one)."""
    import numpy as np

    from raycp.io.outputs import read_parquet

    queries = read_parquet(urls.join(RunLayout(cfg.data.output).evaluation("cnn"), "sphered", "queries.parquet"))
    trained = set(index.loc[~index["Metadata_IsControl"].astype(bool), label].astype(str))
    if label not in queries.columns:
        return {"map_paper_unseen": None, "queries_unseen": 0}
    rows = queries[queries["is_query_map"] & ~queries[label].astype(str).isin(trained)]
    return {"map_paper_unseen": float(np.mean(rows["ap_paper"])) if len(rows) else None, "queries_unseen": int(len(rows))}


def run_trial(base, base_run: str, trial_dir: str, trial_id: str, index_url: str, overrides: Mapping, *,
              treatments: list[str] | None = None, callbacks: list | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Train on ``index_url`` (a subset's training index), then extract → profiles → evaluate. A
    trial that varies a ``crops`` setting first runs the image stages into its own folder and
    trains on its own crops of the same ``treatments`` (and every control cell).

    Returns the trial's figures: the last epoch's training metrics, the trained classes and cells,
    and the evaluation of the CNN's features without correction and sphered at
    ``profiles.sphere_lambda`` (``map_paper``, ``map``, ``folds_of_enrichment``, …)."""
    from raycp.config import apply_overrides
    from raycp.io.outputs import read_parquet
    from raycp.run.runner import run_pipeline
    from raycp.train import trainer

    cfg = trial_config(base, base_run, trial_dir, overrides)
    if own_crops(overrides):
        index_url = _own_index(cfg, list(treatments or []), cfg.train.label)
    tcfg = apply_overrides(cfg.train_config(), {"crops": index_url, "name": trial_id})
    info = _trained(cfg, tcfg)
    if info is None:
        prep = trainer.prepare(tcfg)
        s = prep.summary()
        echo(f"trial {trial_id}: {s['crops']} crops, {s['classes']} classes, {tcfg.optim.epochs} epoch(s)")
        result = trainer.run_trainer(trainer.build_trainer(
            tcfg, trainer.default_run_config(tcfg, callbacks=callbacks), prep=prep))
        trainer.finish(tcfg, prep, result)
        info = _trained(cfg, tcfg) or {}
    run_pipeline(cfg, registry=_stages("extract", "profiles", "evaluate"), echo=echo)
    table = read_parquet(RunLayout(trial_dir).comparison)
    none = table[table["correction"] == "none"].iloc[0]
    sphered = table[table["correction"] != "none"].iloc[0]
    final = info.get("final_metrics") or {}
    unseen = _unseen_map(cfg, read_parquet(index_url), tcfg.label)
    split = read_parquet(urls.join(RunLayout(trial_dir).folder("train"), "split.parquet"))
    out = {"classes": int(info.get("num_classes", 0)), "cells_trained": int((split["Metadata_Split"] == "train").sum()),
           "epochs": int(info.get("epochs_trained", 0)),
           **{k: final.get(k) for k in ("train_loss", "train_macro_f1", "val_loss", "val_accuracy", "val_macro_f1")},
           "map_paper": float(sphered["map_paper"]), "map": float(sphered["map"]),
           "folds_of_enrichment": float(sphered["folds_of_enrichment"]),
           "map_paper_none": float(none["map_paper"]), "map_none": float(none["map"]),
           "sphere_lambda": float(cfg.profiles.sphere_lambda), "treatments_evaluated": int(sphered["treatments"]),
           **unseen}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
