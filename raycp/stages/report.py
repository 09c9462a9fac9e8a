"""The run report: ``<run>/report.html``, one self-contained page (PNGs embedded) built only from
what the stages wrote, so it can be rebuilt at any time (``raycp run CONFIG --from report``).

Sections follow the paper: the comparison of feature sets with and without sphering (Table 2 /
Fig. 4), the λ curve (Fig. 6B), UMAPs before/after sphering (Fig. 6A/C), the JUMP papers' phenotypic
activity and consistency (copairs mAP vs p-value), the CNN's learning
curves and per-class precision/recall (Fig. 2), the treatment-effect distribution with the 20 %
subsets (Fig. 3B), then input accounting and wall time per stage.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from raycp.io import urls
from raycp.io.outputs import read_parquet, write_json
from raycp.report import Section, render_report
from raycp.stages.base import Context, Stage, read_status
from raycp.stages.train import training_note


def _png(url: str) -> bytes | None:
    return urls.read_bytes(url) if urls.exists(url) else None


def _plot(draw) -> bytes:
    """Call ``draw(ax)`` on a fresh figure and return the PNG bytes."""
    from raycp.evaluate.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _statuses(ctx: Context) -> dict[str, dict]:
    """The status of every registered stage that has started, in the registry's order."""
    return {s.name: st for s in ctx.stages if (st := read_status(ctx.cfg, s.name)) is not None}


def comparison_section(ctx: Context) -> Section:
    url = ctx.layout.comparison
    sec = Section("Comparison of feature sets",
                  "Treatment profiles (mean of wells) evaluated as in the paper: cosine similarity, each annotated "
                  "treatment queried against the others, a hit shares ≥1 MoA. map_paper: the paper's mAP (queries "
                  "with ≥1 match); folds of enrichment: odds ratio of hits in the top 1 %; significant: queries "
                  "whose enrichment is significant after Benjamini–Hochberg (α 0.05).")
    if urls.exists(url):
        table = read_parquet(url)
        sec.tables.append(("feature set × correction", table))
        lam = ctx.cfg.profiles.sphere_lambda
        wide = table.assign(correction=np.where(table["correction"] == "none", "none", "sphered")).pivot(
            index="feature_set", columns="correction", values="map_paper")
        if {"none", "sphered"} <= set(wide.columns):
            wide = wide.assign(gain=wide["sphered"] - wide["none"]).rename_axis(columns=None).reset_index()
            sec.tables.append((f"map_paper without and with sphering (λ = {lam:g})", wide))
        if (note := training_note(ctx.cfg)) is not None:
            sec.text += f" Note: {note}."
    return sec


def lambda_section(ctx: Context) -> Section:
    sec = Section("Sphering λ (paper Fig. 6B)", "mAP of each feature set without correction (left) and sphered "
                  "with decreasing λ (stronger whitening to the right); sphering is fitted on the control wells.")
    curves = []
    for model in ctx.cfg.features:
        url = urls.join(ctx.layout.evaluation(model.folder_name), "lambda_curve.parquet")
        if urls.exists(url):
            curves.append(read_parquet(url))
    if not curves:
        return sec
    table = pd.concat(curves, ignore_index=True)

    def draw(ax):
        for name, c in table.groupby("feature_set", sort=False):
            none = c[c["sphere_lambda"].isna()]
            lam = c[c["sphere_lambda"].notna()].sort_values("sphere_lambda", ascending=False)
            labels = ["none"] + [f"{v:g}" for v in lam["sphere_lambda"]]
            ax.plot(range(len(labels)), list(none["map_paper"]) + list(lam["map_paper"]), marker="o", label=name)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("sphering λ")
        ax.set_ylabel("map_paper")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    sec.figures.append(("map_paper against λ, per feature set", _plot(draw)))
    sec.tables.append(("λ curve", table))
    return sec


