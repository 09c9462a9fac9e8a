"""Given real treatment profiles, the vectorised metrics equal the published code query by query,
the standard AP equals sklearn's and copairs', and ties are grouped as sklearn groups them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycp.evaluate.metrics import cosine_similarity, evaluate_profiles, match_matrix

from .conftest import published_foe, published_map, published_match_matrix


def test_map_paper_and_foe_equal_published_code_per_query(lincs_library):
    X, ann = lincs_library
    S = cosine_similarity(X)
    M = published_match_matrix(ann)
    ev = evaluate_profiles(X, ann)
    ref_ap = published_map(S, M)
    ours = ev.queries["ap_paper"].to_numpy()
    assert np.array_equal(np.isnan(ref_ap), np.isnan(ours))
    np.testing.assert_allclose(ours[~np.isnan(ours)], ref_ap[~np.isnan(ref_ap)], rtol=0, atol=1e-15)
    ref_or = published_foe(S, M)
    np.testing.assert_allclose(ev.queries["odds_ratio"].to_numpy(), ref_or, rtol=1e-15, atol=0)


def test_ties_are_grouped_like_sklearn(lincs_library):
    """Coarse profiles (2 integer features) tie many similarities; still equal to the published code."""
    X, ann = lincs_library
    Xc = np.round(X[:, :2] * 2)
    S = cosine_similarity(Xc)
    assert len(np.unique(S)) < S.size / 20  # really tied
    ev = evaluate_profiles(Xc, ann)
    ref = published_map(S, published_match_matrix(ann))
    ours = ev.queries["ap_paper"].to_numpy()
    np.testing.assert_allclose(ours[~np.isnan(ours)], ref[~np.isnan(ref)], rtol=0, atol=1e-15)
    from sklearn.metrics import average_precision_score

    M = published_match_matrix(ann)
    for i in np.flatnonzero(M.sum(1) > 1)[:40]:
        k = np.arange(len(ann)) != i
        assert ev.queries["ap"].iloc[i] == pytest.approx(average_precision_score(M[i, k], S[i, k]), abs=1e-12)


def test_average_precision_equals_sklearn(lincs_library):
    from sklearn.metrics import average_precision_score

    X, ann = lincs_library
    S = cosine_similarity(X)
    M = published_match_matrix(ann)
    ev = evaluate_profiles(X, ann)
    ref = np.array(
        [average_precision_score(M[i, np.arange(len(ann)) != i], S[i, np.arange(len(ann)) != i]) if M[i].sum() > 1 else np.nan
         for i in range(len(ann))]
    )
    np.testing.assert_allclose(ev.queries["ap"].to_numpy(), ref, rtol=0, atol=1e-12)
    assert ev.summary["map"] == pytest.approx(np.nanmean(ref), abs=1e-12)


def test_average_precision_equals_copairs_on_single_labels(lincs_library):
    """On single-label annotations (where the definitions agree) AP = copairs' average_precision."""
    copairs_map = pytest.importorskip("copairs.map")
    X, ann = lincs_library
    single = np.array(["|" not in a for a in ann])
    Xs, anns = X[single], [a for a, s in zip(ann, single) if s]
    ev = evaluate_profiles(Xs, anns)
    meta = pd.DataFrame({"Metadata_moa": anns})
    ref = copairs_map.average_precision(
        meta, Xs, pos_sameby=["Metadata_moa"], pos_diffby=[], neg_sameby=[], neg_diffby=["Metadata_moa"], progress_bar=False
    )
    has = ev.queries["n_matches"].to_numpy() >= 1
    assert has.sum() > 100
    np.testing.assert_allclose(ev.queries["ap"].to_numpy()[has], ref["average_precision"].to_numpy()[has], rtol=0, atol=1e-6)


def test_precision_recall_at_k_and_first_hits(lincs_library):
    X, ann = lincs_library
    S = cosine_similarity(X)
    M = published_match_matrix(ann)
    N = len(ann)
    np.fill_diagonal(S, -np.inf)
    np.fill_diagonal(M, False)
    order = np.argsort(-S, axis=1, kind="stable")
    hits = np.take_along_axis(M, order, axis=1)[:, : N - 1]
    ev = evaluate_profiles(X, ann, ks=(1, 5))
    q = ev.queries
    has = M.sum(1) >= 1
    np.testing.assert_allclose(q["precision_at_5"].to_numpy()[has], hits[has, :5].mean(1))
    np.testing.assert_allclose(q["recall_at_5"].to_numpy()[has], hits[has, :5].sum(1) / M[has].sum(1))
    first = np.argmax(hits, axis=1) + 1
    assert np.array_equal(q["first_hit_rank"].to_numpy()[has], first[has])
    assert ev.summary["n_first_hit_top_percent"] == int((first[has] / N * 100 <= 1.0).sum())


def test_foe_significance_is_counted(lincs_library):
    import scipy.stats

    X, ann = lincs_library
    ev = evaluate_profiles(X, ann)
    q = ev.queries[ev.queries["is_query_foe"]]
    for _, r in q.head(25).iterrows():
        table = [[r.v11, r.v12], [r.v21, r.v22]]
        assert r.p_value == pytest.approx(scipy.stats.fisher_exact(table, alternative="greater")[1], rel=1e-9)
    adj = scipy.stats.false_discovery_control(q["p_value"].to_numpy(), method="bh")
    assert ev.summary["n_queries_foe_significant_bh"] == int((adj < 0.05).sum()) > 0


def test_annotation_tokens_match_exactly():
    """'a|b' matches 'b' and 'b|c'; 'ab' does not match 'a' (exact tokens, not substrings)."""
    M = match_matrix(["a|b", "b", "b|c", "ab", "a"])
    assert M[0, 1] and M[0, 2] and M[1, 2] and M[0, 4]
    assert not M[3, 4] and not M[3, 0] and not M[1, 4]


@pytest.mark.parametrize("seed", range(6))
def test_random_real_sublibraries_equal_published_code(lincs_library, seed):
    """Random sub-libraries of the real profiles (some coarsened to force ties) stay equal to the
    published code query by query, for map_paper, AP, FoE and the interpolated curve."""
    from sklearn.metrics import average_precision_score

    X, ann = lincs_library
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ann), size=int(rng.integers(20, 150)), replace=False))
    Xs = X[idx]
    if seed % 2:
        Xs = np.round(Xs[:, :3])
    anns = [ann[i] for i in idx]
    S = cosine_similarity(Xs)
    M = published_match_matrix(anns)
    ev = evaluate_profiles(Xs, anns)
    ref = published_map(S, M)
    ours = ev.queries["ap_paper"].to_numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours[~np.isnan(ours)], ref[~np.isnan(ref)], rtol=0, atol=1e-14)
    np.testing.assert_allclose(ev.queries["odds_ratio"].to_numpy(), published_foe(S, M), rtol=1e-14)
    if (~np.isnan(ref)).any():
        _, curve = published_map(S, M, curve=True)
        np.testing.assert_allclose(ev.pr_curve["precision"].to_numpy(), curve, rtol=0, atol=1e-12)
    n = len(anns)
    for i in np.flatnonzero(M.sum(1) > 1):
        k = np.arange(n) != i
        assert ev.queries["ap"].iloc[i] == pytest.approx(average_precision_score(M[i, k], S[i, k]), abs=1e-12)
