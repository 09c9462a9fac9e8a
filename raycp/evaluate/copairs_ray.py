"""Ray adapter of :mod:`raycp.evaluate.copairs_map`: the AP blocks (one per plate for activity,
row blocks for consistency) and the null distributions (one per (M, L) configuration) spread over
the cluster's CPUs. The core computes every block and every null independently of the others, so
the numbers are the same as on one machine, bit for bit.

Same signatures as the core's ``average_precision`` / ``mean_average_precision``; pass this module
as ``backend`` to :func:`raycp.evaluate.copairs_map.retrieval_of_wells` (``raycp profile map
--ray``). Connects through :func:`raycp.runtime.connection` (an entry point chooses the cluster).
The multi-label AP (consistency with several targets per profile) runs on the driver.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from raycp.evaluate import copairs_map as core


def _parts(parts: int | None) -> int:
    from raycp import runtime

    return int(parts) if parts else max(1, int(runtime.cluster_cpus()) * 2)


def average_precision(
    meta: pd.DataFrame,
    X: np.ndarray,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str],
    neg_sameby: Sequence[str],
    neg_diffby: Sequence[str],
    *,
    multilabel_col: str | None = None,
    multilabel_sep: str | None = None,
    block_elements: int = 1 << 22,
    parts: int | None = None,
    source: str = "profiles",
) -> pd.DataFrame:
    """:func:`raycp.evaluate.copairs_map.average_precision` with its blocks split into ``parts``
    Ray tasks (default: 2 per cluster CPU); the same table."""
    if multilabel_col is not None:
        return core.average_precision(meta, X, pos_sameby, pos_diffby, neg_sameby, neg_diffby,
                                      multilabel_col=multilabel_col, multilabel_sep=multilabel_sep,
                                      block_elements=block_elements, source=source)
    from raycp import runtime

    rules = core.PairRules(tuple(pos_sameby), tuple(pos_diffby), tuple(neg_sameby), tuple(neg_diffby))
    X, codes, norms = core.prepare(meta, X, rules, source)
    ray = runtime.connection()
    k = _parts(parts)
    shared = [ray.put(X), ray.put(norms), ray.put(codes)]
    task = ray.remote(num_cpus=1)(core.ap_part)
    results = ray.get([task.remote(*shared, rules, block_elements, (i, k)) for i in range(k)])
    q, ap, M, L = (np.concatenate([r[j] for r in results]) for j in range(4))
    return core.ap_table(meta, q, ap, M, L)


def ray_nulls(jobs: list[tuple[int, int, int, int]], parts: int | None = None) -> list[np.ndarray]:
    """copairs' null distributions of ``jobs`` ((M, L, null_size, seed) each), computed in Ray
    tasks, returned in the order of ``jobs``."""
    from raycp import runtime

    if not jobs:
        return []
    ray = runtime.connection()
    k = min(_parts(parts), len(jobs))
    task = ray.remote(num_cpus=1)(core.null_distributions)
    chunks = [jobs[i::k] for i in range(k)]
    results = ray.get([task.remote(chunk) for chunk in chunks])
    out: list = [None] * len(jobs)
    for i, res in enumerate(results):
        out[i::k] = res
    return out


def mean_average_precision(ap_scores: pd.DataFrame, sameby, null_size: int = core.DEFAULT_NULL_SIZE,
                           threshold: float = core.DEFAULT_THRESHOLD, seed: int = core.DEFAULT_SEED) -> pd.DataFrame:
    """:func:`raycp.evaluate.copairs_map.mean_average_precision` with the nulls computed in Ray tasks."""
    return core.mean_average_precision(ap_scores, sameby, null_size, threshold, seed, null_fn=ray_nulls)