def sweep_sections(ctx: Context) -> list[Section]:
    """One section per sweep run on this run (``raycp sweep lambda|subsets --run``) that finished."""
    return [sec for sec in (_lambda_sweep_section(ctx), _subset_sweep_section(ctx)) if sec is not None]


def _subset_sweep_section(ctx: Context) -> Section | None:
    folder = ctx.layout.sweep("subsets")
    url = urls.join(folder, "subsets.parquet")
    if not urls.exists(url):
        return None
    table = read_parquet(url)
    meta = json.loads(urls.read_bytes(urls.join(folder, "sweep.json")))
    cols = [c for c in ("label", "state", "classes", "cells_trained", "epochs", "val_macro_f1", "map_paper",
                        "map_paper_none", "map_paper_unseen", "folds_of_enrichment", "trial_id") if c in table.columns]
    share = f"{meta.get('fraction', 0.2):.0%}"
    state = meta.get("state")
    sec = Section("Training subsets (raycp sweep subsets, Ray Tune; paper Fig. 3C)",
                  f"One CNN trained per subset of the treatments ranked by treatment effect (the weakest, median and "
                  f"strongest {share}, and all), each with every control; its features over the whole run evaluated "
                  "as the run's own CNN: map_paper sphered, map_paper_none without correction, map_paper_unseen over "
                  "the treatments the model did not train on. Stopped: ended early by the scheduler, not evaluated."
                  + ("" if state == "complete" else f" This sweep's state is '{state}': its table is incomplete."),
                  tables=[("trials", table[cols])])
    treatments = meta.get("treatments") or {}
    if treatments:
        sec.tables.append(("treatments of each subset", pd.DataFrame(
            [{"subset": k, "treatments": len(v), "which": ", ".join(v[:12]) + (" …" if len(v) > 12 else "")}
             for k, v in treatments.items()])))
    png = _png(urls.join(folder, "subsets.png"))
    if png is not None:
        sec.figures.append(("map_paper per training subset", png))
    return sec


def _lambda_sweep_section(ctx: Context) -> Section | None:
    folder = ctx.layout.sweep("lambda")
    curve_url = urls.join(folder, "lambda_curve.parquet")
    if not urls.exists(curve_url):
        return None
    selection = json.loads(urls.read_bytes(urls.join(folder, "lambda_selection.json")))
    rows = [{"feature_set": name, "best λ": s["best_lambda"], "best map_paper": s["best"],
             "no correction": s["none"], f"saturated λ (within {s['tolerance']:g})": s["saturated_lambda"],
             "JUMP rule λ": "n/a (needs copairs metrics)" if s["jump_lambda"] is None else s["jump_lambda"]}
            for name, s in selection.items()]
    sec = Section("λ sweep (raycp sweep lambda, Ray Tune)",
                  "One Tune trial per feature set and λ. Paper rule: the best λ, or where the curve saturates the "
                  "largest λ within the tolerance of the best; the JUMP recipe's rule needs copairs' "
                  "negative-control and non-replicate mAPs.",
                  tables=[("selected λ", pd.DataFrame(rows))])
    for name in selection:
        png = _png(urls.join(folder, f"lambda_curve_{name}.png"))
        if png is not None:
            sec.figures.append((f"{name}: map_paper against λ", png))
    return sec


def umap_section(ctx: Context) -> Section:
    sec = Section("Well profiles before and after sphering (paper Fig. 6A/C)",
                  "UMAP (cosine) of well profiles coloured by plate and by control/treated. Before sphering, plates "
                  "separate; after, controls should mix across plates.")
    if not ctx.cfg.profiles.umap:
        sec.text = "Not drawn (profiles.umap is false)."
    for model in ctx.cfg.features:
        png = _png(urls.join(ctx.layout.evaluation(model.folder_name), "umap.png"))
        if png:
            sec.figures.append((model.folder_name, png))
    return sec


