"""copairs-exact AP, mAP and p-values (raycp.evaluate.copairs_map) against copairs 0.5.5 itself,
on the real LINCS plate and the four real fibrosis plates: AP bit for bit, mAP and p-values
identical for the same seed and null size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.evaluate import copairs_map as cm

copairs_map = pytest.importorskip("copairs.map", reason="copairs (dev extra) is the reference")


def _split(df):
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]].reset_index(drop=True).copy()
    return meta, df[feats].to_numpy(np.float64)


@pytest.fixture(scope="module")
def lincs_wells(lincs):
    meta, X = _split(lincs)
    meta["Metadata_broad_sample"] = meta["Metadata_broad_sample"].fillna("DMSO")
    meta["Metadata_moa"] = meta["Metadata_moa"].fillna("none")
    meta["Metadata_row"] = meta["Metadata_Well"].str[0]
    return meta, X


@pytest.fixture(scope="module")
def fibrosis_wells(fibrosis_files):
    from raycp.profiles.aggregate import aggregate_cells

    wells = aggregate_cells(fibrosis_files).wells
    cells = pd.concat([pd.read_parquet(f, columns=["Metadata_Plate", "Metadata_Well", "Metadata_cell_type"])
                       for f in fibrosis_files]).drop_duplicates(["Metadata_Plate", "Metadata_Well"])
    wells = wells.merge(cells, on=["Metadata_Plate", "Metadata_Well"], how="left", validate="one_to_one")
    return _split(wells)


def _assert_same_ap(ref: pd.DataFrame, got: pd.DataFrame):
    assert list(got.columns) == list(ref.columns)
    for c in ("average_precision", "normalized_average_precision"):
        np.testing.assert_array_equal(got[c].to_numpy(), ref[c].to_numpy())  # bit for bit, NaN where copairs has NaN
    for c in ("n_pos_pairs", "n_total_pairs"):
        np.testing.assert_array_equal(got[c].to_numpy(), ref[c].to_numpy(dtype=np.int64))


def _assert_same_map(ref: pd.DataFrame, got: pd.DataFrame, sameby):
    assert len(got) == len(ref)
    np.testing.assert_array_equal(got[sameby].to_numpy(), ref[sameby].to_numpy())
    for c in cm.MAP_COLUMNS:
        np.testing.assert_array_equal(got[c].to_numpy(), ref[c].to_numpy(), err_msg=c)


RULES = {
    "replicates_vs_plate": (["Metadata_broad_sample"], [], ["Metadata_Plate"], ["Metadata_broad_sample"]),
    "replicates_vs_all": (["Metadata_broad_sample"], [], [], ["Metadata_broad_sample"]),
    "moa_other_compound": (["Metadata_moa"], ["Metadata_broad_sample"], [], ["Metadata_moa"]),
    "row_scoped_two_diffby": (["Metadata_broad_sample"], [], ["Metadata_row"], ["Metadata_broad_sample", "Metadata_pert_type"]),
}


@pytest.mark.parametrize("rules", list(RULES))
def test_ap_and_map_equal_copairs_on_lincs(lincs_wells, rules, tmp_path):
    meta, X = lincs_wells
    ref = copairs_map.average_precision(meta, X, *RULES[rules], progress_bar=False)
    got = cm.average_precision(meta, X, *RULES[rules], block_elements=20_000)  # small blocks: many blocks
    _assert_same_ap(ref, got)
    sameby = [RULES[rules][0][0]]
    ref_map = copairs_map.mean_average_precision(ref, sameby, null_size=2000, threshold=0.05, seed=3,
                                                 progress_bar=False, cache_dir=tmp_path)  # a fresh cache: see the module note
    _assert_same_map(ref_map, cm.mean_average_precision(got, sameby, null_size=2000, threshold=0.05, seed=3), sameby)


def test_multilabel_consistency_equals_copairs(lincs, tmp_path):
    t = lincs[lincs.Metadata_moa.notna() & (lincs.Metadata_pert_type != "control")].copy()
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    tre = t.groupby(["Metadata_broad_sample", "Metadata_moa"], as_index=False)[feats].mean()
    meta, X = tre[["Metadata_broad_sample", "Metadata_moa"]], tre[feats].to_numpy(np.float64)
    assert meta.Metadata_moa.str.contains("|", regex=False).sum() >= 5  # real multi-MoA compounds
    listed = meta.assign(Metadata_moa=meta.Metadata_moa.str.split("|"))
    from copairs.map.multilabel import average_precision as multilabel_ap

    ref = multilabel_ap(listed, X, ["Metadata_moa"], [], [], ["Metadata_moa"], multilabel_col="Metadata_moa",
                        progress_bar=False)
    got = cm.average_precision(meta, X, ["Metadata_moa"], [], [], ["Metadata_moa"], multilabel_col="Metadata_moa",
                               multilabel_sep="|")
    np.testing.assert_array_equal(got[["Metadata_broad_sample", "Metadata_moa"]].to_numpy(),
                                  ref[["Metadata_broad_sample", "Metadata_moa"]].to_numpy())
    for c in ("average_precision", "normalized_average_precision", "n_pos_pairs", "n_total_pairs"):
        np.testing.assert_array_equal(got[c].to_numpy(dtype=np.float64), ref[c].to_numpy(dtype=np.float64))
    ref_map = copairs_map.mean_average_precision(ref, ["Metadata_moa"], null_size=1000, threshold=0.05, seed=0,
                                                 progress_bar=False, cache_dir=tmp_path)
    _assert_same_map(ref_map, cm.mean_average_precision(got, ["Metadata_moa"], null_size=1000, threshold=0.05, seed=0),
                     ["Metadata_moa"])


def test_phenotypic_activity_is_the_jump_recipe_negcon_map(lincs_wells, tmp_path):
    """The JUMP recipe's average_precision_negcon rules run through copairs give raycp's activity."""
    meta, X = lincs_wells
    ctrl = (meta.Metadata_pert_type == "control").to_numpy()
    jump = meta.copy()
    jump["Metadata_JCP2022"] = jump["Metadata_broad_sample"].astype(object)
    jump.loc[ctrl, "Metadata_JCP2022"] = [f"negcon_{i}" for i in range(ctrl.sum())]
    ref = copairs_map.average_precision(jump, X, ["Metadata_JCP2022"], [], ["Metadata_Plate"],
                                        ["Metadata_pert_type", "Metadata_JCP2022"], progress_bar=False)[~ctrl]
    ref_map = copairs_map.mean_average_precision(ref, ["Metadata_broad_sample"], null_size=10_000, threshold=0.05,
                                                 seed=0, progress_bar=False, cache_dir=tmp_path)
    act = cm.phenotypic_activity(meta, X, "Metadata_broad_sample", ctrl, "Metadata_Plate")
    np.testing.assert_array_equal(act.ap["average_precision"].to_numpy(), ref["average_precision"].to_numpy())
    _assert_same_map(ref_map, act.map, ["Metadata_broad_sample"])
    assert act.summary["fraction_retrieved"] == ref_map["below_corrected_p"].mean()
    assert 0 < act.summary["fraction_retrieved"] < 1  # the real plate: some compounds retrieved, not all


def test_fibrosis_plates_equal_copairs(fibrosis_wells, tmp_path):
    meta, X = fibrosis_wells
    rules = (["Metadata_cell_type"], ["Metadata_Plate"], ["Metadata_Plate"], ["Metadata_cell_type"])
    ref = copairs_map.average_precision(meta, X, *rules, progress_bar=False)
    got = cm.average_precision(meta, X, *rules)
    _assert_same_ap(ref, got)
    assert got["n_pos_pairs"].gt(0).all()  # every well has replicates of its cell type on other plates
    ref_map = copairs_map.mean_average_precision(ref, ["Metadata_cell_type"], null_size=5000, threshold=0.05, seed=7,
                                                 progress_bar=False, cache_dir=tmp_path)
    _assert_same_map(ref_map, cm.mean_average_precision(got, ["Metadata_cell_type"], null_size=5000, threshold=0.05, seed=7),
                     ["Metadata_cell_type"])


def test_null_distribution_is_copairs_random_ap_in_chunks():
    from copairs.compute import random_ap

    for k, n in ((1, 2), (3, 40), (17, 300)):
        np.testing.assert_array_equal(cm.null_distribution(k, n, 1000, 11, chunk_bytes=4096), random_ap(1000, k, n, 11))


def test_benjamini_hochberg_is_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(0).random(500) ** 3
    p[::7] = p[3]  # ties
    np.testing.assert_array_equal(cm.benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1])


def test_ties_rank_positives_first():
    """Equal similarities: copairs ranks the positive before the negative (AP 1, not 1/2)."""
    meta = pd.DataFrame({"g": ["a", "a", "b"]})
    X = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    ap = cm.average_precision(meta, X, ["g"], [], [], ["g"])
    assert ap.loc[0, "average_precision"] == 1.0


def test_bad_inputs_are_one_line_errors(lincs_wells):
    meta, X = lincs_wells
    with pytest.raises(InputError, match="pair column 'Metadata_nope' not found"):
        cm.average_precision(meta, X, ["Metadata_nope"], [], [], ["Metadata_broad_sample"])
    holed = meta.assign(Metadata_moa=meta.Metadata_moa.where(meta.index != 5))
    with pytest.raises(InputError, match="pair column 'Metadata_moa' is empty in 1 row"):
        cm.average_precision(holed, X, ["Metadata_moa"], [], [], ["Metadata_moa"])
    zero = X.copy()
    zero[9] = 0
    with pytest.raises(InputError, match=r"profile 9 \(plate SQ00015054, well A10\) has all-zero features"):
        cm.average_precision(meta, zero, ["Metadata_broad_sample"], [], [], ["Metadata_broad_sample"])
    with pytest.raises(InputError, match="both pos_sameby and pos_diffby"):
        cm.average_precision(meta, X, ["Metadata_Plate"], ["Metadata_Plate"], [], ["Metadata_broad_sample"])


def test_split_across_ray_gives_the_same_numbers(lincs_wells, ray_cluster):
    """Activity (per plate) and consistency (row blocks) split into Ray tasks: the same tables, bit for bit."""
    from raycp.evaluate import copairs_ray

    meta, X = lincs_wells
    for rules, block in ((RULES["row_scoped_two_diffby"], 1 << 22), (RULES["replicates_vs_all"], 5_000)):
        local = cm.average_precision(meta, X, *rules, block_elements=block)
        split = copairs_ray.average_precision(meta, X, *rules, block_elements=block, parts=3)
        pd.testing.assert_frame_equal(split, local)
        sameby = [rules[0][0]]
        pd.testing.assert_frame_equal(copairs_ray.mean_average_precision(split, sameby, null_size=3000, seed=5),
                                      cm.mean_average_precision(local, sameby, null_size=3000, seed=5))


def test_map_ties_with_the_null_count_as_copairs_counts_them(lincs, tmp_path):
    """A group's mAP equal to a null value in float32 (1/7, 1/12: common in small groups) is not
    counted as exceeded, as copairs' float32 comparison counts it (real LINCS targets)."""
    feats = [c for c in lincs.columns if not c.startswith("Metadata_")]
    t = lincs[lincs.Metadata_target.notna() & (lincs.Metadata_pert_type != "control")].copy()
    tre = t.groupby(["Metadata_broad_sample", "Metadata_target"], as_index=False)[feats].mean()
    meta, X = tre[["Metadata_broad_sample", "Metadata_target"]], tre[feats].to_numpy(np.float64)
    listed = meta.assign(Metadata_target=meta.Metadata_target.str.split("|"))
    from copairs.map.multilabel import average_precision as multilabel_ap

    ref = multilabel_ap(listed, X, ["Metadata_target"], [], [], ["Metadata_target"], multilabel_col="Metadata_target",
                        progress_bar=False)
    ref_map = copairs_map.mean_average_precision(ref, ["Metadata_target"], null_size=10_000, threshold=0.05, seed=0,
                                                 progress_bar=False, cache_dir=tmp_path)
    got = cm.phenotypic_consistency(meta, X, "Metadata_target", sep="|").map
    fractions = np.float32(1 / np.arange(2, 30))
    assert np.isin(got["mean_average_precision"].to_numpy().astype(np.float32), fractions).any()  # the case at stake
    _assert_same_map(ref_map, got, ["Metadata_target"])


def test_blank_perturbations_and_bad_thresholds_are_refused(lincs):
    w = lincs.copy()
    treated = w.index[w.Metadata_pert_type != "control"]
    w.loc[treated[:3], "Metadata_broad_sample"] = "  "
    with pytest.raises(InputError, match="3 non-control well"):
        cm.retrieval_of_wells(w, pert_col="Metadata_broad_sample", control_query="Metadata_pert_type == 'control'")
    with pytest.raises(InputError, match="threshold must be between 0 and 1"):
        cm.retrieval_of_wells(lincs, pert_col="Metadata_broad_sample", control_query="Metadata_pert_type == 'control'",
                              threshold=2)
    with pytest.raises(InputError, match="'Metadata_nope' \\(--target-col\\) not found"):
        cm.retrieval_of_wells(lincs, pert_col="Metadata_broad_sample", target_col="Metadata_nope",
                              control_query="Metadata_pert_type == 'control'")
