"""Batch correction with the sphering transform (Moshkov et al. 2024, Methods "Batch correction with
the sphering transform").

Fit on the n control wells C (n × d) only:

    μ = mean(C),  Σ = (C − μ)ᵀ(C − μ) / n,  Σ = U Δ Uᵀ,  Q = U (Δ + λ)^(−1/2) Uᵀ,
    corrected = (X − μ) Q.

This is the ZCA form of the paper's ``WhiteningNormalizer`` (DeepProfilerExperiments
``profiling/profiling.py``). The covariance and its eigendecomposition are computed in float64
(float32 shifts cosine similarities by ~4e-3); the transform is applied in the profiles' dtype.
It works when d > n: directions the controls do not span have Δ = 0 and are scaled by λ^(−1/2).
After sphering, the control covariance is U Δ(Δ + λ)⁻¹ Uᵀ: identity as λ → 0 on the span of the
controls, eigenvalues δ/(δ + λ) (shrunk towards 0 for δ ≲ λ) otherwise.

Note: ``pycytominer``'s ``spherize`` is a different transform (its ε is added to the singular
values and the covariance divides by n − 1), so it is not called here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raycp.errors import InputError


@dataclass(frozen=True)
class Spherer:
    """A fitted sphering transform: ``apply(X) = (X − mean) @ transform``."""

    mean: np.ndarray  # (d,) float64
    transform: np.ndarray  # (d, d) float64, Q = U (Δ + λ)^(-1/2) Uᵀ
    eigenvalues: np.ndarray  # (d,) float64, Δ ascending
    eigenvectors: np.ndarray  # (d, d) float64, U
    lam: float
    n_controls: int

    def apply(self, X: np.ndarray, chunk_rows: int = 1 << 15) -> np.ndarray:
        """Sphere ``X`` (n × d); the result has ``X``'s floating dtype (float32 stays float32).

        Rows go through in chunks, so the only large allocation is the result."""
        X = np.asarray(X)
        dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
        mu = self.mean.astype(dtype, copy=False)
        Q = self.transform.astype(dtype, copy=False)
        out = np.empty((X.shape[0], Q.shape[1]), dtype=dtype)
        for lo in range(0, X.shape[0], chunk_rows):
            hi = min(lo + chunk_rows, X.shape[0])
            np.matmul(X[lo:hi].astype(dtype, copy=False) - mu, Q, out=out[lo:hi])
        return out

    def control_covariance(self) -> np.ndarray:
        """The covariance the sphered controls have in theory: U Δ(Δ + λ)⁻¹ Uᵀ."""
        shrink = np.clip(self.eigenvalues, 0, None) / (np.clip(self.eigenvalues, 0, None) + self.lam)
        return (self.eigenvectors * shrink) @ self.eigenvectors.T


@dataclass(frozen=True)
class ControlEigen:
    """The control wells' covariance eigendecomposition, the part of a sphering fit that does not
    depend on λ: a λ sweep computes it once and rescales its eigenvalues per λ."""

    mean: np.ndarray  # (d,) float64
    eigenvalues: np.ndarray  # (d,) float64, Δ ascending, clipped at 0
    eigenvectors: np.ndarray  # (d, d) float64, U
    n_controls: int

    def spherer(self, lam: float) -> Spherer:
        """The sphering transform for ``lam`` (≥ 0): Q = U (Δ + λ)^(−1/2) Uᵀ."""
        if not (lam >= 0 and np.isfinite(lam)):
            raise InputError(f"sphering λ must be a finite number ≥ 0, not {lam}", fix="pass e.g. --sphere-lambda 0.01")
        with np.errstate(divide="ignore"):
            scale = 1.0 / np.sqrt(self.eigenvalues + lam)
        Q = (self.eigenvectors * scale) @ self.eigenvectors.T
        return Spherer(mean=self.mean, transform=Q, eigenvalues=self.eigenvalues, eigenvectors=self.eigenvectors,
                       lam=float(lam), n_controls=self.n_controls)


def control_eigen(controls: np.ndarray) -> ControlEigen:
    """Mean and eigendecomposition of the control profiles' covariance (n × d → d, d × d), float64.

    Raises :class:`InputError` for no controls or non-finite values."""
    C = np.asarray(controls)
    if C.ndim != 2:
        raise ValueError("controls must be a 2-D array")
    n = C.shape[0]
    if n == 0:
        raise InputError("sphering needs control profiles, but none were given", fix="check the control query / control wells")
    if not np.isfinite(C).all():
        raise InputError("control profiles contain NaN or inf", fix="drop or fix those wells before sphering")
    C64 = C.astype(np.float64, copy=False)  # controls only: small
    mu = C64.mean(axis=0)
    Xc = C64 - mu
    cov = (1.0 / n) * (Xc.T @ Xc)
    s, U = np.linalg.eigh(cov)  # numpy's LAPACK: one BLAS thread pool with the GEMMs
    # Σ is positive semi-definite; round-off leaves its null directions at ≈ −1e-16·max(s), which
    # exceeds λ when features have large scales (CellProfiler areas ~1e4): clip them to 0.
    return ControlEigen(mean=mu, eigenvalues=np.clip(s, 0.0, None), eigenvectors=U, n_controls=n)


def fit_sphere(controls: np.ndarray, lam: float) -> Spherer:
    """Fit the sphering transform on control profiles (n × d), in float64.

    ``lam`` is the paper's regularisation λ (> 0; the paper found 1e-3 to 1e-2 good)."""
    return control_eigen(controls).spherer(lam)


