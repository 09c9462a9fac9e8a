"""Ray Tune adapter of the λ sweep: one trial per (feature set, λ), on the cluster, resumable.

The trials share each feature set's wells and control eigendecomposition through
``tune.with_parameters`` (put in the object store once). The experiment lives under the sweep's
output URL (local or ``s3://``, through raycp's own filesystem: :func:`raycp.runtime.train_storage`),
so ``--resume`` restores an interrupted sweep with ``Tuner.restore`` and runs only the trials that
did not finish. The only module of raycp that imports Ray Tune."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

# Tune's console tables and TensorBoard hints would interleave with raycp's lines: the legacy
# reporter at verbose=0 prints nothing (results are in the experiment folder)
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from raycp.errors import ConfigError
from raycp.io import urls
from raycp.sweep.lambdas import NONE, EvaluationSpec, control_eigens, trial_metrics

EXPERIMENT = "lambda"


@dataclass
class LambdaSweep:
    """``curve``: one row per trial (feature_set, sphere_lambda (NaN: none), metrics);
    ``failed``: (feature_set, λ, reason) of trials that errored; ``restored``: trials that had
    finished before this call (a resumed sweep)."""

    curve: pd.DataFrame
    failed: list[dict] = field(default_factory=list)
    restored: int = 0
    total: int = 0


def check_experiment(output: str, name: str, resume: bool, what: str) -> None:
    """Whether ``<output>/<name>`` may be started (it holds no Tune experiment) or resumed (it
    holds one). Raises :class:`ConfigError` otherwise; callers check before writing anything."""
    from raycp import runtime

    storage_path, fs = runtime.train_storage(output)
    experiment = urls.join(output, name)
    exists = tune.Tuner.can_restore(f"{storage_path.rstrip('/')}/{name}", storage_filesystem=fs)
    if exists and not resume:
        raise ConfigError(f"{experiment} already holds {what}",
                          fix="add --resume to finish it (a finished one restores at once), or give another --output "
                              "(or delete that folder) for a new sweep")
    if resume and not exists:
        raise ConfigError(f"{experiment} holds no {what.split(' ', 1)[-1]} to resume", fix="run it without --resume first")


def _trial(config: dict, data: dict, spec: EvaluationSpec) -> None:
    wells, eigen = data[config["feature_set"]]
    metrics = trial_metrics(wells, spec, config["lam"], eigen, source=f"{config['feature_set']} wells")
    tune.report({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()})


def _last_results(experiment: str) -> list[dict]:
    """The last result row of every trial of the experiment that reported one (its ``result.json``)."""
    fsys, root = urls.filesystem(experiment)
    rows = []
    for path in fsys.glob(f"{root}/*/result.json"):
        with fsys.open(path, "r") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        if lines:
            rows.append(json.loads(lines[-1]))
    return rows


def run_lambda_sweep(sets: dict[str, pd.DataFrame], spec: EvaluationSpec, lambdas: list[float], output: str, *,
                     resume: bool = False, echo: Callable[[str], None] = print) -> LambdaSweep:
    """Run (or with ``resume`` restore and finish) the sweep's trials on the connected cluster.

    The caller has checked ``output`` first (:func:`check_experiment`: a new sweep needs an empty
    folder, a resumed one its experiment)."""
    from raycp import runtime

    echo(f"sweep lambda: control eigendecomposition of {len(sets)} feature set(s)")
    # before Ray: a column the wells lack is a one-line error with no cluster started
    data = {name: (wells, control_eigens(wells, spec, source=f"{name} wells")) for name, wells in sets.items()}
    storage_path, fs = runtime.train_storage(output)
    experiment = urls.join(output, EXPERIMENT)
    path = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
    restored = len(_last_results(experiment)) if resume else 0  # trials that finished before this call
    runtime.connection()
    trainable = tune.with_resources(tune.with_parameters(_trial, data=data, spec=spec), {"cpu": 1})
    if resume:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        cpus = max(1, int(runtime.cluster_cpus()))
        tuner = tune.Tuner(
            trainable,
            param_space={"feature_set": tune.grid_search(list(sets)),
                         "lam": tune.grid_search([NONE, *[float(v) for v in lambdas]])},
            tune_config=tune.TuneConfig(max_concurrent_trials=cpus),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_path, storage_filesystem=fs, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    grid = tuner.fit()
    rows, failed = [], []
    for result in grid:
        cfg = result.config or {}
        if result.error is not None:
            failed.append({"feature_set": cfg.get("feature_set"), "lambda": cfg.get("lam"),
                           "reason": " ".join(str(result.error).split())[:300]})
            continue
        m = dict(result.metrics or {})
        rows.append({"feature_set": cfg["feature_set"],
                     "sphere_lambda": math.nan if cfg["lam"] == NONE else float(cfg["lam"]),
                     **{k: (math.nan if m.get(k) is None else m[k]) for k in
                        ("map_paper", "map", "folds_of_enrichment", "n_queries_map", "n_queries_foe", "n_treatments")}})
    curve = pd.DataFrame(rows)
    if len(curve):
        curve["_none"] = curve["sphere_lambda"].isna()
        curve = (curve.sort_values(["feature_set", "_none", "sphere_lambda"], ascending=[True, False, False])
                 .drop(columns="_none").reset_index(drop=True))
    return LambdaSweep(curve=curve, failed=failed, restored=restored, total=len(grid))


# ------------------------------------------------------------------------- training subsets

SUBSETS_EXPERIMENT = "tune"


@dataclass(frozen=True)
class SubsetPlan:
    """What every subset trial shares (JSON-able; passed to the trials once): the base run's
    resolved config (with the overrides every trial gets) and folder, the sweep's folder, each
    subset's training index and treatments."""

    base: dict
    base_run: str
    output: str
    indices: dict
    treatments: dict


