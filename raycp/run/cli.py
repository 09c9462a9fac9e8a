"""``raycp run CONFIG``: the whole pipeline, resumable; ``--from``/``--to`` run a part.

Registered by the main CLI as the ``run`` command. Prints each stage as it starts and ends, then
the stages' accounting and wall time, the comparison table and where the report is. Exit code 3
when some input was quarantined (the run still completes), 2 for a bad config or input.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raycp.stages import STAGES

EXIT_QUARANTINED = 3
_STAGES = " | ".join(STAGES)


def run(
    config: Annotated[Optional[str], typer.Argument(help="run YAML (data, train, features, profiles, compute ...)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: section.key=value")] = None,
    start: Annotated[Optional[str], typer.Option("--from", help=f"first stage to (re-)run: {_STAGES}")] = None,
    stop: Annotated[Optional[str], typer.Option("--to", help="last stage to run")] = None,
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="screen index (overrides data.index)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="run folder URL (overrides data.output)")] = None,
) -> None:
    """Images → crops → CNN training → features (CNN, ImageNet, CellProfiler) → profiles → evaluation
    → treatment effect → report.html. Re-running resumes at the first unfinished stage."""
    from rich.table import Table

    from raycp import run as api
    from raycp.config import with_options
    from raycp.console import console as _console
    from raycp.console import track

    sets = with_options(set_, {"data.index": index, "data.output": output})
    if config is None and not sets:
        raise typer.BadParameter("give a run config file (see configs/demo.yaml)")
    from raycp.run.runner import select_stages

    select_stages(start, stop)  # a mistyped stage is reported as such, before the config is read
    cfg = api.load(config, sets)
    con = _console()
    result = api.run(cfg, start=start, stop=stop, progress=track,
                     echo=lambda line: con.print(line, markup=False, highlight=False))
    table = Table(title="stages", title_justify="left")
    for col in ("stage", "state", "total", "processed", "quarantined", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "state") else "right")
    quarantined = 0
    for r in result.records:
        s = r.summary
        quarantined += int(s.get("quarantined", 0) or 0)
        table.add_row(r.stage, r.state, str(s.get("total", "")), str(s.get("processed", "")),
                      str(s.get("quarantined", "")), f"{r.seconds:.1f}")
    con.print(table)
    comparison = next((r.summary.get("comparison") for r in result.records if r.stage == "evaluate"), None)
    if comparison:
        t = Table(title="comparison (treatment profiles, MoA matching)", title_justify="left")
        for col in ("feature set", "correction", "map_paper", "mAP", "FoE", "significant"):
            t.add_column(col, justify="left" if col in ("feature set", "correction") else "right")
        for row in comparison:
            t.add_row(row["feature_set"], row["correction"], _fmt(row["map_paper"]), _fmt(row["map"]),
                      _fmt(row["folds_of_enrichment"]), f"{row['significant_queries']}/{row['queries']}")
        con.print(t)
        from raycp.stages.train import training_note

        if (note := training_note(cfg)) is not None:
            con.print(f"note: {note}", markup=False, soft_wrap=True)
    if result.report:
        con.print(f"report: {result.report}", markup=False, soft_wrap=True)
    if quarantined:
        raise typer.Exit(EXIT_QUARANTINED)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"