def scope_eigens(
    X: np.ndarray,
    control_mask: np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    eigen: dict | None = None,
) -> dict:
    """Each sphering scope's :class:`ControlEigen`, fitted on the rows where ``control_mask`` is
    true: key None for the whole screen when ``groups`` is None (the paper), else one per group
    label (plate or batch per row). ``eigen`` is filled and returned (scopes already in it are kept):
    a λ sweep decomposes the controls once and rescales per λ. A group without control rows is an
    error naming it."""
    eigen = {} if eigen is None else eigen
    X = np.asarray(X)
    mask = np.asarray(control_mask, dtype=bool)
    if mask.shape != (X.shape[0],):
        raise ValueError("control_mask must have one entry per row of X")
    if not mask.any():
        raise InputError("sphering: no control rows (the control query matched nothing)", fix="check --control-query")
    if groups is None:
        if None not in eigen:
            eigen[None] = control_eigen(X[mask])
        return eigen
    labels = np.asarray(groups)
    if labels.shape != (X.shape[0],):
        raise ValueError("groups must have one label per row of X")
    for g in _unique(labels):
        rows = labels == g
        if not (rows & mask).any():
            raise InputError(
                f"sphering per plate/batch: group {g!r} has no control wells",
                fix="fit one sphering on the whole screen (leave out --sphere-scope-col; in a run config "
                    "profiles.sphere_scope=screen) or add control wells to that plate",
            )
        if g not in eigen:
            eigen[g] = control_eigen(X[rows & mask])
    return eigen


def sphere(
    X: np.ndarray,
    control_mask: np.ndarray,
    lam: float,
    groups: Sequence | np.ndarray | None = None,
    eigen: dict | None = None,
) -> np.ndarray:
    """Sphere profiles ``X`` with a transform fitted on the rows where ``control_mask`` is true.

    Scope: the whole screen when ``groups`` is None (the paper), else one transform per group
    (plate or batch label per row), each fitted on that group's controls (:func:`scope_eigens`,
    which ``eigen`` caches: the result is identical)."""
    X = np.asarray(X)
    eigen = scope_eigens(X, control_mask, groups, eigen)
    if groups is None:
        return eigen[None].spherer(lam).apply(X)
    labels = np.asarray(groups)
    out = np.empty(X.shape, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
    for g in _unique(labels):
        rows = labels == g
        out[rows] = eigen[g].spherer(lam).apply(X[rows])
    return out


def _unique(labels: np.ndarray) -> list:
    seen: dict = {}
    for v in labels.tolist():
        seen.setdefault(v, None)
    return list(seen)
