"""Single-cell classification metrics of the WSL pretext task (paper Fig. 2B/2C).

Per epoch, on training batches (as trained: augmented, train mode, like Keras' ``fit`` logs) and
on validation crops (no augmentation, eval mode): mean cross-entropy, accuracy, per-class
precision / recall / F1 and macro F1. Everything derives from a confusion matrix and a loss sum,
which add across ranks (one all-reduce per epoch).

Conventions (as ``sklearn.metrics`` with ``zero_division=0``): a class never predicted has
precision 0; macro F1 averages the classes that have cells in that set.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from raycp.io import urls


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``n×n`` counts, rows = true class, columns = predicted."""
    idx = np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


#: Permutations of the chance test (:func:`chance_macro_f1`) and its significance level: a model
#: is "clearly above chance" only below 0.01 (the issue-16 demo's undertrained CNN, macro F1 0.083
#: against a chance of 0.065 on 500 cells of 13 classes, had p = 0.049).
CHANCE_PERMUTATIONS = 1000
CHANCE_ALPHA = 0.01


def chance_macro_f1(conf: np.ndarray, *, permutations: int = CHANCE_PERMUTATIONS, seed: int = 0) -> dict:
    """Is a macro F1 above chance? A permutation test on the confusion matrix ``conf`` (n×n counts).

    The null keeps both the true labels and the predicted labels but pairs them at random (a
    classifier that predicts each class as often as this one, blind to the cell): macro F1 of each
    permutation from its true positives, ``F1_c = 2·tp_c / (support_c + predicted_c)`` (the
    marginals do not change under permutation), averaged over the classes with cells, as
    :func:`summarize`'s macro F1. This tests significance, not size: with 10,000 validation cells a
    model barely above chance is already significant. Returns ``chance_macro_f1`` (the null's mean),
    ``chance_macro_f1_q95`` (its 95th percentile) and ``chance_p``, ``(#{null ≥ observed} + 1) /
    (permutations + 1)``; a model whose ``chance_p`` is at least :data:`CHANCE_ALPHA` is not clearly
    above chance. NaNs for an empty matrix. Deterministic for a ``seed``. Raises ``ValueError``
    for a non-square matrix or ``permutations`` < 1.
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got {conf.shape}")
    if permutations < 1:
        raise ValueError(f"permutations must be ≥ 1, got {permutations}")
    if conf.sum() == 0:
        return {"chance_macro_f1": float("nan"), "chance_macro_f1_q95": float("nan"), "chance_p": float("nan")}
    k = conf.shape[0]
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)
    present = support > 0
    denom = (support + predicted).astype(np.float64)

    def macro(tp: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
        return f1[..., present].mean(axis=-1)

    observed = float(macro(np.diag(conf).astype(np.float64)))
    y_true = np.repeat(np.arange(k), support)
    y_pred = np.repeat(np.arange(k), predicted)
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for i in range(permutations):
        hit = y_true == rng.permutation(y_pred)
        null[i] = macro(np.bincount(y_true[hit], minlength=k).astype(np.float64))
    return {"chance_macro_f1": float(null.mean()), "chance_macro_f1_q95": float(np.quantile(null, 0.95)),
            "chance_p": float((np.sum(null >= observed - 1e-12) + 1) / (permutations + 1))}


def summarize(conf: np.ndarray, loss_sum: float, *, chance: bool = False) -> dict:
    """Loss, accuracy, macro F1 and per-class precision/recall/F1/support from a confusion matrix;
    with ``chance``, also the permutation test of the macro F1 (:func:`chance_macro_f1`)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    support = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    n = conf.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    present = support > 0
    return {
        "n": int(n),
        "loss": float(loss_sum / n) if n else float("nan"),
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "precision": precision.round(6).tolist(),
        "recall": recall.round(6).tolist(),
        "f1": f1.round(6).tolist(),
        "support": support.astype(int).tolist(),
    } | (chance_macro_f1(conf.astype(np.int64)) if chance else {})


def scalar_metrics(entry: dict) -> dict:
    """The flat scalars reported to Ray Train for one epoch."""
    out = {"epoch": entry["epoch"], "lr": entry["lr"], "seconds": entry["seconds"],
           "samples_per_s": entry["samples_per_s"]}
    for part in ("train", "val"):
        if entry.get(part):
            for key in ("loss", "accuracy", "macro_f1"):
                out[f"{part}_{key}"] = entry[part][key]
    if entry.get("val") and "chance_p" in entry["val"]:
        out["val_chance_p"] = entry["val"]["chance_p"]
    return out


def history_table(history: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([scalar_metrics(e) for e in history])


def per_class_table(entry: dict, classes: list[str], controls: set[str] | None = None) -> pd.DataFrame:
    """One row per class: precision/recall/F1/support on train and validation (paper Fig. 2C)."""
    rows = {"class": classes, "is_control": [c in (controls or set()) for c in classes]}
    for part in ("train", "val"):
        if entry.get(part):
            for key in ("precision", "recall", "f1", "support"):
                rows[f"{part}_{key}"] = entry[part][key]
    return pd.DataFrame(rows)


def plot_learning_curve(history: list[dict], url: str, *, title: str = "") -> None:
    """Macro F1 and loss per epoch, training solid and validation dashed (paper Fig. 2B)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = history_table(history)
    epochs = table["epoch"] + 1
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "macro_f1", "macro F1"), (axes[1], "loss", "cross-entropy")):
        for part, style in (("train", "-"), ("val", "--")):
            col = f"{part}_{key}"
            if col in table:
                ax.plot(epochs, table[col], style, marker="o", ms=3, label="training" if part == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    urls.atomic_write_bytes(url, buf.getvalue())


def plot_precision_recall(table: pd.DataFrame, url: str, *, part: str = "val") -> None:
    """Per-class precision vs recall, controls in blue (paper Fig. 2C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if f"{part}_precision" in table:
        ctrl = table["is_control"].to_numpy(bool)
        ax.scatter(table.loc[~ctrl, f"{part}_recall"], table.loc[~ctrl, f"{part}_precision"], s=12, c="tab:orange",
                   label="treatments")
        ax.scatter(table.loc[ctrl, f"{part}_recall"], table.loc[ctrl, f"{part}_precision"], s=18, c="tab:blue",
                   label="controls")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"per-class, {'validation' if part == 'val' else 'training'}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    urls.atomic_write_bytes(url, buf.getvalue())


def write_reports(history: list[dict], classes: list[str], folder: str, *, controls: set[str] | None = None,
                  title: str = "") -> dict[str, str]:
    """``metrics.parquet`` + ``metrics.json`` (every epoch), ``per_class.csv`` (last epoch),
    ``learning_curve.png`` and ``precision_recall.png`` in ``folder``."""
    out = {}
    table = history_table(history)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    out["metrics"] = urls.join(folder, "metrics.parquet")
    urls.atomic_write_bytes(out["metrics"], buf.getvalue())
    out["history"] = urls.join(folder, "metrics.json")
    urls.atomic_write_text(out["history"], json.dumps({"classes": classes, "history": history}, indent=1))
    per_class = per_class_table(history[-1], classes, controls)
    out["per_class"] = urls.join(folder, "per_class.csv")
    urls.atomic_write_text(out["per_class"], per_class.to_csv(index=False))
    out["learning_curve"] = urls.join(folder, "learning_curve.png")
    plot_learning_curve(history, out["learning_curve"], title=title)
    out["precision_recall"] = urls.join(folder, "precision_recall.png")
    plot_precision_recall(per_class, out["precision_recall"])
    return out
