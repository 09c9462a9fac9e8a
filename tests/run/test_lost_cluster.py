"""A lost Ray cluster is a clear error (issue 12, kind 10): ``raycp run`` as a user runs it (the
console script, output to files as in CI), its local cluster's raylet killed mid-extraction (as an
OOM killer does): one line saying the cluster went away, exit 4, nothing half-written marked
complete, and the same command resumes. A healthy run prints no Ray-internal line, and its tables
are not cut when stdout is not a terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.run.run_helper import TINY_RUN, run_overrides


def _raycp() -> str:
    exe = shutil.which("raycp", path=str(Path(sys.executable).parent))
    assert exe, "the raycp console script is installed with the package"
    return exe


def _start(argv: list[str], env: dict, logs: Path, tag: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    proc = subprocess.Popen(argv, env=env, stdout=open(out, "wb"), stderr=open(err, "wb"))
    return proc, out, err


def _raylets(ray_tmp: Path) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "raylet/raylet" in cmd and str(ray_tmp) in cmd:
            found.append(p)
    return found


def _status(out: Path, stage: str) -> dict:
    from raycp.layout import stage_folder

    return json.loads((out / stage_folder(stage) / "status.json").read_text())


@pytest.mark.timeout(900)
def test_a_killed_raylet_is_one_line_exit_4_and_the_run_resumes(tiny_screen, tmp_path):
    import tempfile

    out = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rcp-", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAYCP_RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    argv = [_raycp(), "run", TINY_RUN, *sum((["--set", s] for s in run_overrides(tiny_screen, out)), [])]

    proc, _, err = _start(argv, env, tmp_path, "killed")
    cells = out / "features" / "cnn" / "cells"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if cells.exists() and any(cells.rglob("*.parquet")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before extraction started: " + err.read_text()[-2000:]
    raylets = _raylets(ray_tmp)
    assert len(raylets) == 1, "exactly the run's own raylet"
    raylets[0].kill()  # SIGKILL, as the OOM killer sends it; only the cluster this test started
    code = proc.wait(timeout=300)
    lines = err.read_text().splitlines()
    ours = [ln for ln in lines if ln.startswith("raycp: ")]
    assert code == 4, "\n".join(lines[-20:])
    assert len(ours) == 1 and "the Ray cluster went away during the run" in ours[0]
    assert "re-run the same command" in ours[0] and ours[0] == [ln for ln in lines if ln.strip()][-1]
    assert not any("Traceback" in ln or "internal error" in ln for ln in lines)
    assert _status(out, "extract")["state"] == "running"  # not marked complete
    assert _status(out, "crops")["state"] == "complete"

    proc, stdout, err = _start(argv, env, tmp_path, "resumed")
    assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
    extract = _status(out, "extract")
    assert extract["state"] == "complete"
    s = extract["summary"]
    assert s["processed"] + s["quarantined"] == s["total"] and s["feature_sets"]["cnn"]["sites_resumed"] >= 1
    ledger = json.loads((out / "features" / "cnn" / "ledger.json").read_text())
    written = len(list(cells.rglob("*.parquet")))
    assert ledger["processed"] == written  # every site once: no site lost or written twice

    # a healthy run: no Ray-internal log line, and the tables keep their width off a terminal
    noise = [ln for ln in err.read_text().splitlines()
             if ".cc:" in ln or "(raylet)" in ln or "WARNING" in ln or "ERROR" in ln]
    assert not noise, noise
    shutil.rmtree(ray_tmp, ignore_errors=True)
    text = stdout.read_text()
    row = next(ln for ln in text.splitlines() if "cellprofiler" in ln and "sphered" in ln)
    assert row.rstrip().endswith("│") and "/" in row.split("│")[-2]  # the last column ("significant") is there
