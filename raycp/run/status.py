"""A stage's ``status.json`` under the run's output: ``running`` when it starts, ``complete`` (with
wall time, summary and config fingerprint) only after its outputs are written, so a killed run
never leaves a half-written stage marked finished. Read by the runner (resume) and the report."""

from __future__ import annotations

import json

from raycp.io import urls
from raycp.io.outputs import write_json
from raycp.run.stages import FOLDERS


def status_url(cfg, stage: str) -> str:
    """``<data.output>/<stage folder>/status.json``."""
    return urls.join(cfg.data.output, FOLDERS[stage], "status.json")


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
