"""The labelled screen builder: multi-plate Cell Painting screens made of real cells, with known truth.

The paper's causal graph (Moshkov et al. 2024, Fig. 1B, "Recovering features of treatment
effects"): treatment T → phenotype Y → image O ← confounders C. Each node has a module:

- :mod:`raycp.screens.cells`: real single cells cut out of real 5-channel sites (the shipped
  CellProfiler outlines, or a simple segmentation of our own), and real background patches;
- :mod:`raycp.screens.programs`: T → Y, morphological programs applied to those real cells;
- :mod:`raycp.screens.confounders`: C, plate gain/offset, illumination, well position, focus,
  shot noise, 12-bit camera;
- :mod:`raycp.screens.layout`: plate maps (96/384 wells, replicates spread over plates, controls);
- :mod:`raycp.screens.build`: O, site composition (pure numpy) + the Ray-task adapter + outputs;
- :mod:`raycp.screens.stats`: simple per-site statistics that show the intended structure.

Importing this package imports neither ray nor torch.
"""
