"""``raycp sweep lambda`` (issue 15): the paper's λ curve (Fig. 6B) as Ray Tune trials.

Given the real LINCS plate, every trial equals a direct evaluation at its λ (what ``raycp profile
evaluate --sphere-lambda`` computes), the published numbers come out at none and λ = 0.01, and the
selection rules pick from that curve. An interrupted sweep (its driver killed with ``kill -9``
mid-sweep) restores with ``--resume`` and runs only the trials that had not finished."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raycp.evaluate import evaluate
from raycp.sweep.lambdas import JUMP_LAMBDAS, PAPER_LAMBDAS, EvaluationSpec, lambda_grid, select_lambda
from tests.jobs.conftest import kill_cluster, own_ray_env
from tests.profiles.conftest import LINCS_CONTROLS, LINCS_TREATMENT

SPEC = EvaluationSpec(treatment_cols=tuple(LINCS_TREATMENT), annotation_col="Metadata_moa", control_query=LINCS_CONTROLS)
ARGS = ["--treatment-cols", ",".join(LINCS_TREATMENT), "--annotation-col", "Metadata_moa",
        "--control-query", LINCS_CONTROLS]


def test_grids_are_the_papers_and_the_jump_recipes():
    assert lambda_grid() == list(PAPER_LAMBDAS) and PAPER_LAMBDAS[0] == 1.0 and PAPER_LAMBDAS[-1] == 1e-8
    jump = lambda_grid(preset="jump")
    assert len(jump) == 25 and jump[0] == pytest.approx(1e3) and jump[-1] == pytest.approx(1e-5)
    assert len(JUMP_LAMBDAS) == 25
    from raycp.errors import InputError

    for bad in ([0.0], [-1.0], [math.inf]):
        with pytest.raises(InputError):
            lambda_grid(bad)
    with pytest.raises(InputError, match="unknown λ preset"):
        lambda_grid(preset="cellpainting")


def test_every_trial_equals_a_direct_evaluation_on_lincs(lincs_path, ray_cluster, tmp_path):
    from raycp.sweep.writers import read_sets, write_lambda_sweep

    frames = read_sets({"lincs": str(lincs_path)})
    lams = [1.0, 0.01, 1e-4]
    result = write_lambda_sweep(frames, SPEC, lams, str(tmp_path / "sweep"), echo=lambda *_: None)
    curve = result["curve"]
    assert result["accounting"] == {"total": 4, "processed": 4, "failed": 0, "restored": 0, "failures": []}
    assert list(curve["sphere_lambda"].fillna(-1)) == [-1, 1.0, 0.01, 1e-4]  # none first, then λ descending
    for row in curve.to_dict("records"):
        lam = None if math.isnan(row["sphere_lambda"]) else row["sphere_lambda"]
        direct = evaluate(frames["lincs"], LINCS_TREATMENT, "Metadata_moa", LINCS_CONTROLS, sphere_lambda=lam)
        s = direct.evaluation.summary
        assert (row["map_paper"], row["map"], row["folds_of_enrichment"]) == (
            s["map_paper"], s["map"], s["folds_of_enrichment"]), lam
    published = dict(zip(curve["sphere_lambda"].fillna(-1), curve["map_paper"]))
    assert published[-1] == pytest.approx(0.26266549643224735, abs=1e-9)    # the paper's code, none
    assert published[0.01] == pytest.approx(0.24479016491306296, abs=1e-9)  # and λ = 0.01
    sel = json.loads((tmp_path / "sweep" / "lambda_selection.json").read_text())["lincs"]
    lam_rows = curve[curve["sphere_lambda"].notna()]
    assert sel["best_lambda"] == lam_rows.loc[lam_rows["map_paper"].idxmax(), "sphere_lambda"] == 1.0
    assert sel["sphering_helps"] is False     # normalised, feature-selected CellProfiler profiles
    assert sel["jump_lambda"] is None and "issue 18" in sel["jump_rule"]
    assert (tmp_path / "sweep" / "lambda_curve_lincs.png").stat().st_size > 5_000
    meta = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert meta["state"] == "complete" and meta["lambdas"] == lams


def test_a_sweep_in_object_storage_is_written_and_restored_there(lincs_path, ray_cluster, s3_server):
    """The sweep's folder is an ``s3://`` URL (a real S3 API): the Tune experiment, the curve and the
    accounting land there; ``--resume`` of the finished sweep restores every trial and runs none."""
    from raycp.sweep.writers import read_sets, write_lambda_sweep

    out = f"s3://{s3_server['bucket']}/sweeps/lincs-lambda"
    frames = read_sets({"lincs": str(lincs_path)})
    first = write_lambda_sweep(frames, SPEC, [0.01], out, echo=lambda *_: None)
    fs = s3_server["fs"]
    fs.invalidate_cache()
    assert fs.exists(f"{out}/lambda_curve.parquet") and fs.glob(f"{out}/lambda/*/result.json")
    again = write_lambda_sweep(frames, SPEC, [0.01], out, resume=True, echo=lambda *_: None)
    assert again["accounting"]["restored"] == again["accounting"]["total"] == 2
    pd.testing.assert_frame_equal(again["curve"], first["curve"])


def test_selection_rules_on_a_saturating_curve():
    curve = pd.DataFrame({"sphere_lambda": [math.nan, 1.0, 0.1, 0.01, 0.001],
                          "map_paper": [0.30, 0.35, 0.395, 0.40, 0.40]})
    sel = select_lambda(curve, tolerance=0.01)
    assert sel["best_lambda"] == 0.01          # ties: the larger λ
    assert sel["saturated_lambda"] == 0.1      # the weakest sphering within 0.01 of the best
    assert sel["sphering_helps"] is True and sel["none"] == 0.30
    jump = curve.assign(map_negcon=[0.1, 0.5, 0.6, 0.7, 0.2], map_nonrep=[0.1, 0.5, 0.6, 0.3, 0.9])
    assert select_lambda(jump)["jump_lambda"] == 0.1     # best mean of the two mAPs


def _raycp(*argv: str, env: dict, **kw):
    exe = str(Path(sys.executable).parent / "raycp")
    return subprocess.Popen([exe, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.timeout(600)
def test_an_interrupted_sweep_resumes_only_its_missing_trials(lincs_path, tmp_path):
    out = tmp_path / "sweep"
    ray_tmp, env = own_ray_env("rsw")
    argv = ["sweep", "lambda", f"lincs={lincs_path}", *ARGS, "--preset", "jump", "-o", str(out), "--num-cpus", "2"]
    proc = _raycp(*argv, env=env, start_new_session=True)
    deadline = time.time() + 300
    done: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in out.glob("lambda/*/result.json") if p.stat().st_size > 0]
        if len(done) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted: {proc.stdout.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)        # the driver and its supervisor, then the local Ray
    kill_cluster(ray_tmp)
    proc.wait(30)
    finished = {p.parent.name: p.read_bytes() for p in out.glob("lambda/*/result.json") if p.stat().st_size > 0}
    assert 3 <= len(finished) < 26
    assert json.loads((out / "sweep.json").read_text())["state"] == "running"

    again = subprocess.run([str(Path(sys.executable).parent / "raycp"), *argv, "--resume"], env=env,
                           capture_output=True, text=True, timeout=400)
    kill_cluster(ray_tmp)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["state"] == "complete" and meta["accounting"]["total"] == 26 and meta["accounting"]["failed"] == 0
    assert meta["accounting"]["restored"] == len(finished)
    for name, data in finished.items():   # a finished trial is not run again
        assert (out / "lambda" / name / "result.json").read_bytes() == data, name
    curve = pd.read_parquet(out / "lambda_curve.parquet")
    assert len(curve) == 26 and curve["sphere_lambda"].isna().sum() == 1
    assert curve.loc[curve["sphere_lambda"].isna(), "map_paper"].iloc[0] == pytest.approx(0.26266549643224735, abs=1e-9)


def test_mistakes_are_one_line(lincs_path, tmp_path):
    from raycp.cli import main

    out = str(tmp_path / "none")
    assert main(["sweep", "lambda", f"lincs={lincs_path}", *ARGS, "-o", out, "--resume"]) == 2
    assert main(["sweep", "lambda", f"lincs={lincs_path}", *ARGS, "--preset", "cellpainting", "-o", out]) == 2
    assert main(["sweep", "lambda", f"lincs={lincs_path}", "-o", out]) == 2                    # no evaluation keys
    assert main(["sweep", "lambda", *ARGS, "-o", out]) == 2                                     # nothing to sweep
    assert main(["sweep", "lambda", f"lincs={lincs_path}", *ARGS, "--lambdas", "0.1,x", "-o", out]) == 2


def test_tune_is_imported_only_by_the_sweep_package():
    import ast

    def imports_tune(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.startswith("ray.tune") for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and (
                    (node.module or "").startswith("ray.tune") or (node.module == "ray" and any(a.name == "tune" for a in node.names))):
                return True
        return False

    root = Path(__file__).resolve().parents[2] / "raycp"
    users = {p.relative_to(root).as_posix() for p in root.rglob("*.py") if imports_tune(p)}
    assert users == {"sweep/tuning.py"}, users
