"""``raycp run``: the registered stages (:mod:`raycp.stages`) in order, resumable, each with its
folder, config, status and accounting.

A stage's ``status.json`` records ``state`` (``running`` → ``complete``), its wall time, its
summary and a fingerprint of the config it ran with (chained through the stages before it). On a
re-run a complete stage with the same fingerprint is skipped, so a killed run resumes at the first
unfinished stage (and that stage resumes per site). An expensive stage (index, image stages,
training, extraction: :attr:`Stage.expensive`) that finished or started with another config is an
error before any work, with or without ``--from`` (its per-site outputs would mix two configs);
the cheap stages after extraction simply run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from raycp.config import save_resolved
from raycp.errors import ConfigError, InputError, RaycpError
from raycp.io import urls
from raycp.layout import RunLayout
from raycp.run.config import PipelineConfig
from raycp.stages import REGISTRY, Context, Stage, read_status, write_status
from raycp.stages.base import status_url

Registry = Mapping[str, Stage]


def fingerprints(cfg: PipelineConfig, registry: Registry = REGISTRY) -> dict[str, str]:
    """Per stage: sha256 of its own science (:attr:`Stage.science`: the config its outputs depend
    on, compute knobs excluded) and the fingerprint of the stage before it."""
    out, previous = {}, ""
    for stage, spec in registry.items():
        science = spec.science(cfg)
        blob = json.dumps({"stage": stage, "science": science, "previous": previous}, sort_keys=True)
        previous = out[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


@dataclass
class StageRecord:
    stage: str
    state: str  # complete | skipped (finished earlier) | failed
    seconds: float
    summary: dict = field(default_factory=dict)


@dataclass
class RunResult:
    output: str
    records: list[StageRecord]
    report: str | None

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records if r.state == "complete")


def select_stages(start: str | None, stop: str | None, registry: Registry = REGISTRY) -> list[str]:
    """The stage names from ``start`` to ``stop`` (``--from``/``--to``), in the registry's order."""
    stages = list(registry)
    for name, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in stages:
            raise ConfigError(f"{name} {value!r} is not a stage", fix=f"use one of: {', '.join(stages)}")
    i = stages.index(start) if start else 0
    j = stages.index(stop) if stop else len(stages) - 1
    if i > j:
        raise ConfigError(f"--from {start} comes after --to {stop}", fix=f"stages run in order: {' → '.join(stages)}")
    return list(stages[i:j + 1])


def preflight(cfg: PipelineConfig, chosen: list[str], registry: Registry = REGISTRY) -> dict[str, str]:
    """Everything that can be checked before work: stage configs, the index, the output, the
    weights files, and that no finished expensive stage ran with another config."""
    try:
        if cfg.train.enabled:
            cfg.train_config()
    except ValueError as exc:
        raise ConfigError(f"config: {' '.join(str(exc).split())}", fix="fix the config file or --set") from None
    if not urls.exists(cfg.data.index):
        raise InputError(f"{cfg.data.index}: screen index not found",
                         fix="build it with `raycp index build` (or `raycp screen build`) and set data.index")
    urls.ensure_writable(cfg.data.output)
    weights = [cfg.imagenet_weights] + [f.path for f in cfg.features if f.kind == "imagenet"]
    if cfg.train.model.imagenet_weights:
        weights.append(cfg.train.model.imagenet_weights)
    for path in filter(None, dict.fromkeys(weights)):
        if not urls.exists(path):
            raise InputError(f"{path}: ImageNet weights file not found",
                             fix="pass a local .safetensors/.pth file (raycp never downloads weights)")
    prints = fingerprints(cfg, registry)
    for stage in chosen:
        st = read_status(cfg, stage) or {}
        # per-site or per-epoch outputs of another config must not be resumed into, whether the
        # stage finished or was killed, and also under --from (it would keep the old sites)
        if registry[stage].expensive and st.get("fingerprint") not in (None, prints[stage]):
            folder = RunLayout(cfg.data.output).folder(stage)
            how = "finished" if st.get("state") == "complete" else "started"
            raise ConfigError(f"stage {stage!r} in {cfg.data.output} was {how} with another config",
                              fix=f"use a new data.output, or delete {folder} and the stages after it")
    return prints


def _forget_start(cfg: PipelineConfig, stage: str, folder: str) -> None:
    """A stage that never ran before and refused its input (a user's mistake, exit 2) before
    writing anything leaves no trace: its ``status.json`` would otherwise lock the folder to the
    refused config, and the corrected run would be refused as "started with another config"."""
    status = status_url(cfg, stage)
    fs, root = urls.filesystem(folder)
    try:
        written = [p for p in fs.find(root) if not p.endswith("/status.json")]
    except (FileNotFoundError, OSError):
        return
    if not written:
        fs.rm(urls.filesystem(status)[1])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_pipeline(cfg: PipelineConfig, *, start: str | None = None, stop: str | None = None,
                 progress: Callable | None = None, echo: Callable[[str], None] = print,
                 registry: Registry = REGISTRY) -> RunResult:
    """Run (or resume) the stages from ``start`` to ``stop``; see the module docstring.
    ``registry``: the stages to walk (:data:`raycp.stages.REGISTRY`; a job or a test may extend it)."""
    from raycp import runtime

    runtime.use(cfg.compute)  # connected by the first stage that needs Ray; a finished run starts none
    chosen = select_stages(start, stop, registry)
    force = set(chosen) if start else set()  # --from: the chosen stages run again (they still resume per site)
    prints = preflight(cfg, chosen, registry)
    ctx = Context(cfg=cfg, progress=progress, echo=echo, stages=tuple(registry.values()))
    layout = RunLayout(cfg.data.output)
    records = []
    ran_before = False  # once a stage has (re-)run, the stages after it read new inputs: they run too
    for n, stage in enumerate(chosen, 1):
        st = read_status(cfg, stage)
        done = st is not None and st.get("state") == "complete" and st.get("fingerprint") == prints[stage]
        if done and stage not in force and not registry[stage].always_runs and not ran_before:
            ctx.summaries[stage] = st.get("summary", {})
            records.append(StageRecord(stage, "skipped", float(st.get("seconds", 0.0)), st.get("summary", {})))
            echo(f"[{n}/{len(chosen)}] {stage}: finished earlier ({st.get('seconds', 0):.1f} s), skipped")
            continue
        echo(f"[{n}/{len(chosen)}] {stage} …")
        folder = layout.folder(stage)
        started = _now()
        write_status(cfg, stage, state="running", fingerprint=prints[stage], started=started)
        t0 = time.perf_counter()
        try:
            summary = registry[stage].run(ctx)
        except RaycpError as exc:
            if st is None and exc.exit_code == 2:
                _forget_start(cfg, stage, folder)
            raise
        seconds = time.perf_counter() - t0
        save_resolved(cfg, folder)
        write_status(cfg, stage, state="complete", fingerprint=prints[stage], started=started, finished=_now(),
                      seconds=round(seconds, 2), summary=summary)
        ctx.summaries[stage] = summary
        ran_before = True
        records.append(StageRecord(stage, "complete", seconds, summary))
        q = summary.get("quarantined", 0)
        echo(f"[{n}/{len(chosen)}] {stage}: {summary.get('processed', 0)} processed · {q} quarantined · "
             f"{seconds:.1f} s")
    save_resolved(cfg, cfg.data.output)
    report = layout.report if "report" in chosen else None
    return RunResult(output=cfg.data.output, records=records, report=report)
