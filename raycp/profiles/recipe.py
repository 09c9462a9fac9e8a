"""Profile recipes: a YAML list of operations (:mod:`raycp.profiles.ops`) run in order on a wells
table, each step's output written as Parquet with the step's parameters and decisions.

A recipe names its negative-control query once (``negcon``); a step's ``samples: negcon`` means
those rows, ``samples: all`` every row, anything else is a pandas query. The JUMP chains of
broadinstitute/jump-profiling-recipe ship as presets (``raycp/profiles/recipes/*.yaml``):

* ``jump_compound``: var → mad (negcon) → int → featselect → harmony
  (``profiles_var_mad_int_featselect_harmony``, ``use_mad_negcon: true``);
* ``jump_orf`` / ``jump_crispr``: wellpos → cc → var → mad (all) → outlier → featselect →
  sphering (ZCA-cor on negcon) → harmony (``profiles_wellpos_cc_var_mad_outlier_featselect_sphering_harmony``;
  CRISPR's chromosome-arm correction and PCA need gene annotations and are not part of the preset).

Outputs in ``-o OUT``: ``NN_<op>.parquet`` per step (``Metadata_*`` unchanged, features float32),
``recipe.json`` (per step: parameters, decisions, rows and features in/out, rows quarantined with
reasons, a fingerprint), ``config.yaml`` (the resolved recipe). A step whose Parquet exists with the
same fingerprint (input bytes + every step up to it) is read back instead of recomputed, so a
re-run gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from raycp.errors import ConfigError, InputError

PRESETS = ("jump_compound", "jump_orf", "jump_crispr")


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantFeaturesStep(_Step):
    op: Literal["variant_features"]
    by: str = "Metadata_Plate"
    samples: str = "all"
    min_abs_coef_var: float = 1e-3


class NormalizeStep(_Step):
    op: Literal["normalize"]
    method: Literal["standardize", "robustize", "mad_robustize"] = "mad_robustize"
    samples: str = "all"
    by: str | None = "Metadata_Plate"
    mad_scale: Literal["normal", "raw"] = "normal"
    epsilon: float | None = None


class RankIntStep(_Step):
    op: Literal["rank_int"]
    c: float = 3.0 / 8.0
    seed: int = 0


class FeatureSelectStep(_Step):
    op: Literal["feature_select"]
    operations: list[Literal["variance_threshold", "frequency_threshold", "correlation_threshold", "drop_na_columns",
                             "blocklist", "drop_outliers", "drop_na"]] = Field(default_factory=lambda: ["variance_threshold"])
    samples: str = "all"
    min_variance: float = 1e-6
    freq_cut: float = 0.05
    unique_cut: float = 0.01
    corr_threshold: float = 0.9
    corr_method: Literal["pearson", "spearman"] = "pearson"
    na_cutoff: float = 0.05
    blocklist: list[str] | None = None
    outlier_cutoff: float = 500.0


class OutlierStep(_Step):
    op: Literal["outlier_features"]
    threshold: float = 100.0
    quantile: float = 0.99
    clip: bool = True


class SpherizeStep(_Step):
    op: Literal["spherize"]
    method: Literal["paper", "ZCA", "ZCA-cor", "PCA", "PCA-cor"] = "ZCA-cor"
    samples: str = "all"
    epsilon: float = 1e-6
    lam: float = 1e-2
    by: str | None = None
    center: bool = True


class HarmonyStep(_Step):
    op: Literal["harmony"]
    batch: str = "Metadata_Batch"
    n_clusters: int | None = None
    n_components: int | None = None
    theta: float = 2.0
    max_iter: int = 10
    seed: int = 0


class WellPositionStep(_Step):
    op: Literal["well_position"]
    well_col: str = "Metadata_Well"


class CellCountStep(_Step):
    op: Literal["cell_count"]
    count_col: str = "Metadata_n_cells"
    min_unique: int = 100


Step = Annotated[VariantFeaturesStep | NormalizeStep | RankIntStep | FeatureSelectStep | OutlierStep | SpherizeStep | HarmonyStep | WellPositionStep | CellCountStep, Field(discriminator="op")]


class RecipeConfig(BaseModel):
    """A profile recipe: ``negcon`` (pandas query of the negative-control wells, what ``samples:
    negcon`` means) and ``steps`` (operations in order)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "recipe"
    negcon: str | None = None
    na_cutoff: float = Field(0.05, ge=0, le=1, description=(
        "before the steps: a feature NaN in more than this fraction of the wells is dropped, then wells with a "
        "NaN among the rest are quarantined (raycp's rule for every profile verb; pycytominer's drop_na_columns)"))
    steps: list[Step] = Field(min_length=1)


