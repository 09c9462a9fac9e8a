"""The registry of ``raycp run``'s stages, in the order they run (paper Methods, top to bottom).

Each stage is one module that declares a :class:`~raycp.stages.base.Stage` (name, title, the
config its fingerprint covers, whether it is expensive, ``run(ctx) -> summary``); its folder
under the run comes from :func:`raycp.layout.stage_folder`. ``raycp run`` (resume, ``--from`` /
``--to``), the report (accounting and wall time per stage) and the CLI's help read this registry.

Adding a stage: write ``raycp/stages/<name>.py`` with ``STAGE = Stage(...)`` and put it in
:data:`REGISTRY` below, after the stages whose outputs it reads (see the README's "Layout"). A
job or a test may walk another registry (:func:`make_registry`; ``raycp.run.run(registry=...)``).

Importing this package imports neither ray nor torch (stages import them when they run).
"""

from __future__ import annotations

from raycp.stages import effect, evaluate, extract, images, index, profiles, report, retrieval, train
from raycp.stages.base import Context, Stage, make_registry, read_status, write_status

REGISTRY: dict[str, Stage] = make_registry(
    index.STAGE, *images.STAGES, train.STAGE, extract.STAGE, profiles.STAGE, evaluate.STAGE, retrieval.STAGE, effect.STAGE,
    report.STAGE,
)
"""Stage name → :class:`Stage`, in run order."""

STAGES: tuple[str, ...] = tuple(REGISTRY)
"""The stage names in order; ``--from``/``--to`` take these."""


__all__ = ["REGISTRY", "STAGES", "Context", "Stage", "make_registry", "read_status", "write_status"]
