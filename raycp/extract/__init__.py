"""Feature extraction for whole screens (paper Methods, "Feature extraction").

- :mod:`~raycp.extract.models`: the extractors — a trained checkpoint, the ImageNet baseline
  (:mod:`~raycp.extract.imagenet`), a random-init floor — loaded once, forward on a batch;
- :mod:`~raycp.extract.cellprofiler`: the CellProfiler baseline with cp-measure;
- :mod:`~raycp.extract.sources`: a site's crops, from the crops stage's shards or its images;
- :mod:`~raycp.extract.writers`: per-cell Parquet, site medians, DeepProfiler npz;
  :mod:`~raycp.io.npz` reads and writes DeepProfiler's npz files;
- :mod:`~raycp.extract.pipeline`: the Ray Data adapters (decode tasks → model actor pool →
  write tasks) and the driver :func:`~raycp.extract.pipeline.run_extract`.

Python API::

    from raycp.extract import extract
    result = extract("run.yaml", ["model.kind=imagenet", "model.path=/weights/b0.pth"])
    result.summary        # processed / quarantined / cells / cells_per_s ...

Importing this package imports neither ray nor torch.
"""

from __future__ import annotations


def extract(config=None, overrides: list[str] | None = None, *, progress=None):
    """Run the extraction stage from a YAML path (+ ``--set``-style overrides) or an ``ExtractConfig``.

    An entry point (like ``raycp extract``): the cluster is the one this process is connected to,
    else the config's ``compute`` (``ray_address`` > ``RAY_ADDRESS`` > a local cluster), connected
    on first need (:func:`raycp.runtime.use`)."""
    from raycp import runtime
    from raycp.extract.config import ExtractConfig, load_extract_config
    from raycp.extract.pipeline import run_extract

    cfg = config if isinstance(config, ExtractConfig) else load_extract_config(config, overrides)
    runtime.use(cfg.compute)
    return run_extract(cfg, progress=progress)


__all__ = ["extract"]
