"""Figures of the evaluation (Moshkov et al. 2024, Fig. 6): mAP vs the sphering λ, the interpolated
precision–recall curve, and UMAPs of well profiles coloured by plate and by control/treated, before
and after sphering. PNG files (matplotlib, Agg backend) plus a small HTML page that shows them."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay out, write the PNG, close the figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_map_vs_lambda(sweep: pd.DataFrame, path: str | os.PathLike, metric: str = "map_paper",
                       title: str | None = None, selected: float | None = None) -> Path:
    """mAP against λ: no correction leftmost, then λ in decreasing order (increasing sphering);
    ``selected`` is marked. Labels keep 2 significant digits, every other one on long grids."""
    plt = _plt()
    none = sweep[sweep["sphere_lambda"].isna()]
    lam = sweep[sweep["sphere_lambda"].notna()].sort_values("sphere_lambda", ascending=False)
    labels = (["none"] if len(none) else []) + [f"{v:.2g}" for v in lam["sphere_lambda"]]
    values = list(none[metric]) + list(lam[metric])
    step = 2 if len(labels) > 14 else 1
    fig, ax = plt.subplots(figsize=(6.5 if step == 1 else 8, 3.6))
    ax.plot(range(len(values)), values, marker="o")
    ax.set_xticks(range(0, len(values), step), labels[::step], rotation=45, ha="right")
    if selected is not None:
        at = len(none) + list(lam["sphere_lambda"]).index(selected)
        ax.plot([at], [values[at]], marker="o", markersize=11, markerfacecolor="none", color="C3",
                label=f"selected λ = {selected:.3g}")
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel("sphering λ (leftmost: no correction)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path, dpi=120)


#: Fig. 3C's colours: weakest blue, median orange, strongest red, all treatments green.
SUBSET_COLOURS = {"weakest": "tab:blue", "median": "tab:orange", "strongest": "tab:red", "all": "tab:green"}


def plot_subset_map(table: pd.DataFrame, path: str | os.PathLike, metric: str = "map_paper",
                    baseline: float | None = None, title: str | None = None) -> Path:
    """One horizontal bar per evaluated trial of a subset sweep (paper Fig. 3C): ``metric`` of the
    model trained on that subset, coloured by subset, and ``<metric>_none`` (no correction) in grey
    beside it when the table has it; ``baseline`` (e.g. the run's own CNN) as a dashed line.
    ``table``: ``subset``, ``label`` (the bar's name) and ``metric``."""
    plt = _plt()
    rows = table[table[metric].notna()].iloc[::-1]
    none = f"{metric}_none"
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * max(len(rows), 2) + 1.4))
    y = np.arange(len(rows), dtype=float)
    if none in rows.columns and rows[none].notna().any():  # without correction beside it (Supplementary Fig. 1)
        ax.barh(y - 0.2, rows[metric], height=0.4, color=[SUBSET_COLOURS.get(s, "tab:gray") for s in rows["subset"]])
        ax.barh(y + 0.2, rows[none].astype(float), height=0.4, color="lightgray")
    else:
        ax.barh(y, rows[metric], color=[SUBSET_COLOURS.get(s, "tab:gray") for s in rows["subset"]])
    ax.set_yticks(y, rows["label"])
    if baseline is not None and np.isfinite(baseline):
        ax.axvline(baseline, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel(metric + ("   (dashed: the run's own CNN)" if baseline is not None and np.isfinite(baseline) else ""))
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path, dpi=110)


