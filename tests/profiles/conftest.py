"""Fixtures for the profiles/evaluation tests: the real data in ../shared/data (skip if absent)
and a literal transcription of the paper's published evaluation code, as the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FIBROSIS = "profiles/fibrosis_singlecell_4plates"
LINCS_TREATMENT = ["Metadata_broad_sample", "Metadata_mmoles_per_liter"]
LINCS_CONTROLS = "Metadata_pert_type == 'control'"


@pytest.fixture(scope="session")
def lincs(lincs_path) -> pd.DataFrame:
    """The real LINCS A549 plate SQ00015054: 384 wells × 454 CellProfiler features."""
    return pd.read_csv(lincs_path)


@pytest.fixture(scope="session")
def fibrosis_files(shared_data) -> list[Path]:
    files = sorted((shared_data / FIBROSIS).glob("*.parquet"))
    if not files:
        pytest.skip(f"{shared_data / FIBROSIS} holds no parquet file")
    return files


@pytest.fixture(scope="session")
def lincs_library(lincs):
    """LINCS treatment profiles (mean of treated wells per compound × dose, annotated only)."""
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    t = lincs[(lincs.Metadata_pert_type != "control") & lincs.Metadata_moa.notna()]
    g = t.groupby(LINCS_TREATMENT)
    return g[feats].mean().to_numpy(), g["Metadata_moa"].first().tolist()


# ------------------------------------------------------------------------------------------
# The published evaluation code (DeepProfilerExperiments profiling/metrics.py and quality.py),
# transcribed loop for loop: the reference the vectorised metrics must reproduce.
# ------------------------------------------------------------------------------------------
def published_match_matrix(annotations, sep="|"):
    toks = [set(a.split(sep)) for a in annotations]
    return np.array([[len(a & b) > 0 for b in toks] for a in toks])


def published_map(S, M, curve=False):
    from sklearn.metrics import precision_recall_curve

    Y_predict = S.copy()
    Y_true = M.copy()
    Y_predict[np.diag_indices(Y_predict.shape[0])] = -1
    Y_true[np.diag_indices(Y_true.shape[0])] = False
    recall_axis = np.linspace(0.0, 1.0, num=Y_true.shape[0])[::-1]
    is_query = Y_true.sum(axis=0) > 1
    aps = np.full(Y_true.shape[0], np.nan)
    precision_axis = []
    for t in range(Y_true.shape[0]):
        if not is_query[t]:
            continue
        precision_t, recall_t, _ = precision_recall_curve(Y_true[t, :], Y_predict[t, :])
        max_precision = np.maximum.accumulate(precision_t)
        interpolated = np.zeros_like(recall_axis)
        j = 0
        for i in range(recall_axis.shape[0]):
            interpolated[i] = max_precision[j]
            while recall_axis[i] < recall_t[j]:
                j += 1
        aps[t] = interpolated.mean()
        precision_axis.append(interpolated[:, np.newaxis])
    if curve:
        return recall_axis, np.mean(np.concatenate(precision_axis, axis=1), axis=1)
    return aps


def published_foe(S, M, percentile=99.0):
    import scipy.stats

    out = np.full(S.shape[0], np.nan)
    for i in range(S.shape[0]):
        if M[i].sum() > 1:
            idx = np.arange(S.shape[1]) != i
            s, m = S[i, idx], M[i, idx]
            threshold = np.percentile(s, percentile)
            v11 = np.sum(np.logical_and(s > threshold, m))
            v12 = np.sum(np.logical_and(s > threshold, np.logical_not(m)))
            v21 = np.sum(np.logical_and(s <= threshold, m))
            v22 = np.sum(np.logical_and(s <= threshold, np.logical_not(m)))
            r = scipy.stats.fisher_exact(np.asarray([[v11, v12], [v21, v22]]), alternative="greater")
            out[i] = v22 if np.isinf(r[0]) else r[0]
    return out
