"""The training-subset sweep's core (paper Fig. 3B/C, Table 1), pandas only.

One model is trained per subset of the run's treatments ranked by treatment effect (paper Methods,
"Treatment effect"): the weakest, median and strongest ``fraction`` (paper: 20 %) and all of them.
A subset's training set is every cell of its treatments plus every control cell (controls stay
classes, as in the run's own training); each model's features are then extracted from *every*
cell of the run, profiled and evaluated as the run evaluates its own CNN, so the subsets differ
only in what the network was trained on (Fig. 3C: mAP per subset).

Other axes (learning rate, epochs, augmentation, crop size: anything under ``train``,
``profiles``, ``inference`` or ``crops``) are dotted config keys with a list of values (grid or random search) or, for
random search, a distribution (``log:1e-4:1e-1``, ``uniform:0.8:1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from raycp.errors import InputError

#: The subsets of the paper's Fig. 3C, in its order.
SUBSETS: tuple[str, ...] = ("weakest", "median", "strongest", "all")
#: Config sections a trial may vary. A trial reuses the base run's crops, unless it varies a
#: ``crops`` setting (e.g. ``crops.size``): then it runs the image stages into its own folder.
AXIS_SECTIONS: tuple[str, ...] = ("train", "profiles", "inference", "crops")
#: Keys a trial may not vary: its data, its feature sets and whether it trains are the sweep's.
FIXED_KEYS: tuple[str, ...] = ("train.enabled", "train.name", "train.resume", "train.resume_from")


@dataclass(frozen=True)
class Axis:
    """One swept config key: ``values`` (grid / random choice) or a ``distribution`` (``log`` or
    ``uniform`` over ``[low, high]``, random search only)."""

    key: str
    values: tuple = ()
    distribution: str | None = None
    low: float = math.nan
    high: float = math.nan


def _value(text: str):
    """A listed value as ``--set`` parses one (:func:`raycp.config.parse_value`); text YAML cannot read stays text."""
    import yaml

    from raycp.config import parse_value

    try:
        return parse_value(text)
    except yaml.YAMLError:
        return text


def check_key(key: str, what: str = "--param") -> str:
    """A dotted key a trial may set; raises :class:`InputError` otherwise."""
    if key.split(".", 1)[0] not in AXIS_SECTIONS or "." not in key:
        raise InputError(f"{what} {key!r}: a trial may set keys of {', '.join(AXIS_SECTIONS)} only "
                         "(the index, illumination and nuclei settings are the base run's)",
                         fix="e.g. train.optim.lr, train.optim.epochs, crops.size, profiles.sphere_lambda")
    if key in FIXED_KEYS:
        raise InputError(f"{what} {key!r} is set by the sweep itself", fix="vary another key")
    return key


def parse_axis(text: str) -> Axis:
    """``KEY=V1,V2,...`` (values parsed as YAML) or ``KEY=log:LOW:HIGH`` / ``KEY=uniform:LOW:HIGH``.

    Raises :class:`InputError` for a malformed axis."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise InputError(f"--param {text!r} is not KEY=VALUES", fix="e.g. --param train.optim.lr=0.01,0.005,0.001")
    check_key(key)
    head, _, tail = rest.partition(":")
    if head in ("log", "uniform") and tail:
        try:
            low, high = (float(v) for v in tail.split(":"))
        except ValueError:
            raise InputError(f"--param {text!r}: a distribution is {head}:LOW:HIGH", fix=f"e.g. {key}={head}:1e-4:1e-1") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high) or (head == "log" and low <= 0):
            raise InputError(f"--param {text!r}: need LOW < HIGH{' and LOW > 0' if head == 'log' else ''}",
                             fix=f"e.g. {key}={head}:1e-4:1e-1")
        return Axis(key, distribution=head, low=low, high=high)
    values = tuple(_value(v.strip()) for v in rest.split(",") if v.strip())
    if len(set(map(repr, values))) != len(values):
        raise InputError(f"--param {text!r} lists a value twice", fix="give each value once")
    return Axis(key, values=values)


