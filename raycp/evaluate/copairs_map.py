"""copairs' average precision, mAP and p-values, computed block by block (copairs 0.5.5, ``copairs.map``).

The JUMP papers report *phenotypic activity* (can a perturbation's replicate wells be told from the
negative-control wells of their plates?) and *phenotypic consistency* (do perturbations sharing a
target or MoA retrieve each other?) as copairs' mAP with permutation p-values, and the *fraction
retrieved* (the share of perturbations whose corrected p-value is below 0.05). This module gives
copairs' numbers and column names without copairs' pair lists: similarities are computed one block
of query profiles at a time against the candidates the pair rules allow (the query's plate for
activity, every profile for consistency), so memory is bounded by ``block_elements``.

**Pairs** (``copairs.matching.find_pairs``): profiles i ≠ j form a positive pair when they are equal
in every ``pos_sameby`` column and different in every ``pos_diffby`` column; negative pairs likewise
with ``neg_sameby`` / ``neg_diffby``. With ``multilabel_col`` (``copairs.map.multilabel``), that
column holds several labels per profile (a list, or text split on ``multilabel_sep``): in a sameby
list it means "share at least one label", in a diffby list "share none", and AP is computed per
(profile, shared label).

**AP** (``copairs.map.average_precision``): the rank list of profile i holds every j it is paired
with, ordered by decreasing similarity; copairs sorts on the float32 key ``1 − s`` (s stored in
float32), and among equal keys positives come first (a stable sort of positives-then-negatives).
AP = Σ_m (m / k_m) / M over the M positives, where k_m is the rank of the m-th positive; the sum is
``np.add.reduceat`` over the whole rank list (zeros at the negatives), as copairs sums it, so AP is
equal bit for bit (``np.add.reduce`` differs from ``reduceat`` in the last bit). ``n_pos_pairs`` = M, ``n_total_pairs`` = list length; AP is NaN without positives.
``normalized_average_precision`` = (AP − μ₀)/(1 − μ₀) clipped to [−1, 1], μ₀ the expected AP of a
random ranking (``copairs.map.normalization``).

**Similarity precision.** raycp computes the cosine similarity in float64 (a GEMM of rows divided by
their norms) and stores it in float32, as copairs stores it. copairs computes it in the features'
dtype: on float64 features the two agree bit for bit (except at a float32 rounding boundary); on
float32 features copairs' own float32 arithmetic is ~1e-7 off, which can swap near-ties.

**mAP and p-values** (``copairs.map.mean_average_precision``): profiles with AP and ≥ 1 positive are
grouped by ``sameby``; mAP = the group's mean AP (pandas' groupby mean, as copairs). The null of a
profile with (M, L) is ``null_size`` random APs: for each distinct (M, L), sorted, a seed drawn by
``default_rng(seed).integers(8096)`` in that order, then ``rng.permuted`` of 0..L−1 per sample, the
first M ranks sorted, AP in float32 (``copairs.compute.random_ap``). A group's null is the mean of
its members' nulls (float32); p = (#{null > mAP} + 1) / (null_size + 1), compared in float32 as
copairs compares (a mAP of 1/7 equal to a null value is not exceeded). ``corrected_p_value`` is
Benjamini–Hochberg (statsmodels' ``fdr_bh`` arithmetic); ``below_p`` / ``below_corrected_p`` are
p < ``threshold``.

**A copairs defect not reproduced.** copairs caches each (M, L) null on disk
(``~/.copairs/seed{seed}/ns{null_size}/n{L}_k{M}.npy``) but the seed that made it depends on the
position of (M, L) among the distinct configurations *of the call that first wrote it*, so copairs'
p-values depend on what ran before on the machine. raycp gives copairs' result with an empty cache
(what a first run gives) and writes nothing to $HOME. copairs' ``indices`` column (row positions in
its filtered AP table) is not written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycp.errors import InputError
from raycp.evaluate.metrics import benjamini_hochberg
from raycp.profiles.aggregate import group_rows
from raycp.profiles.io import require_columns

NULL_SEED_HIGH = 8096  # copairs.compute.get_null_dists: rng.integers(8096, size=num_confs)
DEFAULT_NULL_SIZE = 10_000  # jump-profiling-recipe DEFAULT_MAP_PARAMS
DEFAULT_THRESHOLD = 0.05
DEFAULT_SEED = 0
MAP_COLUMNS = ("mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value",
               "below_p", "below_corrected_p")


@dataclass(frozen=True)
class PairRules:
    """copairs' pair rules: positive pairs are equal in every ``pos_sameby`` column and differ in
    every ``pos_diffby`` column; negative pairs likewise. ``multilabel_col`` (in one of the lists)
    holds several labels per profile (see the module docstring)."""

    pos_sameby: tuple[str, ...]
    pos_diffby: tuple[str, ...]
    neg_sameby: tuple[str, ...]
    neg_diffby: tuple[str, ...]
    multilabel_col: str | None = None

    def __post_init__(self):
        for name in ("pos_sameby", "pos_diffby", "neg_sameby", "neg_diffby"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        for kind in ("pos", "neg"):
            same, diff = getattr(self, f"{kind}_sameby"), getattr(self, f"{kind}_diffby")
            if not (same or diff):
                raise InputError(f"{kind}itive pairs need at least one {kind}_sameby or {kind}_diffby column",
                                 fix=f"pass e.g. {kind}_sameby=['Metadata_Plate']")
            both = set(same) & set(diff)
            if both:
                raise InputError(f"column {sorted(both)[0]!r} is in both {kind}_sameby and {kind}_diffby",
                                 fix="a column can either be shared or differ within a pair, not both")
        if self.multilabel_col is not None and self.multilabel_col not in self.columns:
            raise InputError(f"multilabel column {self.multilabel_col!r} is in no pair rule",
                             fix="add it to pos_sameby (pairs sharing a label) and neg_diffby (pairs sharing none)")

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for c in (*self.pos_sameby, *self.pos_diffby, *self.neg_sameby, *self.neg_diffby):
            seen.setdefault(c, None)
        return list(seen)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _codes(meta: pd.DataFrame, rules: PairRules, source: str) -> dict[str, np.ndarray]:
    require_columns(meta, rules.columns, source, what="pair column")
    codes = {}
    for c in rules.columns:
        if c == rules.multilabel_col:
            continue
        col = meta[c]
        if col.isna().any():
            raise InputError(f"{source}: pair column {c!r} is empty in {int(col.isna().sum())} row(s) (first: row "
                             f"{int(np.flatnonzero(col.isna().to_numpy())[0])})",
                             fix="fill it (copairs refuses null metadata too) or drop those rows")
        codes[c] = pd.factorize(col, sort=False)[0].astype(np.int64)
    return codes


def _labels(meta: pd.DataFrame, col: str, sep: str | None, source: str) -> tuple[list[list], list]:
    """Per row, its labels (list); and the sorted vocabulary."""
    rows = []
    for i, v in enumerate(meta[col].tolist()):
        if isinstance(v, str):
            items = [t.strip() for t in v.split(sep)] if sep is not None else [v]
            items = [t for t in items if t]
        elif v is None or (isinstance(v, float) and np.isnan(v)):
            raise InputError(f"{source}: multilabel column {col!r} is empty in row {i}",
                             fix="fill it or drop the row")
        else:
            items = list(v)
        rows.append(list(dict.fromkeys(items)))
    vocab = sorted({t for r in rows for t in r})
    return rows, vocab


def _unit_rows(X: np.ndarray, source: str, meta: pd.DataFrame | None = None) -> np.ndarray:
    """Row norms (float64) after checking the features are finite and no row is all zero."""
    if X.ndim != 2:
        raise ValueError("features must be a 2-D array (profiles × features)")
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise InputError(f"{source}: {_row_name(meta, bad)} has NaN or inf features",
                         fix="drop or impute those rows first (copairs refuses NaN features too)")
    norms = np.empty(len(X), dtype=np.float64)
    for lo in range(0, len(X), 1 << 14):
        blk = X[lo:lo + (1 << 14)].astype(np.float64, copy=False)
        norms[lo:lo + len(blk)] = np.linalg.norm(blk, axis=1)
    if (norms == 0).any():
        raise InputError(f"{source}: {_row_name(meta, int(np.flatnonzero(norms == 0)[0]))} has all-zero features, "
                         "so no cosine similarity", fix="drop those rows")
    return norms


def _keys(X: np.ndarray, norms: np.ndarray, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """copairs' sort key ``1 − s`` in float32 for queries ``q`` × candidates ``c`` (s: cosine, float64 → float32)."""
    A = X[q].astype(np.float64) / norms[q, None]
    B = X[c].astype(np.float64) / norms[c, None]
    s = (A @ B.T).astype(np.float32)
    return np.float32(1.0) - s