@dataclass
class SubsetSweep:
    """``rows``: one per trial (its config, state and figures); ``restored``: trials an earlier call
    finished."""

    rows: list[dict]
    restored: int = 0
    total: int = 0


def trial_folder(output: str, trial_id: str) -> str:
    """``<sweep>/trials/<trial_id>``: a trial's own run folder (named after its Tune trial id)."""
    return urls.join(output, "trials", trial_id)


def _subset_trial(config: dict, plan: SubsetPlan) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from raycp.run.config import PipelineConfig
    from raycp.sweep.trial import run_trial

    trial_id = tune.get_context().get_trial_id()
    figures = run_trial(PipelineConfig.model_validate(plan.base), plan.base_run, trial_folder(plan.output, trial_id),
                        trial_id, plan.indices[config["subset"]], dict(config.get("overrides") or {}),
                        treatments=plan.treatments[config["subset"]], callbacks=[TuneReportCallback()],
                        echo=lambda line: None)
    tune.report({**figures, "evaluated": True})


def _param_space(subsets: list[str], axes: list, search: str) -> dict:
    space: dict = {"subset": tune.grid_search(list(subsets)), "overrides": {}}
    for axis in axes:
        if axis.distribution == "log":
            space["overrides"][axis.key] = tune.loguniform(axis.low, axis.high)
        elif axis.distribution == "uniform":
            space["overrides"][axis.key] = tune.uniform(axis.low, axis.high)
        elif search == "random":
            space["overrides"][axis.key] = tune.choice(list(axis.values))
        else:
            space["overrides"][axis.key] = tune.grid_search(list(axis.values))
    return space


class _TrialLines(tune.Callback):
    """One line per trial as it starts and ends (stdout)."""

    @staticmethod
    def _name(trial) -> str:
        from raycp.sweep.subsets import trial_label

        return f"trial {trial.trial_id} ({trial_label(trial.config.get('subset'), trial.config.get('overrides') or {})})"

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"  {self._name(trial)}: training", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        what = (f"map_paper {result['map_paper']:.4f}" if result.get("evaluated") and result.get("map_paper") is not None
                else f"stopped after {result.get('training_iteration', 0)} report(s)")
        print(f"  {self._name(trial)}: {what}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  {self._name(trial)}: failed (its reason is in subsets.parquet)", flush=True)


