"""Printing for people: one console for results, progress bars on stderr, the ledger lines.

When stdout is a terminal, output fits its width; when it is not (CI, ``tee``, a log file),
nothing is wrapped or cut: tables keep their natural width and long lines stay one line.
"""

from __future__ import annotations

import sys

_UNWRAPPED_WIDTH = 100_000


def console(*, stderr: bool = False):
    """A rich Console: the terminal's width on a terminal, no wrapping otherwise."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else _UNWRAPPED_WIDTH,
                   soft_wrap=not tty)


def echo(line: str, *, stderr: bool = False) -> None:
    """One plain line (no markup), never wrapped off a terminal."""
    console(stderr=stderr).print(line, markup=False, highlight=False)


def warn(line: str) -> None:
    """``raycp: warning: ...`` on stderr."""
    echo(f"raycp: warning: {line}", stderr=True)


def track(iterable, *, total: int, description: str):
    """A rich progress bar on stderr around a stream of per-site results."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


def print_ledger(summary: dict) -> None:
    """``stage: N input(s) = P processed + Q quarantined`` and one line per quarantine reason."""
    con = console()
    con.print(f"[bold]{summary['stage']}[/]: {summary['total']} input(s) = "
              f"{summary['processed']} processed + {summary['quarantined']} quarantined")
    for reason, n in summary["reasons"].items():
        con.print(f"  quarantined {n}: {reason}", markup=False)