def training_section(ctx: Context) -> Section:
    folder = ctx.folder("train")
    sec = Section("CNN training (paper Fig. 2)", "Weakly supervised: every cell labelled with its treatment "
                  "(controls are classes too); loss, accuracy and macro F1 per epoch on training and held-out cells.")
    st = ctx.summaries.get("train") or {}
    if st.get("skipped"):
        sec.text = f"Not trained ({st['skipped']})."
        return sec
    for caption, name in (("learning curves", "learning_curve.png"), ("per-class precision / recall", "precision_recall.png")):
        png = _png(urls.join(folder, name))
        if png:
            sec.figures.append((caption, png))
    per_class = urls.join(folder, "per_class.csv")
    if urls.exists(per_class):
        sec.tables.append(("per class, last epoch (validation)", pd.read_csv(io.BytesIO(urls.read_bytes(per_class)))))
    return sec


def effect_section(ctx: Context) -> Section:
    sec = Section("Treatment effect (paper Fig. 3B)", "")
    url = ctx.layout.effect
    if not urls.exists(url):
        return sec
    from raycp.profiles.effect import EFFECT_COL

    effect = read_parquet(url)
    subsets = {}
    for name in ("weakest", "median", "strongest"):
        u = ctx.layout.effect_subset(name)
        if urls.exists(u):
            subsets[name] = read_parquet(u)
    name = (ctx.summaries.get("effect") or {}).get("feature_set", "")
    how = ", standardised to the control wells" if name in ctx.cfg.profiles.standardize else ""
    sec.text = (f"Mean z-scored distance of a treatment's wells to its plate's median control well "
                f"({name} features{how}, sphered); "
                f"the weakest, median and strongest {ctx.cfg.profiles.effect_fraction:.0%} of treatments are the "
                "reusable subsets under effect/subsets/.")

    def draw(ax):
        ranked = effect.sort_values(EFFECT_COL).reset_index(drop=True)
        colours = {"weakest": "tab:blue", "median": "tab:orange", "strongest": "tab:red"}
        keys = ctx.cfg.profiles.treatment_cols
        member = {tuple(r): name for name, table in subsets.items() for r in table[keys].itertuples(index=False)}
        colour = [colours.get(member.get(tuple(r)), "0.7") for r in ranked[keys].itertuples(index=False)]
        ax.bar(range(len(ranked)), ranked[EFFECT_COL], color=colour, width=1.0)
        ax.set_yscale("symlog")
        ax.set_xlabel("treatments, sorted by effect")
        ax.set_ylabel("effect (z-scored distance, symlog)")
        for name, c in colours.items():
            ax.bar([0], [0], color=c, label=name)
        ax.legend(fontsize=8)

    sec.figures.append(("treatment effect, sorted; the 20 % subsets coloured", _plot(draw)))
    cols = [c for c in effect.columns if not isinstance(effect[c].iloc[0] if len(effect) else None, (list, np.ndarray))]
    sec.tables.append(("treatments ranked by effect", effect[cols].sort_values(EFFECT_COL, ascending=False)))
    return sec


def retrieval_section(ctx: Context) -> Section:
    sec = Section("Phenotypic activity and consistency (copairs mAP)",
                  "The JUMP papers' metrics, computed as copairs computes them: activity ranks each treatment's wells "
                  "against the control wells of their plates, consistency ranks the active treatments' consensus "
                  "profiles against those sharing no annotation; p-values from copairs' null "
                  f"({ctx.cfg.retrieval.null_size} draws), Benjamini–Hochberg corrected; fraction retrieved = share of "
                  f"groups with corrected p < {ctx.cfg.retrieval.threshold:g}.")
    url = urls.join(ctx.folder("retrieval"), "summary.parquet")
    if not urls.exists(url):
        return sec
    sec.tables.append(("per feature set", read_parquet(url)))
    for model in ctx.cfg.features:
        png = _png(urls.join(ctx.folder("retrieval"), model.folder_name, "map_pvalue.png"))
        if png:
            sec.figures.append((f"{model.folder_name}: mAP vs −log10 p-value", png))
    return sec


