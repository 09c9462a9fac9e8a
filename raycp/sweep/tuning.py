"""Ray Tune adapter of the λ sweep: one trial per (feature set, λ), on the cluster, resumable.

The trials share each feature set's wells and control eigendecomposition through
``tune.with_parameters`` (put in the object store once). The experiment lives under the sweep's
output URL (local or ``s3://``, through raycp's own filesystem: :func:`raycp.runtime.train_storage`),
so ``--resume`` restores an interrupted sweep with ``Tuner.restore`` and runs only the trials that
did not finish. The only module of raycp that imports Ray Tune."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

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


def _trial(config: dict, data: dict, spec: EvaluationSpec) -> None:
    from ray import tune

    wells, eigen = data[config["feature_set"]]
    metrics = trial_metrics(wells, spec, config["lam"], eigen, source=f"{config['feature_set']} wells")
    tune.report({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()})


def _finished(experiment: str) -> set[tuple[str, str]]:
    """(feature_set, λ) of the trials an earlier call finished: their ``result.json`` has a row."""
    fsys, root = urls.filesystem(experiment)
    done = set()
    for path in fsys.glob(f"{root}/*/result.json"):
        with fsys.open(path, "r") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
        if lines:
            row = json.loads(lines[-1])
            done.add((row["config"]["feature_set"], str(row["config"]["lam"])))
    return done


def run_lambda_sweep(sets: dict[str, pd.DataFrame], spec: EvaluationSpec, lambdas: list[float], output: str, *,
                     resume: bool = False, echo: Callable[[str], None] = print) -> LambdaSweep:
    """Run (or with ``resume`` restore and finish) the sweep's trials on the connected cluster.

    Raises :class:`ConfigError` when ``output`` already holds a sweep and ``resume`` is off, or
    holds none and ``resume`` is on."""
    import os

    # Tune's console tables and TensorBoard hints would interleave with raycp's lines: the legacy
    # reporter at verbose=0 prints nothing (results are in the experiment folder)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    from raycp import runtime

    runtime.connection()
    storage_path, fs = runtime.train_storage(output)
    experiment = urls.join(output, EXPERIMENT)
    path = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
    exists = tune.Tuner.can_restore(path, storage_filesystem=fs)
    if exists and not resume:
        raise ConfigError(f"{experiment} already holds a λ sweep",
                          fix="add --resume to finish it (a finished one restores at once), or give another --output "
                              "(or delete that folder) for a new sweep")
    if resume and not exists:
        raise ConfigError(f"{experiment} holds no λ sweep to resume", fix="run it without --resume first")
    before = _finished(experiment) if resume else set()
    echo(f"sweep lambda: control eigendecomposition of {len(sets)} feature set(s)")
    data = {name: (wells, control_eigens(wells, spec, source=f"{name} wells")) for name, wells in sets.items()}
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
    return LambdaSweep(curve=curve, failed=failed, restored=len(before), total=len(grid))
