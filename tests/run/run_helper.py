"""Data makers for ``raycp run``: a tiny labelled screen of real cells and a run config over it."""

from __future__ import annotations

from pathlib import Path

PEDIATRIC = "images/pediatric_5ch_BR00143976_C03_s3/images/orig"

CONF = Path(__file__).resolve().parents[1] / "conf"
#: The tiny screen (2 plates, 6 compounds of 3 MoAs, 8 real cells a site) and the run over it:
#: test configs that are also runnable examples (see the comments in each file).
TINY_SCREEN = str(CONF / "tiny_screen.yaml")
TINY_RUN = str(CONF / "tiny_run.yaml")


def run_overrides(screen: Path, output: Path, **extra: str) -> list[str]:
    """``--set`` overrides of :data:`TINY_RUN` for one test: the screen's index, the output, ``extra``."""
    sets = {"data.index": str(screen / "index" / "sites.parquet"), "data.output": str(output), **extra}
    return [f"{k}={v}" for k, v in sets.items()]
