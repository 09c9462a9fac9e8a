"""Harmony batch correction of well profiles (Moshkov et al. 2024, Methods "Harmony").

Plates are Harmony's batches ("datasets") and wells its "cells"; the paper used 300 clusters for
the compound screens (205 for BBBC037) and ran Harmony alone or after sphering, both on well-level
profiles. ``harmonypy`` does the work; it is imported only when called.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from raycp.errors import InputError


def harmony(
    X: np.ndarray,
    batches: Sequence | np.ndarray,
    n_clusters: int | None = None,
    n_components: int | None = None,
    theta: float = 2.0,
    max_iter: int = 10,
    random_state: int = 0,
) -> np.ndarray:
    """Harmony-corrected profiles (n × k) of ``X`` (n × d) with ``batches`` (one label per row).

    ``n_clusters``: Harmony's k-means clusters (paper: 300; default harmonypy's min(n/30, 100)).
    ``n_components``: project on that many principal components first (Harmony's usual input);
    ``None`` corrects the features themselves (k = d). Returns ``X``'s floating dtype."""
    import harmonypy

    X = np.asarray(X)
    labels = np.asarray(batches)
    if labels.shape != (X.shape[0],):
        raise ValueError("batches must have one label per row of X")
    if pd.isna(labels).any():
        raise InputError("Harmony: some wells have no plate/batch label", fix="fill the batch column")
    n_batches = len(pd.unique(labels))
    if n_batches < 2:
        raise InputError(f"Harmony needs at least 2 plates/batches, got {n_batches}", fix="use sphering alone for one plate")
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    Z = X.astype(np.float64)
    if n_components is not None:
        Z = Z - Z.mean(axis=0)
        _, _, vt = np.linalg.svd(Z, full_matrices=False)
        Z = Z @ vt[:n_components].T
    meta = pd.DataFrame({"batch": pd.Categorical(labels.astype(str))})
    ho = harmonypy.run_harmony(
        Z,
        meta,
        ["batch"],
        theta=theta,
        nclust=n_clusters,
        max_iter_harmony=max_iter,
        random_state=random_state,
        verbose=False,
    )
    out = np.asarray(ho.Z_corr)
    if out.shape != Z.shape:  # older harmonypy returns d × n
        out = out.T
    return out.astype(dtype, copy=False)