def plot_pr_curve(curve: pd.DataFrame, path: str | os.PathLike, label: str | None = None) -> Path:
    """The mean interpolated precision at each recall point (the paper's PR curve)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(curve["recall"], curve["precision"], label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    return _save(plt, fig, path, dpi=120)


def umap_embedding(X: np.ndarray, random_state: int = 0, n_neighbors: int = 15, metric: str = "cosine") -> np.ndarray:
    """2-D UMAP (umap-learn) of profiles."""
    import warnings

    import umap

    n_neighbors = max(2, min(n_neighbors, len(X) - 1))
    with warnings.catch_warnings():  # a seed makes umap single-threaded, and it says so every call
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return umap.UMAP(n_neighbors=n_neighbors, metric=metric, random_state=random_state,
                         n_jobs=1).fit_transform(np.asarray(X))


def plot_umaps(
    before: np.ndarray,
    after: np.ndarray | None,
    plates: Sequence,
    is_control: Sequence[bool],
    path: str | os.PathLike,
    random_state: int = 0,
) -> Path:
    """UMAP of well profiles before (and after) sphering, coloured by plate and by control/treated."""
    plt = _plt()
    sets = [("before sphering", before)] + ([("after sphering", after)] if after is not None else [])
    plates = pd.Series(list(plates)).astype(str)
    ctrl = np.asarray(is_control, dtype=bool)
    fig, axes = plt.subplots(len(sets), 2, figsize=(10, 4.5 * len(sets)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    plate_codes, plate_names = pd.factorize(plates, sort=True)
    for r, (title, X) in enumerate(sets):
        emb = umap_embedding(X, random_state=random_state)
        ax = axes[r, 0]
        for i, name in enumerate(plate_names):
            sel = plate_codes == i
            ax.scatter(emb[sel, 0], emb[sel, 1], s=6, color=cmap(i % 20), label=name if len(plate_names) <= 20 else None)
        ax.set_title(f"{title}: by plate")
        if len(plate_names) <= 20:
            ax.legend(fontsize=6, markerscale=2)
        ax = axes[r, 1]
        ax.scatter(emb[~ctrl, 0], emb[~ctrl, 1], s=6, color="0.6", label="treated")
        ax.scatter(emb[ctrl, 0], emb[ctrl, 1], s=8, color="red", label="control")
        ax.set_title(f"{title}: control vs treated")
        ax.legend(fontsize=7, markerscale=2)
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
    return _save(plt, fig, path, dpi=110)


def plot_well_umaps(wells: pd.DataFrame, path: str | os.PathLike, *, control_query: str,
                    sphere_lambda: float | None, scope_col: str | None = None, plate_col: str = "Metadata_Plate",
                    na_cutoff: float = 0.05, source: str = "wells") -> Path:
    """:func:`plot_umaps` of a well-profile table: the wells left after the NaN rule
    (:func:`raycp.profiles.io.feature_matrix_na`), before and (when ``sphere_lambda`` is given)
    after sphering on the control wells (per ``scope_col`` group when given); paper Fig. 6A/C.
    Used by ``raycp run`` (evaluate stage) and ``raycp profile evaluate --plots``.

    Raises :class:`raycp.errors.InputError` when the control query selects no well."""
    from raycp.evaluate import control_mask_from_query
    from raycp.profiles.io import feature_matrix_na
    from raycp.profiles.sphere import sphere

    fm = feature_matrix_na(wells, na_cutoff=na_cutoff, source=source)
    X, ok = fm.X, fm.ok
    ctrl = control_mask_from_query(wells, control_query)
    after = None
    if sphere_lambda is not None:
        groups = None if scope_col is None else wells[scope_col].to_numpy()[ok]
        after = sphere(X[ok], ctrl[ok], sphere_lambda, groups)
    plates = wells[plate_col].to_numpy()[ok] if plate_col in wells.columns else np.zeros(int(ok.sum()))
    return plot_umaps(X[ok], after, plates, ctrl[ok], path)


def write_html(out_dir: str | os.PathLike, images: Sequence[str | os.PathLike], metrics: dict, title: str = "raycp evaluation") -> Path:
    """A small self-describing HTML page: the metrics table and the PNGs (relative links)."""
    out_dir = Path(out_dir)
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in metrics.items()
        if not isinstance(v, dict)
    )
    imgs = "".join(
        f'<figure><img src="{html.escape(os.path.relpath(p, out_dir))}" style="max-width:100%"><figcaption>{html.escape(Path(p).stem)}</figcaption></figure>'
        for p in images
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><table border='1' cellpadding='3'>{rows}</table>{imgs}</body></html>"
    )
    path = out_dir / "plots.html"
    path.write_text(page, encoding="utf-8")
    return path


def plot_map_pvalue(tables: dict, path: str | os.PathLike, threshold: float = 0.05) -> Path:
    """The JUMP papers' retrieval plot: mAP against −log10(p-value) per group, one panel per metric
    (``tables``: name → copairs mAP table), retrieved (corrected p < ``threshold``) in colour."""
    plt = _plt()
    names = [k for k, v in tables.items() if v is not None and len(v)]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        t = tables[name]
        logp = -np.log10(t["p_value"].to_numpy(dtype=np.float64))
        hit = t["below_corrected_p"].to_numpy(dtype=bool)
        ax.scatter(t["mean_average_precision"][~hit], logp[~hit], s=10, color="0.6", label="not retrieved")
        ax.scatter(t["mean_average_precision"][hit], logp[hit], s=10, color="C3",
                   label=f"retrieved ({hit.mean():.0%})")
        ax.axhline(-np.log10(threshold), color="0.3", lw=0.8, ls="--")
        ax.set_xlabel("mAP")
        ax.set_ylabel("−log10 p-value")
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    return _save(plt, fig, path, dpi=120)
