"""Biological matching metrics at treatment level (Moshkov et al. 2024, Methods "Evaluation metrics").

A library of N annotated treatment profiles is searched with each treatment in turn
(leave-one-treatment-out) by cosine similarity; a library item matches the query when the two share
at least one annotation (annotations split on a separator, default ``|``; blanks around a token are
stripped; then exact token equality).

* **Folds of enrichment** (the paper's code, ``quality.enrichment_analysis``): queries are the
  treatments with ≥ 1 other match. On the query's row without itself, threshold = the 99th
  percentile (numpy's linear interpolation); 2 × 2 table (similarity > threshold) × (match);
  one-sided Fisher exact test (greater); odds ratio v11·v22/(v12·v21) and, where it is infinite,
  v22 (the paper's convention). FoE = the mean odds ratio over queries (undefined ones, scipy's
  NaN for an empty margin, are skipped and counted, as pandas' mean does). Per-query p-values
  and the number significant after Benjamini–Hochberg are reported too.
* **mAP, paper's code** (``metrics.interpolated_precision_recall_curve``): queries are the
  treatments with ≥ 2 other matches. Each row keeps the query itself as a non-match of similarity
  −1 (the published code's self suppression). The precision–recall curve has one point per
  distinct similarity (sklearn's ``precision_recall_curve`` ≥ 1.3, ties grouped, every
  threshold kept) plus the final point precision 1 / recall 0, ordered by decreasing recall
  R_0 = 1 … R_K = 0 with precisions P_k and M_k = max(P_0..P_k). On the grid
  g = ``numpy.linspace(0.0, 1.0, N)[::-1]`` a pointer j from 0 gives value_i = M_j and then
  advances while g_i < R_j. AP = mean of value_i; ``map_paper`` = mean AP over queries.
  Note: the published numbers come from today's sklearn, whose curve no longer stops at full
  recall (sklearn < 1.3 truncated it there): with truncation the LINCS check would give
  0.263157 instead of the published 0.262665, so every threshold is kept here, and the recall-1
  end of the walk takes the precision of the lowest threshold (P/N, the query counted as a
  non-match as in the published code).
* **AP** (non-interpolated, = sklearn ``average_precision_score`` = copairs' AP on single-label
  annotations without ties): Σ_k (R_k − R_{k−1}) P_k over the distinct thresholds; its mean over
  queries with ≥ 1 other match is ``map``.
* precision@k / recall@k, and first hit in the top 1% (the paper's "first hits": the rank of the
  first match, as a percentage of N, is ≤ 1).

Everything is vectorised over blocks of query rows (about ``block_elements`` similarities each,
bounded memory): one similarity GEMM, one 99th-percentile partition and one argsort per block;
the curves are then evaluated only where they change (at the tied groups holding matches), with
cumulative sums and bincounts; no Python loop over queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.stats

DEFAULT_SEP = "|"
FOE_PERCENTILE = 99.0
TOP_PERCENT = 1.0


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def annotation_tokens(annotations: Sequence, sep: str = DEFAULT_SEP) -> scipy.sparse.csr_matrix:
    """N × V sparse indicator of the annotation tokens of each item (split on ``sep``, blanks
    around each token stripped, so ``kinase | hsp90`` is ``kinase`` and ``hsp90``; empty tokens
    ignored). Missing annotations give an empty row."""
    s = pd.Series(list(annotations), dtype=object)
    tokens = s.where(s.notna(), "").astype(str).str.split(sep, regex=False).explode().str.strip()
    tokens = tokens[tokens.astype(str) != ""]
    rows = tokens.index.to_numpy(dtype=np.int64)
    cols, vocab = pd.factorize(tokens.to_numpy())
    data = np.ones(len(rows), dtype=np.float32)
    m = scipy.sparse.csr_matrix((data, (rows, cols)), shape=(len(s), max(len(vocab), 1)))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def match_matrix(annotations: Sequence, sep: str = DEFAULT_SEP) -> np.ndarray:
    """N × N bool: items i and j share at least one annotation token (diagonal included)."""
    t = annotation_tokens(annotations, sep)
    return (t @ t.T).toarray() > 0


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as sklearn's ``normalize`` does (zero rows stay zero)."""
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    norms[norms == 0.0] = 1.0
    return X / norms[:, np.newaxis]