def preset_path(name: str) -> Path:
    return Path(str(resources.files("raycp.profiles").joinpath(f"recipes/{name}.yaml")))


def load_recipe(config: str, overrides: list[str] | None = None) -> RecipeConfig:
    """A recipe from a preset name (``jump_compound``, ``jump_orf``, ``jump_crispr``) or a YAML
    file, with ``--set key=value`` overrides: ``negcon``, ``name``, ``na_cutoff``, or a step's
    setting as ``steps.N.KEY`` (N counted from 1, as the step files are numbered), e.g.
    ``--set steps.5.batch=Metadata_Plate``. Raises :class:`ConfigError`."""
    import yaml

    from raycp.config import build_config, parse_value

    path = str(preset_path(config)) if config in PRESETS else config
    if config not in PRESETS and not Path(config).exists():
        raise ConfigError(f"{config}: recipe not found (neither a file nor a preset)", fix=f"pass a YAML file or one of {list(PRESETS)}")
    step_sets = [o for o in (overrides or []) if o.split("=", 1)[0].strip().startswith("steps.")]
    others = [o for o in (overrides or []) if o not in step_sets]
    if not step_sets:
        return build_config(RecipeConfig, path, others, source=config)
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{config}: invalid YAML", fix="fix the YAML syntax") from None
    steps = tree.get("steps") if isinstance(tree, dict) else None
    for item in step_sets:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or "=" not in item:
            raise ConfigError(f"--set {key}: a step's setting is steps.N.KEY=VALUE", fix="e.g. --set steps.5.batch=Metadata_Plate")
        n = int(parts[1])
        if not isinstance(steps, list) or not 1 <= n <= len(steps):
            raise ConfigError(f"--set {key}: the recipe has {len(steps) if isinstance(steps, list) else 0} steps",
                              fix="number the steps from 1, as the output files are (01_..., 02_...)")
        steps[n - 1][parts[2]] = parse_value(item.split("=", 1)[1])
    return build_config(RecipeConfig, None, others, base=tree, source=config)


def _samples(step_samples: str, recipe: RecipeConfig, i: int) -> str:
    if step_samples != "negcon":
        return step_samples
    if not recipe.negcon:
        raise ConfigError(f"step {i} ({'samples: negcon'}) but the recipe has no negcon query",
                          fix="set negcon: \"Metadata_pert_type == 'negcon'\" in the recipe or --set negcon=...")
    return recipe.negcon


def run_step(wells: pd.DataFrame, step: _Step, recipe: RecipeConfig, i: int = 0, source: str = "wells"):
    """Run one step on a wells table; returns :class:`raycp.profiles.ops.OpResult`."""
    from raycp.profiles import ops

    params = step.model_dump(exclude={"op"})
    if "samples" in params:
        params["samples"] = _samples(params["samples"], recipe, i)
    fn = {"variant_features": ops.variant_features, "normalize": ops.normalize, "rank_int": ops.rank_int,
          "feature_select": ops.feature_select, "outlier_features": ops.outlier_features, "spherize": ops.spherize,
          "harmony": ops.harmony_op, "well_position": ops.well_position, "cell_count": ops.cell_count}[step.op]
    return fn(wells, **params, source=source)


