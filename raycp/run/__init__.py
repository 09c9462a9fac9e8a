"""``raycp run``: the whole paper in one resumable, config-driven command (Moshkov et al. 2024).

index → illumination → compression → nuclei → crops → WSL training → extraction (the trained CNN
and the baselines) → well profiles → evaluation (with and without sphering, λ curve) → treatment
effect → ``report.html``. The stages are registered in :mod:`raycp.stages` (one module each, the
report is :mod:`raycp.stages.report`); resumption and fingerprints are in :mod:`~raycp.run.runner`.

Python API::

    from raycp.run import run
    result = run("configs/demo.yaml", ["data.output=runs/demo"], stop="evaluate")

Importing this package imports neither ray nor torch.
"""

from __future__ import annotations


def load(config: str | None = None, overrides: list[str] | None = None):
    """The :class:`~raycp.run.config.PipelineConfig` from a YAML file and ``--set``-style overrides."""
    from raycp.config import build_config
    from raycp.run.config import PipelineConfig

    return build_config(PipelineConfig, config, overrides)


def run(config=None, overrides: list[str] | None = None, *, start: str | None = None, stop: str | None = None,
        progress=None, echo=print, registry=None):
    """Run (or resume) the pipeline; returns a :class:`~raycp.run.runner.RunResult`."""
    from raycp.run.config import PipelineConfig
    from raycp.run.runner import run_pipeline

    cfg = config if isinstance(config, PipelineConfig) else load(config, overrides)
    from raycp.stages import REGISTRY

    return run_pipeline(cfg, start=start, stop=stop, progress=progress, echo=echo,
                        registry=REGISTRY if registry is None else registry)


__all__ = ["load", "run"]
