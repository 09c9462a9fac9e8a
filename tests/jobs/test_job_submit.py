"""raycp on a multi-node Ray cluster through ``ray job submit`` (issue 14), offline on one machine:
a head that runs no work (``CPU: 0``, as the cloud configs have it) and two worker nodes
(``local_cluster`` in ``conftest.py``); the demo's tiny screen goes through the whole
paper as a job (``jobs/run.py`` with ``jobs/runtime_env.yaml``), and its tasks run on both nodes.
The test stops only the Ray processes it started (by PID), never a machine-wide ``ray stop``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run.run_helper import run_overrides

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_paper_across_nodes(tiny_screen, local_cluster, tmp_path):
    """The demo's path as a platform engineer runs it: ``ray job submit -- python jobs/run.py``
    on a cluster whose head runs no work: the job SUCCEEDS, every stage accounts for every input,
    the report is written, and the work ran on both worker nodes."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_tasks

    address, env = local_cluster.address, local_cluster.env
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in run_overrides(tiny_screen, out)), [])
    sub_id = f"raycp-test-{os.getpid()}"
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--submission-id={sub_id}",
           "--runtime-env=jobs/runtime_env.yaml", "--", "python", "jobs/run.py", "tests/conf/tiny_run.yaml", *sets]
    got = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    log = (got.stdout + got.stderr)[-3000:]
    client = JobSubmissionClient(address)
    assert client.get_job_status(sub_id) == JobStatus.SUCCEEDED, log
    assert got.returncode == 0, log
    for stage in ("index", "crops", "train", "extract", "profiles", "evaluate", "effect"):
        folder = "features" if stage == "extract" else stage
        status = json.loads((out / folder / "status.json").read_text())
        s = status["summary"]
        assert status["state"] == "complete" and s["processed"] + s["quarantined"] == s["total"] > 0, stage
    assert (out / "report.html").stat().st_size > 10_000
    job_id = client.get_job_info(sub_id).job_id
    tasks = list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10_000, detail=True,
                       raise_on_missing_output=False)
    nodes = {t.node_id for t in tasks if t.node_id and t.state == "FINISHED"}
    assert len(nodes) >= 2, f"tasks ran on {len(nodes)} node(s)"


def test_jobs_are_thin_shims():
    """``jobs/*.py`` are shims of ≤ 50 lines (arguments → the raycp command → its exit code) and
    the runtime env uploads the code only, with no secrets."""
    import yaml

    jobs = sorted((ROOT / "jobs").glob("*.py"))
    assert {p.stem for p in jobs} >= {"run", "preprocess", "train", "extract", "profiles", "screen", "sweep"}
    for p in jobs:
        text = p.read_text()
        assert len(text.splitlines()) <= 50 and "from raycp.cli import main" in text, p.name
        # `python jobs/x.py` puts jobs/ first on the driver's and Ray workers' sys.path: a job named
        # like a module (jobs/profile.py hid the stdlib's profile, and torch's import failed) breaks it
        assert p.stem not in sys.stdlib_module_names, p.name
    names = [p.stem for p in jobs]  # nor an installed module (asked in a clean interpreter: -I, no tests/)
    found = subprocess.run([sys.executable, "-I", "-c", "import importlib.util, sys; "
                            "print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])", *names],
                           capture_output=True, text=True, check=True, cwd="/")
    assert found.stdout.strip() == "[]", found.stdout
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and {".git", ".venv", "runs"} <= set(env["excludes"])
    secret = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
    assert not [k for k in env.get("env_vars", {}) if any(w in k.upper() for w in secret)]
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts it as written
