"""Images to single-cell crops (paper Methods, "image preprocessing" and "single-cell crops").

Pure numpy cores, one per step, callable with no cluster:

- :mod:`~raycp.preprocess.illumination`: per plate × channel illumination function (25 % scale,
  median disk r=12, 2nd-percentile robust minimum) and its correction;
- :mod:`~raycp.preprocess.compress`: 0.05/99.95 percentile stretch, 16→8 bit, lossless PNG;
- :mod:`~raycp.preprocess.nuclei`: nuclei centres detected on the DNA channel;
- :mod:`~raycp.preprocess.locations`: importers of nuclei centres made by CellProfiler;
- :mod:`~raycp.preprocess.crops`: 128×128 crops centred on each nucleus, Parquet shards + reader.

:mod:`~raycp.preprocess.pipeline` streams a screen's sites through them with Ray Data and
:mod:`~raycp.preprocess.cli` exposes one verb per stage. Importing this package imports no Ray.
"""
