"""Profiles stage: aggregation, sphering, Harmony, treatment effect (Moshkov et al. 2024, Methods).

Pure numpy/pandas; imports neither ray nor torch. The evaluation lives in :mod:`raycp.evaluate`;
``evaluate`` is re-exported here so the Python API has the four pieces in one place.
"""

from __future__ import annotations

from raycp.profiles.aggregate import (
    CellAggregation,
    aggregate,
    aggregate_cells,
    aggregate_treatments,
    aggregate_wells,
)
from raycp.profiles.effect import TreatmentEffect, select_subsets, treatment_effect
from raycp.profiles.harmony import harmony
from raycp.profiles.sphere import Spherer, fit_sphere, sphere

__all__ = [
    "CellAggregation",
    "Spherer",
    "TreatmentEffect",
    "aggregate",
    "aggregate_cells",
    "aggregate_treatments",
    "aggregate_wells",
    "evaluate",
    "fit_sphere",
    "harmony",
    "select_subsets",
    "sphere",
    "treatment_effect",
]


def evaluate(*args, **kwargs):
    """The paper's evaluation of well profiles; see :func:`raycp.evaluate.evaluate`."""
    from raycp.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
