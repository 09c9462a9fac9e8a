"""The image stages of ``raycp run``: illumination functions, compression, nuclei, crops (paper
Methods, "Image preprocessing"); each is :mod:`raycp.preprocess.pipeline`'s stage and resumes per site."""

from __future__ import annotations

from raycp.errors import InputError
from raycp.io.outputs import jsonable
from raycp.stages.base import Context, Stage, not_run


def _run_image_stage(step: str, ctx: Context) -> dict:
    from raycp.preprocess import pipeline

    cfg = ctx.cfg
    index, compressed = pipeline.load_index(cfg.data.index, channels=list(cfg.data.channels))
    if compressed and step in ("illum", "compress"):
        raise InputError(f"{cfg.data.index}: is a compressed index already",
                         fix="give raycp run the original index (16-bit TIFFs)")
    if step == "illum" and not cfg.illumination.enabled:
        return not_run("illumination.enabled=false")
    fn = {"illum": pipeline.run_illumination, "compress": pipeline.run_compression,
          "nuclei": pipeline.run_nuclei, "crops": pipeline.run_crops}[step]
    kwargs = {"compressed_input": compressed} if step in ("nuclei", "crops") else {}
    return jsonable(fn(cfg, index, progress=ctx.progress, **kwargs).summary)


def _image_stage(name: str, title: str, section: str) -> Stage:
    def run(ctx: Context) -> dict:
        return _run_image_stage(name, ctx)

    def science(cfg) -> dict:
        return getattr(cfg, section).model_dump(mode="json")

    run.__name__ = f"run_{name}"
    run.__doc__ = f"The image stage {name!r} (:mod:`raycp.preprocess.pipeline`); resumes per site."
    return Stage(name, title, run, science, expensive=True, section=section)


STAGES = (
    _image_stage("illum", "illumination functions", "illumination"),
    _image_stage("compress", "compression (PNG)", "compression"),
    _image_stage("nuclei", "nuclei", "nuclei"),
    _image_stage("crops", "single-cell crops", "crops"),
)