def check_columns(recipe: RecipeConfig, wells: pd.DataFrame, source: str) -> None:
    """Refuse, before any step runs, a step naming a metadata column the table does not have, and
    the two steps the table cannot feed: Harmony with one batch, well position with one plate."""
    meta = [c for c in wells.columns if str(c).startswith("Metadata_")]
    for i, step in enumerate(recipe.steps, start=1):
        for key in ("by", "batch", "well_col", "count_col"):
            col = getattr(step, key, None)
            if col is not None and col not in wells.columns:
                raise InputError(f"{source}: recipe step {i} ({step.op}) needs column {col!r} ({key}), which the table lacks",
                                 fix=f"--set steps.{i}.{key}=COLUMN with one of {meta[:10]}, or drop the step")
        if step.op == "harmony" and wells[step.batch].nunique() < 2:
            raise InputError(f"{source}: recipe step {i} (harmony) needs at least 2 values of {step.batch!r}, the table has "
                             f"{wells[step.batch].nunique()}", fix="drop the harmony step for one batch, or "
                             f"--set steps.{i}.batch=COLUMN with another batch column")
        if step.op == "well_position" and not wells[step.well_col].duplicated().any():
            raise InputError(f"{source}: recipe step {i} (well_position): every {step.well_col} holds one well (one plate), "
                             "so the step would zero every feature", fix="drop the well_position step for a single plate")


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class RecipeRun:
    """``record``: the ``recipe.json`` payload, each step also saying whether it was ``reused``;
    ``wells``: the last step's table."""

    record: dict
    wells: pd.DataFrame


