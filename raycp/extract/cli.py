"""``raycp extract CONFIG``: per-cell features of every site of a screen (Ray Data actor pools).

Registered by the lead as ``app.add_typer(extract.cli.app, name="extract")``. Prints the ledger
(processed + quarantined = total) and the run's figures; exit code 3 when a site was quarantined.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(help="Per-cell features with a trained CNN, the ImageNet or CellProfiler baselines, "
                       "or a random-init floor (Ray Data; resumable per site).",
                  pretty_exceptions_enable=False, add_completion=False, invoke_without_command=True)

EXIT_QUARANTINED = 3


@app.callback(invoke_without_command=True)
def extract(
    config: Annotated[Optional[str], typer.Argument(help="YAML run config (URL or path)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: section.key=value")] = None,
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="screen index (default: data.index)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="run folder (default: data.output)")] = None,
    model: Annotated[Optional[str], typer.Option(help="model.kind: trained | imagenet | random | cellprofiler")] = None,
    weights: Annotated[Optional[str], typer.Option(help="model.path: exported model folder or ImageNet weights file")] = None,
) -> None:
    """Profile every cell: index → crops (from <run>/crops or the images) → model actor pool →
    <run>/features/<model>/cells/<plate>/<well>_<site>.parquet + site medians (sites.parquet),
    optional DeepProfiler npz. Re-running skips finished sites."""
    from raycp import runtime
    from raycp.config import with_options
    from raycp.console import console as _console
    from raycp.console import print_ledger, track
    from raycp.extract.config import load_extract_config
    from raycp.extract.pipeline import run_extract

    sets = with_options(set_, {"model.kind": model, "model.path": weights})

    cfg = load_extract_config(config, sets, index=index, output=output)
    runtime.use(cfg.compute)
    result = run_extract(cfg, progress=track)
    print_ledger(result.ledger.summary())
    f = result.figures
    _console().print(
        f"  {f['cells']} cells × {f['features']} features → {result.folder} · {f['sites_resumed']} site(s) already "
        f"done · {f['cells_run']} cells now in {f['pipeline_s']} s ({f['cells_per_s']} cells/s, {f['device']}, "
        f"{f['forward_calls']} model passes)", markup=False)
    if result.ledger.summary()["quarantined"]:
        raise typer.Exit(EXIT_QUARANTINED)
