"""The stage API: what a stage of ``raycp run`` declares (:class:`Stage`), what it is given
(:class:`Context`) and its ``status.json``.

A stage is a name, its folder under the run (:func:`raycp.layout.stage_folder`), a title, the part
of the config its outputs depend on (``science(cfg) -> dict``, hashed into the stage's fingerprint
with the fingerprint of the stage before it), whether its outputs are per-site or per-epoch files
(``expensive``: a changed config must not mix into them) and ``run(ctx) -> summary``. A summary
holds the stage's accounting (``total`` = ``processed`` + ``quarantined``, with ``reasons``) and
its figures. :mod:`raycp.stages` holds the registry; ``raycp run``, the report and (next) jobs and
sweeps read it.

A stage's ``status.json`` (``<run>/<stage>/status.json``) says ``running`` when the stage starts
and ``complete`` (with wall time, summary and config fingerprint) only after its outputs are
written, so a killed run never leaves a half-written stage marked finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from raycp.io import urls
from raycp.io.outputs import write_json
from raycp.layout import RunLayout, stage_folder


@dataclass
class Context:
    """What a stage is given: the run config, a progress wrapper, a printer, the summaries of the
    stages before it (this invocation's, or read from their status), and the registry."""

    cfg: object  # raycp.run.config.PipelineConfig
    progress: Callable | None = None
    echo: Callable[[str], None] = print
    summaries: dict = field(default_factory=dict)
    stages: tuple = ()  # the registry's stages, in order (the report reads every one's status)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.cfg.data.output)

    def folder(self, stage: str) -> str:
        return self.layout.folder(stage)


@dataclass(frozen=True)
class Stage:
    """One registered stage of ``raycp run`` (see the module docstring)."""

    name: str
    title: str
    run: Callable[[Context], dict]
    science: Callable[[object], dict]
    expensive: bool = False
    section: str | None = None  # the config section the stage reads (for readers of the registry)
    always_runs: bool = False  # built from the other stages' outputs (the report): never skipped

    @property
    def folder(self) -> str:
        return stage_folder(self.name)


def make_registry(*stages: Stage) -> dict[str, Stage]:
    """Stage name → :class:`Stage`, in the order given (the order they run). Raises ``ValueError``
    when two stages share a name or a folder (they would share a ``status.json``)."""
    registry: dict[str, Stage] = {}
    folders: dict[str, str] = {}
    for s in stages:
        if s.name in registry or s.folder in folders:
            other = s.name if s.name in registry else folders[s.folder]
            raise ValueError(f"stage {s.name!r} clashes with stage {other!r} (same name or folder {s.folder!r})")
        registry[s.name] = s
        folders[s.folder] = s.name
    return registry


def status_url(cfg, stage: str) -> str:
    """``<data.output>/<stage folder>/status.json``."""
    return RunLayout(cfg.data.output).status(stage)


def read_status(cfg, stage: str) -> dict | None:
    """The stage's status, or ``None`` when it never started (or the file is not raycp's)."""
    url = status_url(cfg, stage)
    if not urls.exists(url):
        return None
    try:
        return json.loads(urls.read_bytes(url))
    except ValueError:
        return None  # a torn status file (writes are atomic, so only a foreign file) means: not finished


def write_status(cfg, stage: str, **fields) -> None:
    """Write the stage's status atomically."""
    write_json(status_url(cfg, stage), {"stage": stage, **fields})


# -- what several stages share --------------------------------------------------------------------

def not_run(why: str) -> dict:
    """The summary of a stage switched off by its config (nothing to account for)."""
    return {"total": 0, "processed": 0, "quarantined": 0, "reasons": {}, "skipped": why}


def sum_summaries(parts: dict[str, dict]) -> dict:
    """One accounting over several sub-runs (feature sets): totals add, reasons are prefixed."""
    total = {"total": 0, "processed": 0, "quarantined": 0, "reasons": {}}
    for name, s in parts.items():
        for k in ("total", "processed", "quarantined"):
            total[k] += int(s.get(k, 0))
        for reason, n in (s.get("reasons") or {}).items():
            total["reasons"][f"{name}: {reason}"] = n
    return total


