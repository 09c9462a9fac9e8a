"""The ``train`` stage: weakly supervised training of the Cell Painting CNN (paper Methods,
"Weakly supervised learning"); resumes from the latest checkpoint (:mod:`raycp.train.trainer`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from raycp.io.outputs import jsonable
from raycp.stages.base import Context, Stage, not_run, read_status


def run_train(ctx: Context) -> dict:
    """Train on ``<run>/crops`` into ``<run>/train``; the summary holds the last epoch's metrics."""
    if not ctx.cfg.train.enabled:
        return not_run("train.enabled=false")
    from raycp.train import trainer

    cfg = ctx.cfg.train_config()
    prep = trainer.prepare(cfg)
    s = prep.summary()
    ctx.echo(f"  {s['crops']} crops ({s['train']} train / {s['val']} val, {cfg.split.strategy}) · {s['classes']} "
             f"classes · balanced epoch {s['epoch_samples']} · {cfg.optim.epochs} epochs")
    with _EpochWatcher(cfg, ctx.echo):
        result = trainer.finish(cfg, prep, trainer.run_trainer(trainer.build_trainer(cfg, prep=prep)))
    last = result.last
    val = last.get("val") or {}
    if (verdict := undertrained(val)) is not None:
        ctx.echo(f"  note: {verdict}")
    return jsonable({"total": s["crops"], "processed": s["crops"], "quarantined": 0, "reasons": {},
                     "epochs": len(result.history), "classes": len(result.classes),
                     "train_macro_f1": last.get("train", {}).get("macro_f1"), "val_macro_f1": val.get("macro_f1"),
                     "val_accuracy": val.get("accuracy"), "val_loss": val.get("loss"),
                     "val_chance_macro_f1": val.get("chance_macro_f1"), "val_chance_p": val.get("chance_p"),
                     "model": result.model_dir, "reports": result.reports, "history": result.history})


def undertrained(val: dict | None) -> str | None:
    """A sentence when the validation macro F1 is not clearly above chance (permutation test,
    :func:`raycp.train.metrics.chance_macro_f1`, p ≥ ``CHANCE_ALPHA``), else None: such a CNN has
    not learnt the treatments yet, so its profiles say nothing about weakly supervised learning."""
    import math

    from raycp.train.metrics import CHANCE_ALPHA

    figures = [(val or {}).get(k) for k in ("macro_f1", "chance_macro_f1", "chance_p")]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in figures) or val["chance_p"] < CHANCE_ALPHA:
        return None
    return (f"the CNN's validation macro F1 {val['macro_f1']:.3f} is not clearly above chance "
            f"({val['chance_macro_f1']:.3f}; permutation p = {val['chance_p']:.3f} ≥ {CHANCE_ALPHA:g}): it is "
            "undertrained, and its profiles are not evidence against the method (train more epochs or steps)")


def training_note(cfg) -> str | None:
    """:func:`undertrained`'s sentence for a run (``PipelineConfig``) whose own CNN is one of the
    compared feature sets, from its train stage's status; None otherwise."""
    if not any(m.kind == "trained" and not m.path for m in cfg.features):
        return None
    status = read_status(cfg, "train")
    history = ((status or {}).get("summary") or {}).get("history") or []
    return undertrained(history[-1].get("val")) if history else None


class _EpochWatcher:
    """Prints each checkpointed epoch while Ray Train runs (the workers' own output stays quiet)."""

    def __init__(self, cfg, echo: Callable[[str], None], interval: float = 2.0) -> None:
        self.cfg, self.echo, self.interval = cfg, echo, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raycp-epochs", daemon=True)

    def _watch(self) -> None:
        from raycp.train import trainer

        seen = {e for e, _ in trainer.checkpoint_dirs(self.cfg)}
        start = time.perf_counter()
        while not self._stop.wait(self.interval):
            try:
                epochs = {e for e, _ in trainer.checkpoint_dirs(self.cfg)}
            except OSError:
                continue
            for e in sorted(epochs - seen):
                self.echo(f"  epoch {e + 1}/{self.cfg.optim.epochs} checkpointed ({time.perf_counter() - start:.0f} s)")
            seen |= epochs

    def __enter__(self) -> _EpochWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _science(cfg) -> dict:
    from raycp.train.config import train_science

    tree = cfg.train.model_dump(mode="json", exclude={"compute"})
    return train_science(tree) | {"imagenet_weights": cfg.imagenet_weights}


STAGE = Stage("train", "CNN training (crops)", run_train, _science, expensive=True, section="train")