class _PerSubsetASHA(FIFOScheduler):
    """ASHA within each subset: a trial is compared only with trials of its own subset (different
    subsets are different classification tasks; their losses are not comparable)."""

    def __init__(self, settings: dict):
        super().__init__()
        self._settings = dict(settings)
        self._by_subset: dict = {}

    def _of(self, trial):
        subset = trial.config.get("subset")
        if subset not in self._by_subset:
            a = self._settings
            self._by_subset[subset] = tune.schedulers.ASHAScheduler(
                time_attr="training_iteration", metric=a["metric"], mode=a["mode"], max_t=a["max_t"],
                grace_period=a["grace_period"], reduction_factor=a["reduction_factor"])
        return self._by_subset[subset]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{k}: {v.debug_string()}" for k, v in self._by_subset.items())


def run_subset_sweep(plan: SubsetPlan, subsets: list[str], axes: list, *, search: str = "grid", num_samples: int = 1,
                     seed: int = 0, asha: dict | None = None, max_concurrent: int = 1, trial_cpus: float = 0.0,
                     resume: bool = False, echo: Callable[[str], None] = print) -> SubsetSweep:
    """Run (or with ``resume`` restore and finish) the subset sweep's trials on the connected
    cluster: one function trainable per trial that drives a Ray Train run (Ray 2.60 rejects a
    Train V2 trainer passed to ``Tuner``), reporting each epoch through ``TuneReportCallback`` and
    the evaluation at the end. ``asha``: ``{"metric", "mode", "max_t", "grace_period",
    "reduction_factor"}`` stops weak trials early (on epochs; the evaluation is the last report).
    A trial's own process reserves ``trial_cpus`` CPUs (0: only memory) so that every CPU stays
    for its Train workers and its extraction's tasks.

    The caller has checked ``output`` first (:func:`check_experiment`: a new sweep needs an empty
    folder, a resumed one its experiment)."""
    from raycp import runtime

    storage_path, fs = runtime.train_storage(plan.output)
    experiment = urls.join(plan.output, SUBSETS_EXPERIMENT)
    path = f"{storage_path.rstrip('/')}/{SUBSETS_EXPERIMENT}"
    runtime.connection()
    restored = sum(1 for r in _last_results(experiment) if r.get("evaluated")) if resume else 0
    resources = {"cpu": trial_cpus, "memory": 256 * 1024**2}
    trainable = tune.with_resources(tune.with_parameters(_subset_trial, plan=plan), resources)
    if resume:  # the experiment's scheduler, search algorithm and callbacks come back with it
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        scheduler = _PerSubsetASHA(asha) if asha else None
        # a search algorithm of its own is not limited by TuneConfig.max_concurrent_trials: it limits itself
        search_alg = (tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
                      if search == "random" else None)
        tuner = tune.Tuner(
            trainable, param_space=_param_space(subsets, axes, search),
            tune_config=tune.TuneConfig(max_concurrent_trials=None if search_alg else max_concurrent,
                                        scheduler=scheduler, search_alg=search_alg, num_samples=num_samples),
            run_config=tune.RunConfig(name=SUBSETS_EXPERIMENT, storage_path=storage_path, storage_filesystem=fs,
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[_TrialLines()]),
        )
    echo(f"sweep subsets: trials on the cluster, {max_concurrent} at a time")
    grid = tuner.fit()
    rows = []
    for result in grid:
        cfg = result.config or {}
        m = dict(result.metrics or {})
        found = re.search(r"([0-9a-f]{5}_\d{5})", (result.path or "").rstrip("/").rsplit("/", 1)[-1])
        trial_id = m.get("trial_id") or (found.group(1) if found else None)
        state = "failed" if result.error is not None else ("done" if m.get("evaluated") else "stopped")
        row = {"trial_id": trial_id, "subset": cfg.get("subset"), **dict(cfg.get("overrides") or {}), "state": state,
               "epochs_reported": m.get("training_iteration"),
               "reason": " ".join(str(result.error).split())[:300] if result.error is not None else None}
        for key in ("classes", "cells_trained", "epochs", "train_loss", "val_loss", "val_accuracy", "val_macro_f1",
                    "map_paper", "map", "folds_of_enrichment", "map_paper_none", "map_none", "map_paper_unseen",
                    "queries_unseen", "sphere_lambda", "treatments_evaluated"):
            row[key] = m.get(key) if state == "done" or key.startswith(("train_", "val_")) else None
        rows.append(row)
    return SubsetSweep(rows=rows, restored=restored, total=len(grid))
