"""``raycp trainset combine``: the paper's combined training set from several runs (sources)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raycp.errors import InputError

app = typer.Typer(help="Training sets across screens: the paper's combined training set.", no_args_is_help=True)


@app.command("combine")
def combine_cmd(
    source: Annotated[list[str], typer.Option("--source", help="NAME=RUN: a raycp run with crops/ and effect/ (repeat)")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder for trainset.parquet, summary.parquet, trainset.json")],
    strongest: Annotated[float, typer.Option("--strongest", help="share of each source's treatments kept, by effect")] = 0.2,
    shared_first: Annotated[bool, typer.Option("--shared-first/--no-shared-first",
                                               help="keep treatments of ≥ 2 sources wherever they are")] = True,
    controls_per_plate: Annotated[Optional[int], typer.Option("--controls-per-plate",
                                                              help="control wells per plate and type (0: all)")] = 3,
    min_cells: Annotated[int, typer.Option("--min-cells", help="drop classes with fewer cells, summed over sources (paper: 100)")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="seed of the control-well draws")] = 0,
    label: Annotated[str, typer.Option("--label", help="the class column")] = "Metadata_Treatment",
) -> None:
    """One training index across sources: each source's strongest treatments (those in ≥ 2 sources
    first), control types as classes, a few control wells per plate, no class under --min-cells.
    Train on it with `raycp train --crops OUT/trainset.parquet -o RUN`."""
    from raycp.io import urls
    from raycp.io.outputs import jsonable, write_json, write_parquet
    from raycp.trainset.combine import CombineSettings, combine
    from raycp.trainset.sources import read_source

    runs: dict[str, str] = {}
    for item in source:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise InputError(f"--source {item!r} is not NAME=RUN", fix="e.g. --source cpg0004=s3://bucket/runs/lincs")
        if name in runs:
            raise InputError(f"two sources are named {name!r}", fix="give each --source its own NAME")
        runs[name] = run
    if len(runs) < 2:
        raise InputError(f"{len(runs)} source(s): a combined set needs at least two", fix="repeat --source NAME=RUN")
    settings = CombineSettings(strongest=strongest, shared_first=shared_first,
                               controls_per_plate=controls_per_plate or None, min_cells=min_cells, seed=seed, label=label)
    result = combine({name: read_source(run, label=label) for name, run in runs.items()}, settings)
    urls.ensure_writable(output)
    write_parquet(result.index, urls.join(output, "trainset.parquet"))
    write_parquet(result.summary, urls.join(output, "summary.parquet"))
    write_json(urls.join(output, "trainset.json"), {"sources": runs, "settings": jsonable(vars(settings)),
                                                   "accounting": result.accounting})
    typer.echo(result.summary.to_string(index=False))
    a = result.accounting
    for pair, n in a["sources_sharing_shards"].items():
        typer.echo(f"raycp: warning: sources {pair.replace('+', ' and ')} read {n} of the same crop shards: their cells "
                   "are listed twice (and may fall in both the training and the validation split)", err=True)
    dropped = a["classes_dropped"]
    shared = (f"{len(a['shared_treatments'])} treatments in ≥ 2 sources kept first" if shared_first
              else "treatments in ≥ 2 sources not preferred")
    gone = (f"{len(dropped)} classes under {min_cells} cells dropped ({', '.join(f'{k}: {v}' for k, v in dropped.items())})"
            if dropped else f"no class under {min_cells} cells")
    typer.echo(f"trainset combine: {a['cells']} cells, {a['classes']} classes from {len(runs)} sources; {shared}; "
               f"{gone} → {output}")