def accounting_section(ctx: Context, statuses: dict[str, dict]) -> Section:
    titles = {s.name: s.title for s in ctx.stages}
    rows = []
    for stage, st in statuses.items():
        if stage == "report":
            continue
        s = st.get("summary") or {}
        reasons = "; ".join(f"{k} ({v})" for k, v in (s.get("reasons") or {}).items())
        rows.append({"stage": titles.get(stage, stage), "total": s.get("total"), "processed": s.get("processed"),
                     "quarantined": s.get("quarantined"), "reasons": reasons or "–"})
    sec = Section("Input accounting", "Every input of every stage is processed or quarantined with a reason "
                  "(processed + quarantined = total); per-site tables are each stage's ledger.parquet.",
                  tables=[("per stage", pd.DataFrame(rows))])
    wells_url = None
    for model in ctx.cfg.features:
        u = ctx.layout.wells(model.folder_name)
        if urls.exists(u):
            wells_url = u
            break
    if wells_url:
        import pyarrow.parquet as pq

        meta = [c for c in pq.read_schema(io.BytesIO(urls.read_bytes(wells_url))).names if c.startswith("Metadata_")]
        wells = pd.read_parquet(io.BytesIO(urls.read_bytes(wells_url)), columns=meta)
        n = wells["Metadata_n_cells"].to_numpy(dtype=float)
        sec.tables.append(("cells per well", pd.DataFrame([{
            "wells": len(n), "cells": int(n.sum()), "min": n.min(), "median": float(np.median(n)), "max": n.max()}])))

        def draw(ax):
            ax.hist(n, bins=30, color="tab:blue")
            ax.set_xlabel("cells per well")
            ax.set_ylabel("wells")

        sec.figures.append(("cells per well", _plot(draw)))
    return sec


def timing_section(statuses: dict[str, dict]) -> Section:
    rows = [{"stage": stage, "seconds": st.get("seconds"), "state": st.get("state"), "finished": st.get("finished")}
            for stage, st in statuses.items() if stage != "report"]
    total = sum(r["seconds"] or 0 for r in rows)
    return Section("Wall time per stage", f"Measured by `raycp run` on this machine; total {total:.0f} s "
                   "(stages finished in an earlier invocation keep their time).",
                   tables=[("per stage", pd.DataFrame(rows))])


def build_report(ctx: Context) -> dict:
    """Render ``<run>/report.html`` from the stages' outputs; returns the report stage's summary."""
    from raycp import __version__

    cfg = ctx.cfg
    statuses = _statuses(ctx)
    for stage, st in statuses.items():
        ctx.summaries.setdefault(stage, st.get("summary") or {})
    index = ctx.summaries.get("index") or {}
    subtitle = (f"{cfg.data.output} · {index.get('plates', '?')} plates, {index.get('wells', '?')} wells, "
                f"{index.get('sites', '?')} sites · raycp {__version__} · Moshkov et al. 2024")
    sections = [comparison_section(ctx), lambda_section(ctx), *sweep_sections(ctx), umap_section(ctx),
                retrieval_section(ctx), training_section(ctx), effect_section(ctx), accounting_section(ctx, statuses),
                timing_section(statuses)]
    page = render_report("raycp run report", subtitle, sections)
    url = ctx.layout.report
    urls.atomic_write_text(url, page)
    figures = sum(len(s.figures) for s in sections)
    write_json(urls.join(ctx.folder("report"), "contents.json"),
                 {"sections": [s.title for s in sections], "figures": figures, "bytes": len(page)})
    return {"total": len(sections), "processed": len(sections), "quarantined": 0, "reasons": {},
            "report": url, "figures": figures, "bytes": len(page)}


STAGE = Stage("report", "report", build_report, lambda cfg: {}, always_runs=True)