def cosine_similarity(X: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of the rows of ``X`` (and ``Y``), as sklearn computes it, in X's dtype."""
    Xn = normalize_rows(X)
    Yn = Xn if Y is None else normalize_rows(Y)
    return Xn @ Yn.T


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values, NaN staying NaN, with statsmodels' ``fdr_bh``
    arithmetic (p_(i)/(i/n), running minimum from the top, capped at 1): the corrected p-values
    copairs reports, bit for bit (scipy's ``false_discovery_control`` agrees to the last bit or so)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok):
        v = p[ok]
        order = np.argsort(v)
        ecdf = np.arange(1, len(v) + 1) / float(len(v))
        adj = np.minimum.accumulate((v[order] / ecdf)[::-1])[::-1]
        adj[adj > 1] = 1
        res = np.empty_like(adj)
        res[order] = adj
        out[ok] = res
    return out


# --------------------------------------------------------------------------------------------
# The vectorised evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Summary metrics, one row per library treatment (in library order), and the interpolated
    precision–recall curve (mean over mAP queries of the paper's interpolated precision)."""

    summary: dict
    queries: pd.DataFrame
    pr_curve: pd.DataFrame = field(default_factory=pd.DataFrame)


def _tie_extent(S: np.ndarray, order: np.ndarray, rr: np.ndarray, pos: np.ndarray, step: int) -> np.ndarray:
    """Walk from sorted positions ``pos`` (rows ``rr``) while the similarity stays equal: the end
    (step +1) or start (step −1) of each one's group of tied similarities."""
    N = S.shape[1]
    score = S[rr, order[rr, pos]]
    out = pos.copy()
    live = np.flatnonzero((out + step >= 0) & (out + step < N))
    while live.size:
        nxt = out[live] + step
        same = S[rr[live], order[rr[live], nxt]] == score[live]
        live = live[same]
        out[live] += step
        live = live[(out[live] + step >= 0) & (out[live] + step < N)]
    return out


def _segmented_suffix_max(values: np.ndarray, seg: np.ndarray, n_seg: int) -> np.ndarray:
    """For each item, the max of ``values`` over the items at or after it within its segment
    (items sorted by segment)."""
    first = np.searchsorted(seg, np.arange(n_seg))
    idx = np.arange(len(values)) - first[seg]
    width = int(idx.max()) + 1 if len(values) else 1
    pad = np.full((n_seg, width), -np.inf)
    pad[seg, idx] = values
    pad = np.maximum.accumulate(pad[:, ::-1], axis=1)[:, ::-1]
    return pad[seg, idx]


def _block(
    Xn: np.ndarray,
    T: scipy.sparse.csr_matrix,
    r0: int,
    r1: int,
    grid: np.ndarray,
    percentile: float,
    ks: Sequence[int],
) -> dict:
    """All per-query quantities for query rows r0:r1 (see the module docstring).

    Dense work: the similarity GEMM, the 99th percentile, one argsort. Everything else works on the
    matches only: the precision–recall curve of a row changes only at the groups of tied
    similarities that hold a match, so the interpolated and the standard AP are sums over those
    groups (at most the number of matches per row)."""
    N = Xn.shape[0]
    B = r1 - r0
    rows = np.arange(B)
    cols = r0 + rows
    S = Xn[r0:r1] @ Xn.T
    M = (T[r0:r1] @ T.T).toarray() > 0
    M[rows, cols] = False
    npos = M.sum(axis=1).astype(np.int64)

    # Folds of enrichment: the row without the query itself.
    keep = np.ones((B, N), dtype=bool)
    keep[rows, cols] = False
    S_ns = S[keep].reshape(B, N - 1)
    thr = np.percentile(S_ns, percentile, axis=1)
    n_above = (S_ns > thr[:, np.newaxis]).sum(axis=1).astype(np.int64)
    del S_ns, keep

    # Ranking: the published code's self suppression (similarity −1, non-match).
    S[rows, cols] = -1
    order = np.argsort(-S, axis=1)
    m = np.take_along_axis(M, order, axis=1)
    del M
    rr, cc = np.nonzero(m)  # matches, by row then by rank position
    del m
    n_low = N - (S > -1).sum(axis=1)  # rows where something besides the query sits at ≤ −1
    self_pos = N - n_low  # position of the query itself (exact when it alone is ≤ −1)
    odd = np.flatnonzero(n_low > 1)
    if odd.size:
        self_pos[odd] = np.argmax(order[odd] == cols[odd, np.newaxis], axis=1)

    score = S[rr, order[rr, cc]]
    v11 = np.bincount(rr, weights=score > thr[rr], minlength=B).astype(np.int64)
    v12 = n_above - v11
    v21 = npos - v11
    v22 = (N - 1) - npos - v12

    # Groups of tied similarities holding matches: start a, end e, matches up to and in them.
    e = _tie_extent(S, order, rr, cc, +1)
    a = _tie_extent(S, order, rr, cc, -1)
    del S, order
    new = np.ones(len(rr), dtype=bool)
    new[1:] = (rr[1:] != rr[:-1]) | (e[1:] != e[:-1])
    g_first = np.flatnonzero(new)
    g_row, g_a, g_e, g_score = rr[g_first], a[g_first], e[g_first], score[g_first]
    g_count = np.diff(np.append(g_first, len(rr)))
    row_start = np.searchsorted(rr, np.arange(B))  # first match of each row
    tp = np.cumsum(g_count) - np.append(0, np.cumsum(g_count))[np.searchsorted(g_row, np.arange(B))][g_row]
    tp_prev = tp - g_count
    P = npos[g_row].astype(np.float64)

    # Standard AP (sklearn): Σ ΔR·precision at each group end, the query itself not counted.
    rank_ns = g_e + 1 - (g_score <= -1)
    ap = np.bincount(g_row, weights=(g_count / P) * (tp / rank_ns), minlength=B).astype(np.float64)

    # Paper's interpolated AP: the segment of the recall grid [tp_prev/P, tp/P) takes the
    # max precision over the curve points of recall ≥ tp_prev/P, i.e. the group end just before
    # the group (precision tp_prev/a) and the ends of this and later groups (tp/(e+1)); a
    # leading group of matches (a = 0) takes the final point's precision 1. Recall 1 (the grid's
    # first value) and the walk's first value take the last point's precision P/N.
    later = _segmented_suffix_max(tp / (g_e + 1), g_row, B)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(g_a > 0, np.maximum(tp_prev / np.where(g_a > 0, g_a, 1), later), 1.0)
    lo = np.searchsorted(grid, tp_prev / P, side="left")
    hi = np.searchsorted(grid, tp / P, side="left")
    ap_paper = (2.0 * npos / N + np.bincount(g_row, weights=value * (hi - lo), minlength=B)) / N

    is_map = npos >= 2
    q = is_map[g_row]
    # float64 even when this block holds no mAP query (an empty bincount is int64)
    curve = (np.bincount(N - hi[q], weights=value[q], minlength=N + 1).astype(np.float64)
             - np.bincount(N - lo[q], weights=value[q], minlength=N + 1))
    curve = np.cumsum(curve)[:N]
    curve[:2] += (npos[is_map] / N).sum()

    has = npos > 0
    first = np.where(has, cc[np.minimum(row_start, max(len(cc) - 1, 0))] if len(cc) else 0, 0)
    out = {
        "n_matches": npos,
        "threshold": thr,
        "v11": v11,
        "v12": v12,
        "v21": v21,
        "v22": v22,
        "ap_paper": ap_paper,
        "ap": ap,
        "first_hit_rank": first + 1 - (self_pos < first),
        "curve_sum": curve,
    }
    for k in ks:
        kk = min(int(k), N - 1)
        at = kk - 1 + (self_pos <= kk - 1)  # position of the k-th item other than the query
        tpk = np.bincount(rr, weights=cc <= at[rr], minlength=B)
        out[f"precision_at_{k}"] = tpk / kk
        out[f"recall_at_{k}"] = tpk / np.maximum(npos, 1)
    return out


def evaluate_profiles(
    X: np.ndarray,
    annotations: Sequence,
    sep: str = DEFAULT_SEP,
    percentile: float = FOE_PERCENTILE,
    ks: Sequence[int] = (1, 5, 10),
    top_percent: float = TOP_PERCENT,
    alpha: float = 0.05,
    block_elements: int = 1 << 21,
) -> Evaluation:
    """All metrics for a library of treatment profiles ``X`` (N × d) with their ``annotations``.

    Every item must be annotated (unannotated treatments and controls are not in the library; the
    caller removes and counts them). Similarities are computed in X's dtype (float64 reproduces the
    published numbers)."""
    X = np.asarray(X)
    N = X.shape[0]
    if len(annotations) != N:
        raise ValueError("one annotation per profile is needed")
    if N < 3:
        raise ValueError("the library needs at least 3 treatments")
    T = annotation_tokens(annotations, sep)
    if (np.diff(T.indptr) == 0).any():
        raise ValueError("every library item needs an annotation")
    Xn = normalize_rows(X)
    grid = np.linspace(0.0, 1.0, N)[::-1][: N - 1][::-1]  # g_0..g_{N-2}, ascending
    B = max(1, min(N, block_elements // N))
    parts = [_block(Xn, T, r0, min(r0 + B, N), grid, percentile, ks) for r0 in range(0, N, B)]
    curve_sum = np.sum([p.pop("curve_sum") for p in parts], axis=0)
    q = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    # Folds of enrichment, vectorised Fisher exact test (scipy.stats.fisher_exact semantics).
    v11, v12, v21, v22 = (q[c].to_numpy() for c in ("v11", "v12", "v21", "v22"))
    empty_margin = (v11 + v12 == 0) | (v21 + v22 == 0) | (v11 + v21 == 0) | (v12 + v22 == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = np.where((v21 > 0) & (v12 > 0), (v11 * v22) / np.where(v21 * v12 > 0, v21 * v12, 1), np.inf)
    odds = np.where(empty_margin, np.nan, odds)
    pval = scipy.stats.hypergeom.cdf(v12, v11 + v12 + v21 + v22, v11 + v12, v12 + v22)
    pval = np.where(empty_margin, 1.0, np.minimum(pval, 1.0))
    is_foe = q["n_matches"].to_numpy() >= 1
    is_map = q["n_matches"].to_numpy() >= 2
    q["is_query_foe"] = is_foe
    q["is_query_map"] = is_map
    q["odds_ratio_fisher"] = odds
    q["odds_ratio"] = np.where(np.isinf(odds), v22.astype(np.float64), odds)
    q["p_value"] = np.where(is_foe, pval, np.nan)
    q["p_adjusted_bh"] = np.nan
    q.loc[is_foe, "p_adjusted_bh"] = benjamini_hochberg(q.loc[is_foe, "p_value"].to_numpy())
    q.loc[~is_map, "ap_paper"] = np.nan
    for c in ["ap", "first_hit_rank", *[c for c in q.columns if c.startswith(("precision_at_", "recall_at_"))]]:
        q[c] = np.where(is_foe, q[c].to_numpy(dtype=np.float64), np.nan)
    q.loc[~is_foe, ["odds_ratio", "odds_ratio_fisher", "threshold"]] = np.nan
    q["first_hit_percent"] = q["first_hit_rank"] / N * 100.0

    foe_or = q.loc[is_foe, "odds_ratio"].to_numpy()
    n_map = int(is_map.sum())
    summary = {
        "map_paper": float(q.loc[is_map, "ap_paper"].mean()) if n_map else float("nan"),
        "map": float(q.loc[is_foe, "ap"].mean()) if is_foe.any() else float("nan"),
        "folds_of_enrichment": float(np.nanmean(foe_or)) if np.isfinite(foe_or).any() else float("nan"),
        "n_treatments": int(N),
        "n_queries_map": n_map,
        "n_queries_foe": int(is_foe.sum()),
        "n_queries_foe_undefined": int(np.isnan(foe_or).sum()),
        "n_queries_foe_significant_bh": int((q.loc[is_foe, "p_adjusted_bh"] < alpha).sum()),
        "foe_alpha": alpha,
        "foe_percentile": percentile,
        "n_first_hit_top_percent": int((q.loc[is_foe, "first_hit_percent"] <= top_percent).sum()),
        "first_hit_top_percent": top_percent,
    }
    for k in ks:
        summary[f"precision_at_{k}"] = float(q.loc[is_foe, f"precision_at_{k}"].mean())
        summary[f"recall_at_{k}"] = float(q.loc[is_foe, f"recall_at_{k}"].mean())
    recall_axis = np.linspace(0.0, 1.0, N)[::-1]
    precision = curve_sum / n_map if n_map else np.full(len(recall_axis), np.nan)  # no mAP query: undefined
    curve = pd.DataFrame({"recall": recall_axis, "precision": precision})
    return Evaluation(summary=summary, queries=q, pr_curve=curve)


# --------------------------------------------------------------------------------------------
# The paper's metrics one by one (thin wrappers over evaluate_profiles)
# --------------------------------------------------------------------------------------------
def map_paper(X: np.ndarray, annotations: Sequence, sep: str = DEFAULT_SEP) -> float:
    """Mean interpolated average precision exactly as the paper's published evaluation code."""
    return evaluate_profiles(X, annotations, sep).summary["map_paper"]


def average_precision(X: np.ndarray, annotations: Sequence, sep: str = DEFAULT_SEP) -> np.ndarray:
    """Non-interpolated AP of each item (NaN where it has no other match)."""
    return evaluate_profiles(X, annotations, sep).queries["ap"].to_numpy()


def folds_of_enrichment(
    X: np.ndarray, annotations: Sequence, sep: str = DEFAULT_SEP, percentile: float = FOE_PERCENTILE
) -> float:
    """Mean odds ratio of the top-1% enrichment test over queries (the paper's folds of enrichment)."""
    return evaluate_profiles(X, annotations, sep, percentile=percentile).summary["folds_of_enrichment"]


def precision_at_k(X: np.ndarray, annotations: Sequence, k: int, sep: str = DEFAULT_SEP) -> np.ndarray:
    """Precision among the k most similar other items, per item (NaN where no other match)."""
    return evaluate_profiles(X, annotations, sep, ks=(k,)).queries[f"precision_at_{k}"].to_numpy()


def recall_at_k(X: np.ndarray, annotations: Sequence, k: int, sep: str = DEFAULT_SEP) -> np.ndarray:
    """Fraction of an item's matches found among its k most similar other items."""
    return evaluate_profiles(X, annotations, sep, ks=(k,)).queries[f"recall_at_{k}"].to_numpy()


def first_hits_in_top(X: np.ndarray, annotations: Sequence, percent: float = TOP_PERCENT, sep: str = DEFAULT_SEP) -> int:
    """Number of queries whose first match ranks within the top ``percent`` % of the library."""
    return evaluate_profiles(X, annotations, sep, top_percent=percent).summary["n_first_hit_top_percent"]
