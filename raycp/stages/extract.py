"""The ``extract`` stage: every feature set over every site — the trained CNN's
``block6a_activation``, the ImageNet and random baselines, CellProfiler features (paper Methods,
"Feature extraction"); each set resumes per site (:func:`raycp.extract.pipeline.run_extract`)."""

from __future__ import annotations

from raycp.io.outputs import jsonable
from raycp.stages.base import Context, Stage, sum_summaries


def run_extract(ctx: Context) -> dict:
    """One ``features/<set>`` per feature set; the summary adds their accounting."""
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
    return jsonable({**sum_summaries(parts), "feature_sets": figures, "per_set": parts})


def _science(cfg) -> dict:
    d = cfg.model_dump(mode="json", include={"features", "cellprofiler", "outputs", "imagenet_weights"})
    science = {k: d[k] for k in ("features", "cellprofiler", "outputs", "imagenet_weights")}
    # options added later enter only when set, so that finished runs keep their fingerprint
    science["features"] = [{k: v for k, v in f.items() if not (k == "channel_map" and v is None)}
                           for f in science["features"]]
    if cfg.source_run:  # another run's crops (a sweep trial); runs of their own keep their fingerprint
        science["source_run"] = cfg.source_run
    return science


STAGE = Stage("extract", "feature extraction (sites × feature sets)", run_extract, _science, expensive=True,
              section="features")
