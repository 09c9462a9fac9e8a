"""Per-epoch classification metrics (paper Fig. 2B/2C) against scikit-learn, and the reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from raycp.train import metrics as M


def test_summary_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 500)
    y[y == 5] = 4  # class 5 never occurs ...
    pred = np.where(rng.random(500) < 0.6, y, rng.integers(0, 6, 500))
    pred[pred == 3] = 2  # ... and class 3 is never predicted
    s = M.summarize(M.confusion(y, pred, 6), loss_sum=250.0)
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=range(6), zero_division=0)
    np.testing.assert_allclose(s["precision"], p, atol=1e-6)
    np.testing.assert_allclose(s["recall"], r, atol=1e-6)
    np.testing.assert_allclose(s["f1"], f, atol=1e-6)
    assert s["support"] == support.tolist() and s["n"] == 500 and s["loss"] == 0.5
    assert s["accuracy"] == accuracy_score(y, pred)
    present = sorted(set(y))
    assert abs(s["macro_f1"] - f1_score(y, pred, labels=present, average="macro", zero_division=0)) < 1e-9


def test_reports_are_written(tmp_path):
    classes = ["DMSO", "EMPTY", "T1"]
    history = []
    for epoch in range(3):
        conf = np.array([[8, 1, 1], [2, 7, 1], [0, 1, 9]]) + epoch
        history.append({"epoch": epoch, "lr": 0.005, "seconds": 1.0, "samples": 30, "samples_per_s": 30.0,
                        "train": M.summarize(conf, 10.0), "val": M.summarize(conf.T, 12.0)})
    out = M.write_reports(history, classes, str(tmp_path), controls={"DMSO", "EMPTY"}, title="test")
    table = pd.read_parquet(out["metrics"])
    assert list(table["epoch"]) == [0, 1, 2] and {"train_macro_f1", "val_macro_f1", "val_loss"} <= set(table.columns)
    per_class = pd.read_csv(out["per_class"])
    assert per_class["class"].tolist() == classes and per_class["is_control"].tolist() == [True, True, False]
    assert {"train_precision", "val_recall", "val_f1", "val_support"} <= set(per_class.columns)
    for key in ("learning_curve", "precision_recall"):
        assert (tmp_path / f"{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chance_test_separates_a_classifier_from_label_frequencies():
    """The report's "not clearly above chance" verdict (issue 16): a permutation test on the
    confusion matrix. Predictions drawn independently of the cell are within noise of chance; 40 %
    correct predictions among 13 classes are not. Each permutation's macro F1 equals scikit-learn's."""
    rng = np.random.default_rng(0)  # over 40 seeds, blind predictions' p-values spread evenly over (0, 1)
    y = rng.integers(0, 13, 500)
    blind = rng.integers(0, 13, 500)
    informed = np.where(rng.random(500) < 0.4, y, blind)
    noise = M.chance_macro_f1(M.confusion(y, blind, 13))
    signal = M.chance_macro_f1(M.confusion(y, informed, 13))
    assert noise["chance_p"] > 0.05 and signal["chance_p"] < M.CHANCE_ALPHA
    assert abs(noise["chance_macro_f1"] - 1 / 13) < 0.02 and noise["chance_macro_f1_q95"] > noise["chance_macro_f1"]
    assert M.chance_macro_f1(M.confusion(y, blind, 13)) == noise  # seeded
    s = M.summarize(M.confusion(y, informed, 13), 0.0, chance=True)
    assert s["chance_p"] == signal["chance_p"] and s["macro_f1"] > signal["chance_macro_f1_q95"]
    # the null's F1 formula 2·tp/(support + predicted) is scikit-learn's macro F1 (here every predicted
    # class has cells; otherwise scikit-learn also averages over predicted-only classes, summarize does not)
    perm = rng.permutation(informed)
    conf = M.confusion(y, perm, 13)
    assert abs(M.summarize(conf, 0.0)["macro_f1"] - f1_score(y, perm, average="macro", zero_division=0)) < 1e-12