def run_recipe(recipe: RecipeConfig, wells: str | Path | pd.DataFrame, output: str | Path,
               input_digest: str | None = None) -> RecipeRun:
    """Run ``recipe`` on a wells table (a path, or a DataFrame with ``input_digest`` naming its
    bytes), writing into ``output`` (a folder or any fsspec URL; see the module docstring). Returns
    the record and the last step's table. Raises :class:`InputError` / :class:`ConfigError` before any step
    runs when a step names a missing column."""
    from raycp.config import save_resolved
    from raycp.io import urls
    from raycp.io.outputs import jsonable, read_parquet, write_json, write_parquet
    from raycp.profiles.io import feature_columns, read_table

    out = str(output)
    if "://" not in out:
        urls.make_local_folder(out)
    previous = {}
    record_url = urls.join(out, "recipe.json")
    if urls.exists(record_url):
        try:
            previous = {s["file"]: s for s in json.loads(urls.read_bytes(record_url)).get("steps", [])}
        except (ValueError, KeyError, TypeError):
            previous = {}
    if isinstance(wells, pd.DataFrame):
        if input_digest is None:
            raise ValueError("input_digest is required with a DataFrame input")
        source, chain = "wells", input_digest
    else:
        source = str(wells)
        table = read_table(wells)  # a missing or unreadable file is a one-line error before hashing it
        chain = file_digest(wells)
        wells = table
    check_columns(recipe, wells, source)
    n_input = len(wells)
    features_in = len(feature_columns(wells, source))
    wells, nan_rule = _nan_rule(wells, recipe.na_cutoff, source)
    chain = hashlib.sha256(f"{chain}|na_cutoff={recipe.na_cutoff}".encode()).hexdigest()
    plan = []  # (step, spec, file, fingerprint); the fingerprints depend on the config only
    for i, step in enumerate(recipe.steps, start=1):
        spec = step.model_dump(mode="json")
        chain = hashlib.sha256((chain + json.dumps({"negcon": recipe.negcon, **spec}, sort_keys=True)).encode()).hexdigest()
        plan.append((step, spec, f"{i:02d}_{step.op}.parquet", chain))
    reused_until = 0  # the leading steps finished with the same fingerprint: their records stand
    for _, _, name, fingerprint in plan:
        done = previous.get(name)
        if not (done and done.get("fingerprint") == fingerprint and urls.exists(urls.join(out, name))):
            break
        reused_until += 1
    steps: list[dict] = [previous[name] for _, _, name, _ in plan[:reused_until]]
    if reused_until:  # only the last reused table is read: the next step's input, or the result
        wells = read_parquet(urls.join(out, plan[reused_until - 1][2]))
    for i, (step, spec, name, fingerprint) in enumerate(plan[reused_until:], start=reused_until + 1):
        rows_in, feats_in = len(wells), len(feature_columns(wells, source))
        res = run_step(wells, step, recipe, i, source=f"{source} (step {i}: {step.op})")
        wells, info = res.wells, res.info
        write_parquet(wells, urls.join(out, name))
        q = info.get("rows_quarantined")
        quarantined = int(q["rows"]) if isinstance(q, dict) else 0
        steps.append({"step": i, "op": step.op, "file": name, "params": spec, "fingerprint": fingerprint,
                      "rows_in": rows_in, "rows_out": len(wells), "rows_quarantined": quarantined,
                      "features_in": feats_in, "features_out": len(feature_columns(wells, source)), "info": info})
    reused_steps = [i < reused_until for i in range(len(plan))]
    quarantined_total = nan_rule["rows_quarantined"] + sum(s["rows_quarantined"] for s in steps)
    payload = {"recipe": recipe.name, "input": source, "na_rule": nan_rule, "steps": steps, "output": steps[-1]["file"],
               "accounting": {"rows_input": n_input, "rows_output": len(wells), "rows_quarantined": quarantined_total,
                              "features_input": features_in, "features_output": steps[-1]["features_out"]}}
    if payload["accounting"]["rows_output"] + quarantined_total != n_input:
        raise RuntimeError("recipe accounting does not add up")  # an operation dropped rows without saying so
    write_json(record_url, jsonable(payload))  # the same bytes whether the steps ran or were reused
    save_resolved(recipe, out)
    _remove_stale_steps(out, {s["file"] for s in steps})
    return RecipeRun({**payload, "steps": [{**st, "reused": r} for st, r in zip(steps, reused_steps)]}, wells)


def _nan_rule(wells: pd.DataFrame, na_cutoff: float, source: str) -> tuple[pd.DataFrame, dict]:
    """raycp's missing-value rule before the steps (:func:`raycp.profiles.io.feature_matrix_na`):
    features NaN in more than ``na_cutoff`` of the wells dropped, then wells with a NaN left
    quarantined; ±inf is an error naming the column."""
    from raycp.profiles.io import feature_matrix_na

    fm = feature_matrix_na(wells, na_cutoff=na_cutoff, source=source)
    record = {"na_cutoff": na_cutoff, "features_dropped_na": list(fm.dropped_na),
              "rows_quarantined": int((~fm.ok).sum()), "reason": "well has a NaN feature"}
    if fm.dropped_na:
        wells = wells.drop(columns=fm.dropped_na)
    if not fm.ok.all():
        record["rows"] = wells.loc[~fm.ok, [c for c in ("Metadata_Plate", "Metadata_Well") if c in wells.columns]] \
            .astype(str).to_dict("records")[:100]
        wells = wells[fm.ok].reset_index(drop=True)
    return wells, record


def _remove_stale_steps(out: str, current: set[str]) -> None:
    """Step files of an earlier, different recipe in the same local folder (``NN_op.parquet`` not
    among this recipe's), so that a glob of the folder finds only this recipe's steps."""
    import re

    if "://" in out:
        return
    for f in Path(out).glob("*.parquet"):
        if re.fullmatch(r"\d{2}_[a-z_]+\.parquet", f.name) and f.name not in current:
            f.unlink()
