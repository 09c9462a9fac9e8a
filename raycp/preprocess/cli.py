"""``raycp preprocess``: one verb per image stage, and ``all`` chaining them.

Each verb reads the index (``data.index``), writes under ``data.output``, prints the stage's
ledger (processed + quarantined = total) and exits 3 when some site was quarantined.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(help="Images to single-cell crops: illumination, compression, nuclei, crops (Ray Data).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

EXIT_QUARANTINED = 3

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: section.key=value")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML run config (URL or path)")]
IndexOpt = Annotated[Optional[str], typer.Option("--index", "-i", help="screen index (default: data.index)")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="run folder (default: data.output)")]


def load_run(config: str | None, overrides: list[str] | None, index: str | None, output: str | None):
    from raycp import config as cfg
    from raycp import runtime
    from raycp.preprocess.config import RunConfig

    sets = cfg.with_options(overrides, {"data.index": index, "data.output": output})

    run = cfg.build_config(RunConfig, config, sets, skip_other_sections=True)
    runtime.use(run.compute)  # the stages connect when they have work
    return run


def _index(run):
    from raycp.preprocess.pipeline import load_index

    channels = list(run.data.channels)
    return load_index(run.data.index, channels=channels)


def _report(result) -> None:
    from raycp.console import console as _console
    from raycp.console import print_ledger

    summary = result.summary
    print_ledger(summary)
    figures = {k: v for k, v in result.figures.items() if v is not None}
    flat = {k: v for k, v in figures.items() if not isinstance(v, dict)}
    con = _console()
    if flat:
        con.print("  " + " · ".join(f"{k} {v}" for k, v in flat.items()), markup=False)
    for name, table in figures.items():
        if isinstance(table, dict):
            con.print(f"  {name}: " + " · ".join(f"{k} {v}" for k, v in table.items()), markup=False)


def _exit(results) -> None:
    if any(r.summary["quarantined"] for r in results):
        raise typer.Exit(EXIT_QUARANTINED)


def _progress():
    from raycp.console import track

    return track


def _stage(name: str, config, set_, index, output) -> None:
    from raycp.preprocess import pipeline

    run = load_run(config, set_, index, output)
    idx, compressed = _index(run)
    fn = {"illum": pipeline.run_illumination, "compress": pipeline.run_compression,
          "nuclei": pipeline.run_nuclei, "crops": pipeline.run_crops}[name]
    kwargs = {"compressed_input": compressed} if name in ("nuclei", "crops") else {}
    if compressed and name in ("illum", "compress"):
        from raycp.errors import InputError

        raise InputError(f"{run.data.index}: is a compressed index already",
                         fix="run illum/compress on the original index (16-bit TIFFs)")
    result = fn(run, idx, progress=_progress(), **kwargs)
    _report(result)
    _exit([result])


@app.command("illum")
def illum(config: ConfigOpt = None, set_: SetOpt = None, index: IndexOpt = None, output: OutputOpt = None) -> None:
    """Illumination functions per plate × channel (mean of 25 % thumbnails, median disk r=12,
    2nd-percentile robust minimum) → <run>/illum/<plate>/<channel>.npy."""
    _stage("illum", config, set_, index, output)


@app.command("compress")
def compress(config: ConfigOpt = None, set_: SetOpt = None, index: IndexOpt = None, output: OutputOpt = None) -> None:
    """Correct, stretch to the 0.05/99.95 percentiles, 8-bit lossless PNG → <run>/compressed/ and
    a new index <run>/compressed/sites.parquet; prints the measured compression ratio."""
    _stage("compress", config, set_, index, output)


@app.command("nuclei")
def nuclei(config: ConfigOpt = None, set_: SetOpt = None, index: IndexOpt = None, output: OutputOpt = None) -> None:
    """Nuclei centres per site: imported from nuclei.locations (CellProfiler SQLite, Parquet/CSV,
    per-site CSV template) or detected on the DNA channel → <run>/nuclei/<plate>/<well>_<site>.parquet."""
    _stage("nuclei", config, set_, index, output)


@app.command("crops")
def crops(config: ConfigOpt = None, set_: SetOpt = None, index: IndexOpt = None, output: OutputOpt = None) -> None:
    """128×128 crops centred on every nucleus (uint8 C×S×S + Metadata_*) → <run>/crops/<plate>/<well>_<site>.parquet.
    Uses <run>/nuclei when that stage finished, else locates nuclei in the same pass."""
    _stage("crops", config, set_, index, output)


@app.command("all")
def all_(config: ConfigOpt = None, set_: SetOpt = None, index: IndexOpt = None, output: OutputOpt = None) -> None:
    """illum → compress → nuclei → crops; each stage skips the sites it already finished."""
    from raycp.preprocess import pipeline

    run = load_run(config, set_, index, output)
    idx, compressed = _index(run)
    if compressed:
        from raycp.errors import InputError

        raise InputError(f"{run.data.index}: is a compressed index already",
                         fix="run `all` on the original index (16-bit TIFFs)")
    results = pipeline.run_all(run, idx, progress=_progress(), on_stage=_report)
    _exit(results)
