"""``raycp train CONFIG``: weakly supervised training of the Cell Painting CNN on Ray Train.

Registered by the main CLI as ``app.add_typer(raycp.train.cli.app, name="train")``.
Re-running the same command resumes from the latest checkpoint and re-exports the model.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(help="Train the Cell Painting CNN (weakly supervised: predict each cell's treatment) on Ray Train.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  context_settings={"allow_interspersed_args": True})  # `raycp train CONFIG --dry-run`

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: section.key=value")]


def load_train_config(config: str | None, overrides: list[str] | None):
    from raycp.config import build_config
    from raycp.train.config import TrainConfig

    return build_config(TrainConfig, config, overrides)


@app.callback(invoke_without_command=True)
def train(
    config: Annotated[Optional[str], typer.Argument(help="train YAML (crops, output, optim, split, compute ...)")] = None,
    set_: SetOpt = None,
    crops: Annotated[Optional[str], typer.Option("--crops", help="crop shards (overrides crops)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="run folder (overrides output)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check the inputs and print the plan, train nothing")] = False,
) -> None:
    """Train (or resume) EfficientNet-B0 to classify each cell's treatment; writes checkpoints,
    metrics, learning curves and the exported model under <output>/train/."""
    from raycp.config import with_options
    from raycp.console import console as _console
    from raycp.train import trainer

    sets = with_options(set_, {"crops": crops, "output": output})
    if config is None and not sets:
        raise typer.BadParameter("give a train config file (or --crops and --output)")
    cfg = load_train_config(config, sets)
    con = _console()
    prep = trainer.prepare(cfg)
    s = prep.summary()
    con.print(f"[bold]crops[/] {s['crops']} ({s['train']} train / {s['val']} val, {cfg.split.strategy}) · "
              f"classes {s['classes']} · balanced epoch {s['epoch_samples']} ({s['per_class_draw']} per class) · "
              f"crop {'×'.join(map(str, s['shape']))}")
    if dry_run:
        return
    from raycp import runtime

    runtime.use()  # a local cluster with the defaults, or RAY_ADDRESS
    result = trainer.fit(cfg)
    from rich.table import Table

    kind = "" if cfg.formulation == "classification" else f" · {cfg.formulation}"
    table = Table(title=f"{cfg.model.arch}{kind} · {cfg.compute.num_workers} worker(s)", title_justify="left")
    domain = cfg.formulation == "grl"
    for col in ("epoch", "lr", "train loss", "train F1", "val loss", "val acc", "val F1",
                *(["domain acc"] if domain else []), "samples/s"):
        table.add_column(col, justify="right")
    for e in result.history:
        val = e.get("val") or {}
        table.add_row(str(e["epoch"] + 1), f"{e['lr']:.4g}", f"{e['train']['loss']:.3f}", f"{e['train']['macro_f1']:.3f}",
                      f"{val.get('loss', float('nan')):.3f}", f"{val.get('accuracy', float('nan')):.3f}",
                      f"{val.get('macro_f1', float('nan')):.3f}",
                      *([f"{(e.get('domain') or {}).get('accuracy', float('nan')):.3f}"] if domain else []),
                      f"{e['samples_per_s']:.1f}")
    con.print(table)
    con.print(f"model: {result.model_dir} · learning curve: {result.reports['learning_curve']} · "
              f"per class: {result.reports['per_class']}", markup=False, soft_wrap=True)