def subset_treatments(effect: pd.DataFrame, label: str, fraction: float = 0.2,
                      names: tuple[str, ...] = SUBSETS) -> dict[str, list[str]]:
    """Each subset's treatments (labels) from the run's ranking (``effect/effect.parquet``) by
    :func:`raycp.profiles.effect.select_subsets`; ``all`` is every ranked treatment.

    Raises :class:`InputError` for an unknown subset name, a ranking without the label column or
    with too few treatments for the subsets to differ."""
    from raycp.profiles.effect import EFFECT_COL, select_subsets

    unknown = [n for n in names if n not in SUBSETS]
    if unknown or not names:
        raise InputError(f"unknown subset(s) {unknown or 'none'}", fix=f"choose from {', '.join(SUBSETS)}")
    if label not in effect.columns or EFFECT_COL not in effect.columns:
        raise InputError(f"the treatment-effect ranking has no {label!r} column",
                         fix="rank by the training label: profiles.treatment_cols must hold train.label")
    if not 0 < fraction <= 1 / 3:
        raise InputError(f"--fraction {fraction} is not in (0, 1/3]", fix="the paper's is 0.2")
    ranked = effect.astype({label: str})
    if len(ranked) < 3 and any(n != "all" for n in names):
        raise InputError(f"{len(ranked)} ranked treatment(s): too few for weakest, median and strongest subsets",
                         fix="sweep --subsets all, or rank a screen with more treatments")
    parts = select_subsets(ranked, fraction)
    out = {}
    for name in names:
        table = ranked if name == "all" else parts[name]
        out[name] = sorted(table[label].unique())
    chosen = [n for n in names if n != "all"]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1:]:
            if set(out[a]) & set(out[b]):
                raise InputError(f"the {a} and {b} {fraction:g} of {len(ranked)} treatments overlap "
                                 f"({sorted(set(out[a]) & set(out[b]))[:3]})",
                                 fix="lower --fraction (the paper's subsets are disjoint: 0.2)")
    return out


def subset_index(cells: pd.DataFrame, treatments: list[str], *, source: str, label: str,
                 control_col: str = "Metadata_IsControl") -> pd.DataFrame:
    """A training index (``raycp trainset combine``'s format, one source) of ``cells`` (one row per
    crop: plate/well/site/cell, label, control flag, ``crops_file``): the cells of ``treatments``
    and every control cell. Raises :class:`InputError` when a treatment has no cell."""
    from raycp.trainset.combine import CROPS_FILE, KEYS, SOURCE

    labels = cells[label].astype(str)
    is_ctrl = cells[control_col].fillna(False).astype(bool)
    missing = sorted(set(treatments) - set(labels[~is_ctrl]))
    if missing:
        raise InputError(f"treatment(s) {missing[:3]} of the ranking have no crops in the run",
                         fix="re-run the effect stage on this run's own profiles")
    keep = is_ctrl | labels.isin(treatments)
    out = cells.loc[keep, [*KEYS, label, control_col, CROPS_FILE]].reset_index(drop=True)
    out[label] = out[label].astype(str)
    out.insert(0, SOURCE, source)
    return out


def max_concurrent(*, cpus: float, gpus: float, num_workers: int, cpus_per_worker: float, data_cpus: float,
                   use_gpu: bool) -> int:
    """Trials at once: GPUs ÷ workers per trial on GPU; on CPU, the CPUs ÷ one trial's Train
    workers and read tasks (at least 1)."""
    if use_gpu:
        return max(1, int(gpus // num_workers))
    return max(1, int(cpus // (num_workers * cpus_per_worker + data_cpus)))


def trial_label(subset: str, overrides: dict) -> str:
    """A trial's name for tables, plots and progress lines: ``strongest · lr=0.01 · size=96``."""
    return " · ".join([subset, *(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                                 for k, v in overrides.items())])


def results_table(rows: list[dict], axes: list[str], values: dict[str, list] | None = None) -> pd.DataFrame:
    """One row per trial, in Fig. 3C's order (subset, then the axes' values: in the order they were
    listed where ``values`` gives them, e.g. ``train.formulation=classification,ols,mil,grl``, else sorted)."""
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = {name: i for i, name in enumerate(SUBSETS)}
    helpers = {"_order": table["subset"].map(order)}
    keys = ["_order"]
    for a in axes:
        if a not in table.columns:
            continue
        listed = (values or {}).get(a)
        if listed:
            positions = {str(v): i for i, v in enumerate(listed)}
            helpers[f"_{a}"] = table[a].astype(str).map(positions).fillna(len(listed))
            keys.append(f"_{a}")
        keys.append(a)
    table = table.assign(**helpers)
    keys.append("trial_id")
    return table.sort_values(keys, kind="stable").drop(columns=list(helpers)).reset_index(drop=True)