def _rule_mask(codes: dict, same: Sequence[str], diff: Sequence[str], q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Queries ``q`` × candidates ``c`` satisfying a pair rule (:func:`_pair_rule` broadcast)."""
    return _pair_rule(codes, same, diff, q[:, None], c[None, :])


# --------------------------------------------------------------------------------------------
# AP from sort keys
# --------------------------------------------------------------------------------------------
def _ap_rows(pos_keys: list[np.ndarray], neg_sorted: np.ndarray, n_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP, M and L per row from each row's positive keys and its sorted negative keys (first n_neg[r]
    entries of row r of ``neg_sorted``), with copairs' tie rule (positives before equal negatives)
    and its arithmetic: the rank lists (precision at each positive, 0 at the negatives) laid end to
    end and summed by ``np.add.reduceat``, as ``copairs.compute.ap_contiguous`` sums them.

    Vectorised over rows: (row, key) pairs become one sortable 64-bit code, so one sort orders the
    positives and one ``searchsorted`` counts the negatives ranked before each."""
    from raycp.profiles.ops import sortable_bits

    B = len(pos_keys)
    M = np.array([len(p) for p in pos_keys], dtype=np.int64)
    L = M + n_neg
    ap = np.full(B, np.nan)
    if B == 0 or not M.any():
        return ap, M, L
    shift = np.uint64(32)
    row = np.repeat(np.arange(B, dtype=np.uint64), M)
    pos = np.sort((row << shift) | sortable_bits(np.concatenate(pos_keys)))
    valid = np.arange(neg_sorted.shape[1])[None, :] < n_neg[:, None]
    nrow = np.broadcast_to(np.arange(B, dtype=np.uint64)[:, None], neg_sorted.shape)[valid]
    neg = (nrow << shift) | sortable_bits(neg_sorted[valid])  # row-major: already sorted
    neg_start = np.concatenate([[0], np.cumsum(n_neg)[:-1]])
    pos_start = np.concatenate([[0], np.cumsum(M)[:-1]])
    r = (pos >> shift).astype(np.int64)
    negless = np.searchsorted(neg, pos, side="left") - neg_start[r]
    m = np.arange(len(pos)) - pos_start[r] + 1
    k = m + negless
    has = M > 0
    lengths = L[has]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    start_of = np.zeros(B, dtype=np.int64)
    start_of[has] = starts
    ranks = np.zeros(int(lengths.sum()), dtype=np.float64)
    ranks[start_of[r] + k - 1] = m / k
    ap[has] = np.add.reduceat(ranks, starts) / M[has]
    return ap, M, L


def _sorted_masked(keys: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals = np.where(mask, keys, np.float32(np.inf))
    vals.sort(axis=1)
    return vals, mask.sum(axis=1).astype(np.int64)


def _groups(codes: dict, cols: Sequence[str], n: int) -> np.ndarray | None:
    """One integer per row naming its combination of ``cols`` (None without columns)."""
    if not cols:
        return None
    key = np.zeros(n, dtype=np.int64)
    for col in cols:
        key = pd.factorize(key * (int(codes[col].max(initial=0)) + 1) + codes[col])[0].astype(np.int64)
    return key


def _query_blocks(n: int, rules: PairRules, codes: dict, block_elements: int):
    """Blocks of query rows, each with the candidate rows of its dense similarity block and, when
    the positives are confined to small groups (``pos_sameby``) that the dense block does not
    cover, the group members (``pos_members``, ``pos_g``) to score them pair by pair.

    Activity (``neg_sameby=[plate]``): one block per plate, dense over the plate's wells (its
    controls), positives pair by pair; consistency (no ``neg_sameby``): dense over every profile."""
    neg_g = _groups(codes, [c for c in rules.neg_sameby if c != rules.multilabel_col], n)
    pos_g = _groups(codes, [c for c in rules.pos_sameby if c != rules.multilabel_col], n)
    everyone = np.arange(n)
    if neg_g is None or pos_g is None:
        step = max(1, block_elements // max(n, 1))
        for lo in range(0, n, step):
            yield everyone[lo:lo + step], everyone, None
        return
    pos_members = (group_rows(pos_g), pos_g)
    for rows in group_rows(neg_g):
        step = max(1, block_elements // max(len(rows), 1))
        for lo in range(0, len(rows), step):
            yield rows[lo:lo + step], rows, pos_members


def _pair_keys(X: np.ndarray, norms: np.ndarray, codes: dict, rules: PairRules, q: np.ndarray, pos_members,
               block_elements: int = 1 << 22) -> list[np.ndarray]:
    """Per query of ``q``, the sort keys of its positive pairs, scored pair by pair within its
    ``pos_sameby`` group (the pair rules applied), about ``block_elements`` feature values at a time."""
    members, group = pos_members
    parts = [members[group[i]] for i in q]
    qi = np.repeat(q, [len(p) for p in parts])
    cj = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    keep = _pair_rule(codes, rules.pos_sameby, rules.pos_diffby, qi, cj)
    qi, cj = qi[keep], cj[keep]
    keys = np.empty(len(qi), dtype=np.float32)
    step = max(1, block_elements // max(X.shape[1], 1))
    for lo in range(0, len(qi), step):
        a, b = qi[lo:lo + step], cj[lo:lo + step]
        rows, loc = np.unique(np.concatenate([a, b]), return_inverse=True)  # each row normalised once
        U = X[rows].astype(np.float64) / norms[rows, None]
        keys[lo:lo + len(a)] = np.float32(1.0) - np.einsum("ij,ij->i", U[loc[:len(a)]], U[loc[len(a):]]).astype(np.float32)
    pos_of = np.searchsorted(q, qi) if np.all(q[:-1] <= q[1:]) else pd.Index(q).get_indexer(qi)
    order = np.argsort(pos_of, kind="stable")
    return np.split(keys[order], np.searchsorted(pos_of[order], np.arange(1, len(q))))


def _pair_rule(codes: dict, same: Sequence[str], diff: Sequence[str], qi: np.ndarray, cj: np.ndarray) -> np.ndarray:
    """Pairs (qi, cj) (any broadcastable index arrays) that are different profiles, equal in every
    ``same`` column and different in every ``diff`` column."""
    m = qi != cj  # a profile is never paired with itself
    for col in same:
        m = m & (codes[col][qi] == codes[col][cj])
    for col in diff:
        m = m & (codes[col][qi] != codes[col][cj])
    return m


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
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
    source: str = "profiles",
) -> pd.DataFrame:
    """copairs' AP of every profile (``copairs.map.average_precision``; with ``multilabel_col``,
    ``copairs.map.multilabel.average_precision``).

    ``meta``: n rows of metadata; ``X``: n × d features (float32 or float64; cosine similarity).
    Returns ``meta``'s columns + ``n_pos_pairs``, ``n_total_pairs`` (int64), ``average_precision``,
    ``normalized_average_precision`` (float64; NaN without a positive pair), one row per profile in
    ``meta``'s order (index reset). With ``multilabel_col``: one row per (profile, label it shares
    with another profile), that column holding the label, profiles in order then labels sorted.
    Raises :class:`InputError` for missing or empty pair columns, NaN/inf or all-zero profiles, and
    rules copairs refuses (an empty rule, a column both same and different)."""
    rules = PairRules(tuple(pos_sameby), tuple(pos_diffby), tuple(neg_sameby), tuple(neg_diffby), multilabel_col)
    X, codes, norms = prepare(meta, X, rules, source)
    if multilabel_col is not None:
        return _average_precision_multilabel(meta, X, norms, rules, codes, multilabel_sep, block_elements, source)
    q, ap, M, L = ap_part(X, norms, codes, rules, block_elements)
    return ap_table(meta, q, ap, M, L)


def prepare(meta: pd.DataFrame, X: np.ndarray, rules: PairRules, source: str = "profiles"):
    """Checked inputs of :func:`ap_part`: ``X`` (n × d), the pair columns as integer codes, the row
    norms (float64). Raises :class:`InputError` (see :func:`average_precision`)."""
    X = np.asarray(X)
    if len(X) != len(meta):
        raise ValueError(f"{len(meta)} metadata rows but {len(X)} profiles")
    return X, _codes(meta, rules, source), _unit_rows(X, source, meta)


def _row_name(meta: pd.DataFrame | None, i: int) -> str:
    """``profile 6 (plate P1, well A07)`` when the plate and well columns are there."""
    keys = [c for c in ("Metadata_Plate", "Metadata_Well") if meta is not None and c in meta.columns]
    where = ", ".join(f"{c[len('Metadata_'):].lower()} {meta[c].iloc[i]}" for c in keys)
    return f"profile {i}" + (f" ({where})" if where else "")


def ap_part(X: np.ndarray, norms: np.ndarray, codes: dict, rules: PairRules, block_elements: int = 1 << 22,
            part: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AP of the queries of every ``part[1]``-th block starting at block ``part[0]`` (all blocks by
    default): (query rows, AP, M, L). Blocks are computed independently, so any split of them gives
    the same numbers (what the Ray adapter, :mod:`raycp.evaluate.copairs_ray`, relies on)."""
    i, k = part
    qs, aps, Ms, Ls = [], [], [], []
    for b, (q, cand, pos_members) in enumerate(_query_blocks(len(X), rules, codes, block_elements)):
        if b % k != i:
            continue
        neg = _rule_mask(codes, rules.neg_sameby, rules.neg_diffby, q, cand)
        if pos_members is None:  # the dense block holds every candidate
            pos = _rule_mask(codes, rules.pos_sameby, rules.pos_diffby, q, cand)
            n_pos = pos.sum(axis=1)
        else:
            pair_keys = _pair_keys(X, norms, codes, rules, q, pos_members, block_elements)
            n_pos = np.array([len(p) for p in pair_keys], dtype=np.int64)
        # Similarities only where an AP needs them: rows with a positive, columns that are one of
        # their negatives (or positives); a row without positives has AP NaN and needs only counts.
        need = np.flatnonzero(n_pos > 0)
        a = np.full(len(q), np.nan)
        m = n_pos.astype(np.int64)
        length = m + neg.sum(axis=1)
        if len(need):
            cols = neg[need].any(axis=0) | (pos[need].any(axis=0) if pos_members is None else False)
            keys = _keys(X, norms, q[need], cand[cols])
            neg_sorted, n_neg = _sorted_masked(keys, neg[need][:, cols])
            if pos_members is None:
                sub = pos[need][:, cols]
                pos_keys = [keys[r, sub[r]] for r in range(len(need))]
            else:
                pos_keys = [pair_keys[r] for r in need]
            a[need], _, _ = _ap_rows(pos_keys, neg_sorted, n_neg)
        qs.append(q)
        aps.append(a)
        Ms.append(m)
        Ls.append(length)
    if not qs:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(qs), np.concatenate(aps), np.concatenate(Ms), np.concatenate(Ls)


def ap_table(meta: pd.DataFrame, q: np.ndarray, ap: np.ndarray, M: np.ndarray, L: np.ndarray) -> pd.DataFrame:
    """copairs' AP table from :func:`ap_part`'s results (any order, every row once)."""
    n = len(meta)
    full_ap = np.full(n, np.nan)
    full_M = np.zeros(n, dtype=np.int64)
    full_L = np.zeros(n, dtype=np.int64)
    full_ap[q], full_M[q], full_L[q] = ap, M, L
    out = meta.reset_index(drop=True).copy()
    out["n_pos_pairs"] = full_M
    out["n_total_pairs"] = full_L
    out["average_precision"] = np.where(full_L > 0, full_ap, np.nan)
    out["normalized_average_precision"] = normalized_average_precision(out["average_precision"].to_numpy(), full_M,
                                                                       full_L - full_M)
    return out


def _average_precision_multilabel(meta, X, norms, rules: PairRules, codes, sep, block_elements, source) -> pd.DataFrame:
    col = rules.multilabel_col
    labels, vocab = _labels(meta, col, sep, source)
    index = {t: i for i, t in enumerate(vocab)}
    n = len(meta)
    import scipy.sparse

    r_ix = np.repeat(np.arange(n), [len(r) for r in labels])
    t_ix = np.array([index[t] for r in labels for t in r], dtype=np.int64)
    T = scipy.sparse.csr_matrix((np.ones(len(r_ix), dtype=np.float32), (r_ix, t_ix)), shape=(n, max(len(vocab), 1)))
    Tc = T.tocsc()
    by_label = [Tc.indices[Tc.indptr[t]:Tc.indptr[t + 1]] for t in range(len(vocab))]
    pos_shared = col in rules.pos_sameby
    neg_shared = col in rules.neg_sameby
    pos_same = [c for c in rules.pos_sameby if c != col]
    pos_diff = [c for c in rules.pos_diffby if c != col]
    neg_same = [c for c in rules.neg_sameby if c != col]
    neg_diff = [c for c in rules.neg_diffby if c != col]
    if not pos_shared:
        raise InputError(f"multilabel column {col!r} must be in pos_sameby (AP is per shared label)",
                         fix=f"pass pos_sameby=[{col!r}] and neg_diffby=[{col!r}]")
    records = []  # (row, label index, ap, M, L)
    everyone = np.arange(n)
    step = max(1, block_elements // max(n, 1))
    for lo in range(0, n, step):
        q = everyone[lo:lo + step]
        keys = _keys(X, norms, q, everyone)
        shared = (T[q] @ T.T).toarray() > 0
        neg = _rule_mask(codes, neg_same, neg_diff, q, everyone)
        neg &= shared if neg_shared else ~shared
        neg_sorted, n_neg = _sorted_masked(keys, neg)
        base = _rule_mask(codes, pos_same, pos_diff, q, everyone)
        for r, i in enumerate(q):
            for t in sorted(index[x] for x in labels[i]):
                members = by_label[t]
                pos_keys = keys[r, members[base[r, members]]]
                if not len(pos_keys):
                    continue
                a, m, length = _ap_rows([pos_keys], neg_sorted[r:r + 1], n_neg[r:r + 1])
                records.append((i, t, a[0], m[0], length[0]))
    rows = np.array([r[0] for r in records], dtype=np.int64)
    res = meta.drop(columns=[col]).iloc[rows].reset_index(drop=True)
    M = np.array([r[3] for r in records], dtype=np.int64)
    L = np.array([r[4] for r in records], dtype=np.int64)
    res["average_precision"] = np.array([r[2] for r in records], dtype=np.float64)
    res["normalized_average_precision"] = normalized_average_precision(res["average_precision"].to_numpy(), M, L - M)
    res["n_pos_pairs"] = M
    res["n_total_pairs"] = L
    res[col] = [vocab[r[1]] for r in records]
    return res


def normalized_average_precision(ap: np.ndarray, M: np.ndarray, N: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """(AP − μ₀)/max(1 − μ₀, eps) clipped to [−1, 1]; μ₀ = E[AP] of a random ranking of M positives
    and N negatives, (1/L)·((M−1)/(L−1)·(L − H_L) + H_L), L = M + N, H_L the L-th harmonic number
    (copairs.map.normalization, same float64 arithmetic)."""
    ap = np.asarray(ap, dtype=np.float64)
    M = np.asarray(M, dtype=np.int64)
    L = M + np.asarray(N, dtype=np.int64)
    H = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(L.max(initial=0)) + 1))])
    mu0 = np.zeros(len(ap))
    general = (L > 1) & (M > 0) & (M < L)
    Lg = L[general].astype(np.float64)
    Mg = M[general].astype(np.float64)
    Hg = H[L[general]]
    mu0[general] = 1.0 / Lg * ((Mg - 1.0) / (Lg - 1.0) * (Lg - Hg) + Hg)
    mu0[(L >= 1) & (M == L) & (M > 0)] = 1.0
    with np.errstate(invalid="ignore"):
        return np.clip((ap - mu0) / np.maximum(1 - mu0, eps), -1.0, 1.0)


def null_distribution(num_pos: int, total: int, null_size: int, seed, chunk_bytes: int = 1 << 26) -> np.ndarray:
    """copairs' null of AP for ``num_pos`` positives among ``total`` ranked items: ``null_size``
    float32 APs of random rankings, drawn as ``copairs.compute.random_ap(null_size, num_pos, total,
    seed)`` draws them, in row chunks of about ``chunk_bytes`` (the same random stream)."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if total < 2**16 else np.uint32
    out = np.empty(null_size, dtype=np.float32)
    rows = max(1, chunk_bytes // max(1, total * np.dtype(dtype).itemsize))
    base = np.arange(total, dtype=dtype)
    for lo in range(0, null_size, rows):
        hi = min(null_size, lo + rows)
        idx = np.tile(base, (hi - lo, 1))
        rng.permuted(idx, axis=1, out=idx)
        rel_k = np.sort(idx[:, :num_pos], axis=1)
        pr_k = np.arange(1, num_pos + 1, dtype=np.float32) / (rel_k + 1)
        out[lo:hi] = (pr_k.sum(axis=1) / num_pos).astype(np.float32)
    return out


def null_distributions(jobs: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """:func:`null_distribution` of each (M, L, null_size, seed), here, one after the other."""
    return [null_distribution(m, n, size, s) for m, n, size, s in jobs]


def mean_average_precision(
    ap_scores: pd.DataFrame,
    sameby: Sequence[str] | str,
    null_size: int = DEFAULT_NULL_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = DEFAULT_SEED,
    null_fn=None,
) -> pd.DataFrame:
    """copairs' mAP per ``sameby`` group with p-values (``copairs.map.mean_average_precision``).

    ``ap_scores``: :func:`average_precision`'s table. Returns one row per group (sorted by the
    ``sameby`` values): the ``sameby`` columns, ``mean_average_precision``,
    ``mean_normalized_average_precision``, ``p_value``, ``corrected_p_value`` (float64),
    ``below_p``, ``below_corrected_p`` (bool). ``null_fn`` maps a list of (M, L, null_size, seed)
    to their null distributions (default: here, one after the other; the Ray adapter spreads them).
    Raises :class:`InputError` for a missing column or ``null_size`` < 1."""
    sameby = [sameby] if isinstance(sameby, str) else list(sameby)
    need = [*sameby, "average_precision", "normalized_average_precision", "n_pos_pairs", "n_total_pairs"]
    missing = [c for c in need if c not in ap_scores.columns]
    if missing:
        raise InputError(f"AP table: column {missing[0]!r} not found", fix="pass the output of average_precision / raycp profile map")
    if int(null_size) < 1:
        raise InputError(f"null_size must be ≥ 1, not {null_size}", fix="e.g. null_size=10000 (the JUMP recipe's)")
    if not 0 < float(threshold) < 1:
        raise InputError(f"the p-value threshold must be between 0 and 1, not {threshold}", fix="e.g. 0.05 (the JUMP papers')")
    ap = ap_scores[ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)].reset_index(drop=True)
    if ap.empty:
        return pd.DataFrame({**{c: pd.Series(dtype=ap_scores[c].dtype) for c in sameby},
                             **{c: pd.Series(dtype=bool if c.startswith("below") else np.float64) for c in MAP_COLUMNS}})
    confs, rev_ix = np.unique(ap[["n_pos_pairs", "n_total_pairs"]].to_numpy(dtype=np.int64), axis=0, return_inverse=True)
    rev_ix = rev_ix.ravel()
    seeds = np.random.default_rng(seed).integers(NULL_SEED_HIGH, size=len(confs))
    jobs = [(int(num_pos), int(total), int(null_size), int(s)) for (num_pos, total), s in zip(confs, seeds)]
    null_dists = np.stack((null_fn or null_distributions)(jobs)).astype(np.float32, copy=False)
    grouped = ap.groupby(sameby, observed=True, sort=True)
    table = grouped[["average_precision", "normalized_average_precision"]].mean().reset_index()
    table.columns = [*sameby, "mean_average_precision", "mean_normalized_average_precision"]
    members = group_rows(grouped.ngroup().to_numpy())
    maps = table["mean_average_precision"].to_numpy()
    pvals = np.empty(len(table))
    sizes = np.array([len(idx) for idx in members])
    for size in np.unique(sizes):  # groups of one size at once; a group's null is the float32 mean of its members'
        groups = np.flatnonzero(sizes == size)
        chunk = max(1, (1 << 28) // (int(size) * int(null_size) * 4))
        for lo in range(0, len(groups), chunk):
            g = groups[lo:lo + chunk]
            conf = rev_ix[np.stack([members[i] for i in g])]  # (groups, size)
            null = null_dists[conf].mean(axis=1)  # the same float32 sums, in member order, as copairs' axis-0 mean
            # copairs compares its float32 null with the mAP as a Python float, which NumPy 2 casts to
            # float32: a mAP equal to a null value in float32 (1/7, 1/12...) is not counted as exceeded
            pvals[g] = ((null > maps[g, None].astype(np.float32)).sum(axis=1) + 1) / (null_size + 1)
    table["p_value"] = pvals
    table["corrected_p_value"] = benjamini_hochberg(pvals)
    table["below_p"] = table["p_value"] < threshold
    table["below_corrected_p"] = table["corrected_p_value"] < threshold
    return table


def fraction_retrieved(map_scores: pd.DataFrame) -> float:
    """The JUMP papers' "fraction retrieved": the share of groups with ``below_corrected_p``
    (NaN for an empty table)."""
    if len(map_scores) == 0:
        return float("nan")
    return float(map_scores["below_corrected_p"].mean())


# --------------------------------------------------------------------------------------------
# The JUMP metrics
# --------------------------------------------------------------------------------------------
CONTROL_COL = "Metadata_copairs_negcon"


@dataclass
class Retrieval:
    """``ap``: per-profile AP table; ``map``: per-group mAP table; ``summary``: fraction retrieved and counts."""

    ap: pd.DataFrame
    map: pd.DataFrame
    summary: dict


def phenotypic_activity(
    meta: pd.DataFrame,
    X: np.ndarray,
    pert_col: str,
    control_mask: np.ndarray,
    plate_col: str = "Metadata_Plate",
    *,
    null_size: int = DEFAULT_NULL_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = DEFAULT_SEED,
    block_elements: int = 1 << 22,
    backend=None,
    source: str = "profiles",
) -> Retrieval:
    """Phenotypic activity: each perturbation's replicate wells (positives: same ``pert_col``)
    ranked against the negative-control wells of the same plate (negatives: same ``plate_col``,
    one a control and the other not). The JUMP recipe's ``average_precision_negcon`` rules
    (``pos_sameby=[pert]``, ``neg_sameby=[plate]``, ``neg_diffby=[negcon flag, pert]``, each
    control its own perturbation), controls then left out; mAP per perturbation with copairs'
    p-values. ``control_mask``: bool per row. Returns a :class:`Retrieval`."""
    ctrl = np.asarray(control_mask, dtype=bool)
    if ctrl.shape != (len(meta),):
        raise ValueError("control_mask must have one entry per row")
    if not ctrl.any():
        raise InputError(f"{source}: phenotypic activity needs negative-control wells, but the control query matched none",
                         fix="check --control-query")
    for c in (pert_col, plate_col):
        if c not in meta.columns:
            raise InputError(f"{source}: column {c!r} not found", fix="pass an existing metadata column")
    m = meta.reset_index(drop=True).copy()
    pert = pd.factorize(m[pert_col])[0].astype(np.int64)
    pert[ctrl] = pert.max(initial=0) + 1 + np.arange(int(ctrl.sum()))  # each control its own perturbation
    work = pd.DataFrame({"pert": pert, "plate": m[plate_col].to_numpy(), "negcon": ctrl,
                         **{c: m[c].to_numpy() for c in ("Metadata_Plate", "Metadata_Well") if c in m.columns}})  # names in errors
    b = _backend(backend)
    ap = b.average_precision(work, X, ["pert"], [], ["plate"], ["negcon", "pert"], block_elements=block_elements,
                             source=source)
    ap = pd.concat([m, ap[["n_pos_pairs", "n_total_pairs", "average_precision", "normalized_average_precision"]]],
                   axis=1)[~ctrl].reset_index(drop=True)
    table = b.mean_average_precision(ap, [pert_col], null_size, threshold, seed)
    return Retrieval(ap, table, _summary(table, ap, "phenotypic_activity", null_size, threshold, seed))


def phenotypic_consistency(
    meta: pd.DataFrame,
    X: np.ndarray,
    label_col: str,
    *,
    sep: str | None = "|",
    null_size: int = DEFAULT_NULL_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = DEFAULT_SEED,
    block_elements: int = 1 << 22,
    backend=None,
    source: str = "profiles",
) -> Retrieval:
    """Phenotypic consistency: profiles (usually one consensus profile per active perturbation)
    sharing a ``label_col`` value (target or MoA; several per row split on ``sep``) retrieve each
    other against those sharing none (``pos_sameby=[label]``, ``neg_diffby=[label]``, multilabel
    when any value holds ``sep``); mAP per label with copairs' p-values. Rows without a label are
    left out and counted. Returns a :class:`Retrieval`."""
    if label_col not in meta.columns:
        raise InputError(f"{source}: column {label_col!r} not found", fix="pass an existing annotation column")
    values = meta[label_col]
    keep = values.notna() & (values.astype(str).str.strip() != "")
    m = meta[keep.to_numpy()].reset_index(drop=True)
    Xk = np.asarray(X)[keep.to_numpy()]
    multi = sep is not None and m[label_col].astype(str).str.contains(sep, regex=False).any()
    b = _backend(backend)
    ap = b.average_precision(m, Xk, [label_col], [], [], [label_col], multilabel_col=label_col if multi else None,
                             multilabel_sep=sep if multi else None, block_elements=block_elements, source=source)
    table = b.mean_average_precision(ap, [label_col], null_size, threshold, seed)
    summary = _summary(table, ap, "phenotypic_consistency", null_size, threshold, seed)
    summary["rows_without_label"] = int((~keep).sum())
    return Retrieval(ap, table, summary)


def _backend(backend):
    """``backend`` (a module with ``average_precision`` and ``mean_average_precision``, e.g.
    :mod:`raycp.evaluate.copairs_ray`), or this module."""
    import sys

    return backend if backend is not None else sys.modules[__name__]


def _summary(table: pd.DataFrame, ap: pd.DataFrame, metric: str, null_size: int, threshold: float, seed: int) -> dict:
    return {
        "metric": metric,
        "groups": int(len(table)),
        "fraction_retrieved": fraction_retrieved(table),
        "fraction_below_p": float(table["below_p"].mean()) if len(table) else float("nan"),
        "mean_average_precision": float(table["mean_average_precision"].mean()) if len(table) else float("nan"),
        "profiles": int(len(ap)),
        "profiles_with_ap": int((ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)).sum()),
        "null_size": int(null_size),
        "threshold": float(threshold),
        "seed": int(seed),
    }


# --------------------------------------------------------------------------------------------
# From a wells table
# --------------------------------------------------------------------------------------------
@dataclass
class WellsRetrieval:
    """``activity`` / ``consistency`` (:class:`Retrieval` or None) and ``accounting`` (rows used and
    quarantined with reasons)."""

    activity: Retrieval | None
    consistency: Retrieval | None
    accounting: dict


def consensus_profiles(meta: pd.DataFrame, X: np.ndarray, pert_col: str, keep_cols: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """One profile per perturbation, sorted by it: the mean of its wells
    (:func:`raycp.profiles.aggregate.group_mean`: float64 sums, X's dtype out); ``keep_cols`` take
    the perturbation's first value."""
    from raycp.profiles.aggregate import group_codes, group_mean

    codes, keys = group_codes(meta, [pert_col])
    means, counts = group_mean(X, codes, len(keys))
    first = np.array([rows[0] for rows in group_rows(codes)], dtype=np.int64)
    out = meta.iloc[first][[pert_col, *[c for c in keep_cols if c != pert_col]]].reset_index(drop=True)
    out["Metadata_n_wells"] = counts
    return out, means


def _blank(values: pd.Series) -> np.ndarray:
    """Missing or blank (empty or whitespace-only text): no perturbation."""
    return (values.isna() | values.astype(str).str.strip().eq("")).to_numpy()


def retrieval_of_wells(
    wells: pd.DataFrame,
    *,
    pert_col: str,
    control_query: str | None = None,
    plate_col: str = "Metadata_Plate",
    target_col: str | None = None,
    target_sep: str | None = "|",
    consistency_on: str = "active",
    null_size: int = DEFAULT_NULL_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = DEFAULT_SEED,
    block_elements: int = 1 << 22,
    backend=None,
    source: str = "wells",
) -> WellsRetrieval:
    """Phenotypic activity of every perturbation (when ``control_query`` is given) and phenotypic
    consistency of the perturbations' consensus profiles by ``target_col`` (when given): of the
    phenotypically active ones (``consistency_on="active"``, as in the JUMP papers) or of all.
    Wells with a NaN feature are quarantined and counted (features NaN in more than 5% of the wells
    are dropped first, pycytominer's rule)."""
    from raycp.evaluate import control_mask_from_query
    from raycp.profiles.io import feature_matrix_na

    if consistency_on not in ("active", "all"):
        raise InputError(f"consistency_on {consistency_on!r} is unknown", fix="use active or all")
    if control_query is None and target_col is None:
        raise InputError("nothing to compute: give a control query (phenotypic activity) and/or a target column "
                         "(phenotypic consistency)", fix="pass --control-query and/or --target-col")
    for flag, col in (("--pert-col", pert_col), ("--target-col", target_col), ("--plate-col", plate_col if control_query else None)):
        if col is not None and col not in wells.columns:
            meta = [c for c in wells.columns if str(c).startswith("Metadata_")]
            raise InputError(f"{source}: column {col!r} ({flag}) not found", fix=f"pass {flag} with one of {meta[:12]}")
    fm = feature_matrix_na(wells, source=source)
    ok = fm.ok
    acct = {"wells": int(len(wells)), "wells_used": int(ok.sum()), "wells_quarantined_nan": int((~ok).sum()),
            "features": len(fm.features), "features_dropped_na": fm.dropped_na}
    meta_cols = [c for c in wells.columns if str(c).startswith("Metadata_")]
    w = wells.loc[ok, meta_cols].reset_index(drop=True)  # metadata only: the features stay in X
    X = fm.X if ok.all() else fm.X[ok]
    activity = consistency = None
    ctrl = None
    if control_query is not None:
        ctrl = control_mask_from_query(w, control_query, source, require=True)
        empty = _blank(w[pert_col]) & ~ctrl
        if empty.any():
            raise InputError(f"{source}: {int(empty.sum())} non-control well(s) have no {pert_col}",
                             fix="fill the perturbation column or mark those wells as controls")
        activity = phenotypic_activity(w, X, pert_col, ctrl, plate_col, null_size=null_size, threshold=threshold,
                                       seed=seed, block_elements=block_elements, backend=backend, source=source)
        acct["control_wells"] = int(ctrl.sum())
    if target_col is not None:
        treated = ~ctrl if ctrl is not None else np.ones(len(w), dtype=bool)
        empty = _blank(w[pert_col]) & treated
        if empty.any():
            raise InputError(f"{source}: {int(empty.sum())} well(s) have no {pert_col}, so no consensus profile",
                             fix="fill the perturbation column, or pass --control-query to leave the controls out")
        tw = w[treated].reset_index(drop=True)
        cons_meta, cons_X = consensus_profiles(tw, X[treated], pert_col, [target_col])
        if consistency_on == "active":
            if activity is None:
                raise InputError("consistency on active perturbations needs phenotypic activity",
                                 fix="pass --control-query, or --consistency-on all")
            active = set(activity.map.loc[activity.map["below_corrected_p"], pert_col])
            keep = cons_meta[pert_col].isin(active).to_numpy()
            acct["perturbations_inactive"] = int((~keep).sum())
            cons_meta, cons_X = cons_meta[keep].reset_index(drop=True), cons_X[keep]
        acct["consistency_profiles"] = int(len(cons_meta))
        if len(cons_meta) < 2:  # nothing to rank: an empty result, said in the summary
            empty_ap = cons_meta.assign(n_pos_pairs=0, n_total_pairs=0, average_precision=np.nan,
                                        normalized_average_precision=np.nan)
            table = mean_average_precision(empty_ap, [target_col], null_size, threshold, seed)  # empty: no null drawn
            summary = _summary(table, empty_ap, "phenotypic_consistency", null_size, threshold, seed)
            summary["note"] = f"{len(cons_meta)} {consistency_on} perturbation(s): consistency needs 2 or more"
            return WellsRetrieval(activity, Retrieval(empty_ap, table, summary), acct)
        consistency = phenotypic_consistency(cons_meta, cons_X, target_col, sep=target_sep, null_size=null_size,
                                             threshold=threshold, seed=seed, block_elements=block_elements,
                                             backend=backend, source=source)
    return WellsRetrieval(activity, consistency, acct)
