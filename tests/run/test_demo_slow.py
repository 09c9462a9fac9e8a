"""The slow tier of issue 8: the demo's run on the mini screen end to end, with the paper's
known-truth ordering, and a run killed during extraction that resumes without redoing earlier stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from raycp.layout import stage_folder
from raycp.run import load, run
from raycp.stages import STAGES
from tests.run.run_helper import TINY_RUN, run_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def demo_run(site_5ch, ray_cluster, lite0_weights, tmp_path_factory):
    """`make demo`'s two steps in-process: the mini screen, then `raycp run configs/demo.yaml`. The
    screen's source is the default one (the site folder, so its CellProfiler outlines are used):
    the same screen as `make demo`, 4,347 cells."""
    from raycp.screens.build import build_screen
    from raycp.screens.config import load_screen_config

    root = tmp_path_factory.mktemp("demo")
    screen = root / "screen"
    build_screen(load_screen_config("mini", overrides=[
        f"source.folders=['{site_5ch}']"]), str(screen))
    cfg = load(str(ROOT / "configs" / "demo.yaml"), [f"data.index={screen / 'index' / 'sites.parquet'}",
                                                     f"data.output={root / 'run'}", f"imagenet_weights={lite0_weights}"])
    result = run(cfg, echo=print)
    table = pd.read_parquet(root / "run" / "evaluate" / "comparison.parquet")
    print(table.to_string())
    return root / "run", result, table


def _map(table: pd.DataFrame, name: str, sphered: bool) -> float:
    rows = table[(table["feature_set"] == name) & (table["correction"].str.startswith("sphered") == sphered)]
    return float(rows["map_paper"].iloc[0])


def test_demo_writes_the_report_with_every_section(demo_run):
    out, result, _ = demo_run
    assert all(r.state == "complete" for r in result.records)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8


def test_sphering_improves_every_feature_set(demo_run):
    """Paper Fig. 6 / Table 2: correction by sphering on controls helps every feature set."""
    _, _, table = demo_run
    for name in table["feature_set"].unique():
        assert _map(table, name, True) > _map(table, name, False), (name, table.to_string())


def test_the_cnn_learns_in_the_demos_budget(demo_run):
    """Paper Fig. 2: weakly supervised training learns the treatments. Issue 16: 30 epochs × 60 steps
    of the paper's recipe on 2 CPU cores reach a validation macro F1 ≥ 0.30 (13 classes, chance
    0.077; measured 0.388, 0.374 and 0.416 for seeds 0, 1, 2), clearly above chance."""
    out, _, _ = demo_run
    status = json.loads((out / "train" / "status.json").read_text())["summary"]
    assert status["val_macro_f1"] >= 0.30 and status["val_chance_p"] < 0.01, status


@pytest.mark.xfail(strict=True, reason=(
    "does not hold in the demo's budget (30 epochs × 60 steps of 32, 64-px crops, Lite0, 2 CPU cores): CNN + "
    "sphering 0.722 / 0.737 / 0.698 for seeds 0 / 1 / 2 vs ImageNet + sphering 0.737 map_paper (12 compounds, "
    "a tie is one query's rank). benchmarks/train_budget.py measured the limit: see issue 16's note. "
    "strict: this test fails loudly once the ordering holds"))
def test_trained_cnn_beats_imagenet_after_sphering(demo_run):
    """Paper Table 2: the Cell Painting CNN (weakly supervised) beats the ImageNet baseline."""
    _, _, table = demo_run
    assert _map(table, "cnn", True) > _map(table, "imagenet", True), table.to_string()


def _features_written(out: Path) -> int:
    return sum(1 for _ in (out / "features").rglob("sites/*/*.parquet")) if (out / "features").exists() else 0


def test_killed_during_extraction_resumes_without_redoing_earlier_stages(tiny_screen, tmp_path):
    out = tmp_path / "run"
    sets = run_overrides(tiny_screen, out, **{"inference.batch_size": "8"})
    cmd = [sys.executable, "-m", "raycp.cli", "run", TINY_RUN, *[f"--set={s}" for s in sets]]
    ray_tmp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAYCP_RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 1200
    while _features_written(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {s: json.loads((out / stage_folder(s) / "status.json").read_text()) for s in STAGES[:STAGES.index("extract")]}
    assert all(st["state"] == "complete" for st in before.values())
    assert json.loads((out / "features" / "status.json").read_text())["state"] == "running"
    again = run(load(TINY_RUN, sets), echo=print)
    states = {r.stage: r.state for r in again.records}
    assert all(states[s] == "skipped" for s in before) and states["extract"] == "complete", states
    after = {s: json.loads((out / stage_folder(s) / "status.json").read_text()) for s in before}
    assert after == before
    summary = json.loads((out / "features" / "status.json").read_text())["summary"]
    assert summary["processed"] == summary["total"]
    assert sum(f["sites_resumed"] for f in summary["feature_sets"].values()) >= 1
