"""``raycp run`` on a tiny real-pixel screen: every stage, its folder, status and accounting; the
report; resumption; config changes; and bad configs refused before any work (issue 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycp.cli import main
from raycp.errors import ConfigError
from raycp.layout import stage_folder
from raycp.run import load, run
from raycp.stages import STAGES
from tests.run.run_helper import TINY_RUN, run_overrides


def _status(out: Path, stage: str) -> dict:
    return json.loads((out / stage_folder(stage) / "status.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tiny_screen, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    sets = run_overrides(tiny_screen, out)
    result = run(load(TINY_RUN, sets), echo=lambda line: None)
    return out, result, sets


def test_every_stage_runs_and_accounts_for_every_input(tiny_run):
    out, result, _ = tiny_run
    assert [r.stage for r in result.records] == list(STAGES)
    assert all(r.state == "complete" for r in result.records)
    sites = pd.read_parquet(out / "index" / "screen.parquet")
    for stage in STAGES:
        st = _status(out, stage)
        s = st["summary"]
        assert st["state"] == "complete" and st["seconds"] >= 0, stage
        assert s["processed"] + s["quarantined"] == s["total"], stage
        assert (out / stage_folder(stage) / "config.yaml").exists(), stage
    for stage in ("index", "compress", "crops"):
        assert _status(out, stage)["summary"]["total"] == len(sites), stage
    extract = _status(out, "extract")["summary"]
    assert extract["total"] == 3 * len(sites) and set(extract["per_set"]) == {"cnn", "random", "cellprofiler"}
    wells = pd.read_parquet(out / "profiles" / "cnn" / "wells.parquet")
    assert wells["Metadata_MoA"].notna().sum() == 12 and wells["Metadata_IsControl"].sum() == 6
    assert len([c for c in wells.columns if not c.startswith("Metadata_")]) == 672
    cp = pd.read_parquet(out / "profiles" / "cellprofiler" / "wells.parquet")  # standardised to the controls
    controls = cp.loc[cp["Metadata_IsControl"], [c for c in cp.columns if not c.startswith("Metadata_")]]
    varying = controls.std(ddof=0) > 1e-3
    assert float(controls.mean().abs().max()) < 1e-4 and np.allclose(controls.std(ddof=0)[varying], 1, atol=1e-3)
    assert _status(out, "profiles")["summary"]["feature_sets"]["cellprofiler"]["standardized"]


def test_comparison_table_and_lambda_curve(tiny_run):
    out, _, _ = tiny_run
    table = pd.read_parquet(out / "evaluate" / "comparison.parquet")
    assert len(table) == 6 and set(table["feature_set"]) == {"cnn", "random", "cellprofiler"}
    assert table["map_paper"].between(0, 1).all() and (table["treatments"] == 6).all()
    curve = pd.read_parquet(out / "evaluate" / "cellprofiler" / "lambda_curve.parquet")
    assert curve["sphere_lambda"].isna().sum() == 1 and sorted(curve["sphere_lambda"].dropna()) == [0.01, 1.0]
    effect = pd.read_parquet(out / "effect" / "effect.parquet")
    assert len(effect) == 6 and len(pd.read_parquet(out / "effect" / "subsets" / "strongest.parquet")) >= 1


def test_report_is_self_contained(tiny_run):
    out, result, _ = tiny_run
    page = (out / "report.html").read_text()
    assert result.report.endswith("report.html")
    for title in ("Comparison of feature sets", "Sphering λ", "Phenotypic activity and consistency", "CNN training",
                  "Treatment effect", "Input accounting", "Wall time per stage"):
        assert title in page, title
    assert page.count("data:image/png;base64,") >= 4 and "src='http" not in page and 'src="http' not in page


def test_retrieval_is_copairs_on_the_runs_wells(tiny_run, tmp_path):
    """The retrieval stage's phenotypic activity of the demo-like screen's wells is copairs' own
    (the JUMP recipe's negcon rules), and a recipe in the run writes its steps first."""
    copairs_map = pytest.importorskip("copairs.map", reason="copairs (dev extra) is the reference")
    out, _, sets = tiny_run
    wells = pd.read_parquet(out / "profiles" / "cnn" / "wells.parquet")
    folder = out / "retrieval" / "cnn"
    act = pd.read_parquet(folder / "activity_map.parquet")
    ctrl = wells["Metadata_IsControl"].to_numpy(dtype=bool)
    meta = wells[[c for c in wells.columns if c.startswith("Metadata_")]].copy()
    meta["Metadata_JCP2022"] = meta["Metadata_Treatment"].astype(object)
    meta.loc[ctrl, "Metadata_JCP2022"] = [f"negcon_{i}" for i in range(ctrl.sum())]
    X = wells[[c for c in wells.columns if not c.startswith("Metadata_")]].to_numpy(np.float64)
    ref = copairs_map.average_precision(meta, X, ["Metadata_JCP2022"], [], ["Metadata_Plate"],
                                        ["Metadata_IsControl", "Metadata_JCP2022"], progress_bar=False)[~ctrl]
    ref_map = copairs_map.mean_average_precision(ref.rename(columns={"Metadata_Treatment": "Metadata_perturbation"}),
                                                 ["Metadata_perturbation"], null_size=10_000, threshold=0.05, seed=0,
                                                 progress_bar=False, cache_dir=tmp_path)
    ours = pd.read_parquet(folder / "activity_ap.parquet")
    np.testing.assert_array_equal(ours["average_precision"].to_numpy(), ref["average_precision"].to_numpy())
    for col in ("mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p"):
        np.testing.assert_array_equal(act[col].to_numpy(), ref_map[col].to_numpy())
    # the recipe's operations on the same wells (the CellProfiler set, 2 plates) are pycytominer's
    pycytominer = pytest.importorskip("pycytominer")
    from raycp.profiles import ops

    cp = pd.read_parquet(out / "profiles" / "cellprofiler" / "wells.parquet")
    feats = [c for c in cp.columns if not c.startswith("Metadata_")]
    ours_norm = ops.normalize(cp, method="mad_robustize", samples="Metadata_IsControl == True").wells
    for _, rows in cp.groupby("Metadata_Plate").groups.items():
        theirs = pycytominer.normalize(cp.loc[rows], features=feats, samples="Metadata_IsControl == True",
                                       method="mad_robustize", mad_robustize_epsilon=1e-18)
        got, want = ours_norm.loc[np.asarray(rows), feats].to_numpy(np.float64), theirs[feats].to_numpy(np.float64)
        finite = np.isfinite(want) & (np.abs(want) < 1e6)  # a MAD of 0 on 3 controls: both divide by ε
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6)
    chain = ["variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist"]
    assert set(ops.feature_select(cp, operations=chain).wells.columns) == set(
        pycytominer.feature_select(cp, features=feats, operation=chain).columns)
    summary = pd.read_parquet(out / "retrieval" / "summary.parquet")
    assert set(summary["feature_set"]) == {"cnn", "random", "cellprofiler"}
    assert (folder / "map_pvalue.png").stat().st_size > 5_000
    recipe = Path(__file__).resolve().parents[1] / "conf" / "recipe_lincs.yaml"
    again = run(load(TINY_RUN, [*sets, f"retrieval.recipe={recipe}"]), start="retrieval", stop="retrieval",
                echo=lambda line: None)
    assert [r.state for r in again.records] == ["complete"]
    steps = json.loads((folder / "recipe" / "recipe.json").read_text())["steps"]
    assert [s["op"] for s in steps] == ["variant_features", "normalize", "rank_int", "feature_select"]
    assert (folder / "recipe" / "04_feature_select.parquet").exists()
    run(load(TINY_RUN, sets), start="retrieval", stop="retrieval", echo=lambda line: None)  # the module's run as it was


def test_rerun_skips_finished_stages_and_keeps_bytes(tiny_run):
    out, _, sets = tiny_run
    cells = sorted((out / "features" / "cnn" / "cells").rglob("*.parquet"))
    before = {p: p.read_bytes() for p in cells}
    finished = {s: _status(out, s)["finished"] for s in STAGES}
    again = run(load(TINY_RUN, sets), echo=lambda line: None)
    assert [r.state for r in again.records] == ["skipped"] * (len(STAGES) - 1) + ["complete"]
    assert {p: p.read_bytes() for p in cells} == before
    assert all(_status(out, s)["finished"] == finished[s] for s in STAGES if s != "report")


def test_changed_profiles_config_reruns_only_the_cheap_stages(tiny_run):
    out, _, sets = tiny_run
    again = run(load(TINY_RUN, [*sets, "profiles.sphere_lambda=0.1"]), start=None, stop="evaluate", echo=lambda line: None)
    states = {r.stage: r.state for r in again.records}
    assert states["extract"] == "skipped" and states["profiles"] == "skipped" and states["evaluate"] == "complete"
    table = pd.read_parquet(out / "evaluate" / "comparison.parquet")
    assert "sphered λ=0.1" in set(table["correction"])


def test_changed_science_of_a_finished_stage_is_refused_before_work(tiny_run):
    out, _, sets = tiny_run
    stamp = (out / "crops" / "status.json").read_bytes()
    with pytest.raises(ConfigError, match="stage 'crops'.*finished with another config"):
        run(load(TINY_RUN, [*sets, "crops.size=48"]), echo=lambda line: None)
    with pytest.raises(ConfigError, match="stage 'crops'.*finished with another config"):  # --from too
        run(load(TINY_RUN, [*sets, "crops.size=48"]), start="crops", echo=lambda line: None)
    # killed mid-stage: its finished sites are of the old config, so resuming under a new one is refused
    status = json.loads(stamp)
    (out / "crops" / "status.json").write_text(json.dumps({**status, "state": "running"}))
    try:
        with pytest.raises(ConfigError, match="stage 'crops'.*started with another config"):
            run(load(TINY_RUN, [*sets, "crops.size=48"]), echo=lambda line: None)
    finally:
        (out / "crops" / "status.json").write_bytes(stamp)
    assert (out / "crops" / "status.json").read_bytes() == stamp


@pytest.mark.parametrize("args, message, code", [
    (["--from", "segmentation"], "--from 'segmentation' is not a stage", 2),
    (["--set", "data.index={tmp}/nowhere.parquet"], "screen index not found", 2),
    (["--set", "data.output={tmp}/a-file/run"], "output location is not writable", 2),  # a bad choice, not an outage
    (["--set", "profiles.sphere_lambda=0"], "profiles.sphere_lambda: Input should be greater than 0", 2),
    (["--set", "profiles.lambdas=[0.1, -1]"], "every λ must be > 0", 2),
    (["--set", "train.optim.lr=-1"], "train.optim.lr", 2),
    (["--set", "features=[{kind: imagenet}]"], "imagenet_weights", 2),
])
def test_bad_config_is_one_line_before_any_work(tiny_screen, tmp_path, capsys, args, message, code):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "run"
    sets = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = [f"--set={o}" for o in run_overrides(tiny_screen, out)]
    got = main(["run", TINY_RUN, *base, *sets])
    err = capsys.readouterr().err.strip()
    assert got == code and message in err and len(err.splitlines()) == 1, err
    assert not (out / "index").exists()  # no stage started


def test_a_new_stage_is_one_module_and_one_registration(tiny_run):
    """A stage is a :class:`Stage` and a place in the registry: resume, status, fingerprints and the
    report's accounting follow (here a stage after effect that counts the well profiles)."""
    from raycp.io.outputs import write_json
    from raycp.stages import REGISTRY, Stage, make_registry
    from raycp.stages.profiles import read_wells

    out, _, sets = tiny_run

    def count_wells(ctx) -> dict:
        n = len(read_wells(ctx, "cellprofiler"))
        write_json(f"{ctx.folder('well_count')}/count.json", {"wells": n})
        return {"total": n, "processed": n, "quarantined": 0, "reasons": {}, "wells": n}

    stage = Stage("well_count", "well profiles counted", count_wells, lambda cfg: {"set": "cellprofiler"})
    *before, report = REGISTRY
    registry = make_registry(*(REGISTRY[name] for name in before), stage, REGISTRY[report])
    with pytest.raises(ValueError, match="same name or folder"):
        make_registry(*registry.values(), Stage("features", "clash", count_wells, lambda cfg: {}))
    result = run(load(TINY_RUN, sets), echo=lambda line: None, registry=registry)
    states = {r.stage: r.state for r in result.records}
    finished = before[:before.index("profiles") + 1]  # (an earlier test re-ran evaluate with another λ)
    assert [states[name] for name in finished] == ["skipped"] * len(finished)  # not run again
    assert states["well_count"] == "complete" and states["report"] == "complete"
    wells = _status(out, "profiles")["summary"]["feature_sets"]["cellprofiler"]["wells"]
    assert json.loads((out / "well_count" / "count.json").read_text()) == {"wells": wells}
    assert _status(out, "well_count")["summary"]["processed"] == wells
    assert "well profiles counted" in (out / "report.html").read_text()
    again = run(load(TINY_RUN, sets), echo=lambda line: None, registry=registry)
    assert {r.stage: r.state for r in again.records}["well_count"] == "skipped"


def test_a_stage_that_refuses_its_input_before_writing_does_not_lock_the_folder(tiny_run):
    """A first attempt refused as a user's mistake (exit 2) before any output leaves no status, so
    the corrected config runs; one refused after writing keeps it (its outputs are of that config)."""
    from raycp.errors import InputError
    from raycp.stages import REGISTRY, Stage, make_registry

    out, _, sets = tiny_run
    mode = {"value": "wrong channels", "write": False}

    def checked(ctx) -> dict:
        if mode["write"]:
            (Path(ctx.folder("checked")) / "part.txt").write_text("half")
        if mode["value"] != "fixed":
            raise InputError(f"{mode['value']}: refused", fix="fix the config")
        return {"total": 1, "processed": 1, "quarantined": 0, "reasons": {}}

    stage = Stage("checked", "an expensive stage that checks its input", checked, lambda cfg: dict(mode), expensive=True)
    registry = make_registry(*REGISTRY.values(), stage)

    def attempt():
        return run(load(TINY_RUN, sets), echo=lambda line: None, registry=registry, start="checked", stop="checked")

    with pytest.raises(InputError, match="wrong channels: refused"):
        attempt()
    assert not (out / "checked" / "status.json").exists()
    mode["value"] = "fixed"
    assert attempt().records[0].state == "complete"

    (out / "checked" / "status.json").unlink()  # a fresh stage again, this time failing after writing
    mode.update(value="bad after writing", write=True)
    with pytest.raises(InputError):
        attempt()
    assert _status(out, "checked")["state"] == "running"
    mode.update(value="fixed", write=False)
    with pytest.raises(ConfigError, match="stage 'checked' .* was started with another config"):
        attempt()


def test_a_lambda_sweep_of_the_run_equals_its_curve_and_joins_the_report(tiny_run):
    """``raycp sweep lambda --run RUN``: every feature set of the run, its profiles settings; the Tune
    trials give the evaluate stage's own λ curve, and the rebuilt report shows the sweep."""
    out, _, sets = tiny_run
    assert main(["sweep", "lambda", "--run", str(out), "--lambdas", "1,0.01"]) == 0
    sweep = pd.read_parquet(out / "sweeps" / "lambda" / "lambda_curve.parquet")
    assert sorted(sweep["feature_set"].unique()) == ["cellprofiler", "cnn", "random"]
    for name, rows in sweep.groupby("feature_set"):
        own = pd.read_parquet(out / "evaluate" / name / "lambda_curve.parquet")
        cols = ["sphere_lambda", "map_paper", "map", "folds_of_enrichment"]
        pd.testing.assert_frame_equal(rows[cols].reset_index(drop=True), own[cols].reset_index(drop=True))
    run(load(TINY_RUN, sets), start="report", echo=lambda line: None)
    contents = json.loads((out / "report" / "contents.json").read_text())
    assert "λ sweep (raycp sweep lambda, Ray Tune)" in contents["sections"]


def test_a_combined_training_set_of_two_runs_is_what_raycp_train_reads(tiny_run, tmp_path, capsys):
    """``raycp trainset combine`` over two sources (the tiny run under two names: every treatment
    is shared, so every one is kept in both) → ``raycp train`` reads exactly the listed cells, with
    each source's plates kept apart."""
    from raycp.train.data import read_crop_metadata

    out, _, _ = tiny_run
    ts = tmp_path / "trainset"
    assert main(["trainset", "combine", "--source", f"a={out}", "--source", f"b={out}", "-o", str(ts),
                 "--min-cells", "1", "--controls-per-plate", "2"]) == 0
    index = pd.read_parquet(ts / "trainset.parquet")
    meta = json.loads((ts / "trainset.json").read_text())["accounting"]
    effect = pd.read_parquet(out / "effect" / "effect.parquet")
    assert len(meta["shared_treatments"]) == len(effect)
    assert meta["sources_sharing_shards"]["a+b"] > 0          # the same run twice: named, and warned about
    assert "sources a and b read" in capsys.readouterr().err
    treated = index[~index.Metadata_IsControl].groupby("Metadata_Source").size()
    assert treated["a"] == treated["b"] > 0            # the same treatments' cells in both sources
    assert (index[index.Metadata_IsControl].groupby(["Metadata_Source", "Metadata_Plate"])["Metadata_Well"]
            .nunique() == 2).all()
    crops = read_crop_metadata(str(ts / "trainset.parquet"), label="Metadata_Treatment")
    assert len(crops.meta) == len(index)
    assert {p.split(":")[0] for p in crops.meta["Metadata_Plate"]} == {"a", "b"}
    capsys.readouterr()
    assert main(["train", "--crops", str(ts / "trainset.parquet"), "-o", str(tmp_path / "train"), "--dry-run"]) == 0
    assert f"crops {len(index)} " in capsys.readouterr().out


def _sweep_cli(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    """``raycp sweep ...`` as a user runs it: its own local Ray (with the dashboard it starts for
    Train trials), under its own temp dir; whatever is left of that Ray is killed afterwards."""
    from tests.jobs.conftest import kill_cluster, own_ray_env

    ray_tmp, env = own_ray_env("rss")
    try:
        return subprocess.run([str(Path(sys.executable).parent / "raycp"), "sweep", *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        kill_cluster(ray_tmp)


@pytest.mark.timeout(600)
def test_a_subset_sweep_trains_one_cnn_per_subset_and_evaluates_it_like_the_run(tiny_run):
    """``raycp sweep subsets --run RUN`` (paper Fig. 3C): one Ray Train run per subset inside a Tune
    trial, then the run's extract → profiles → evaluate on every cell. The strongest subset trains
    on its treatment and the controls only; ``all`` with the run's seed *is* the run's own CNN, so
    its evaluation equals the run's, to the last bit; the table, the plot and a report section."""
    from raycp.train.data import read_crop_metadata

    out, _, sets = tiny_run
    run(load(TINY_RUN, sets), echo=lambda line: None)       # the run as its config says (tests before may change it)
    done = _sweep_cli("subsets", "--run", str(out), "--subsets", "strongest,all", timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = out / "sweeps" / "subsets"
    table = pd.read_parquet(folder / "subsets.parquet").set_index("subset")
    assert table["state"].tolist() == ["done", "done"]
    meta = json.loads((folder / "sweep.json").read_text())
    assert meta["state"] == "complete" and meta["accounting"] == {**meta["accounting"], "total": 2, "processed": 2}
    strongest = meta["treatments"]["strongest"]
    effect = pd.read_parquet(out / "effect" / "effect.parquet")
    assert strongest == [effect.sort_values("rank")["Metadata_Treatment"].iloc[0]]   # 20 % of 6 → the 1 strongest
    index = pd.read_parquet(folder / "subsets" / "strongest.parquet")
    assert set(index.loc[~index.Metadata_IsControl, "Metadata_Treatment"]) == set(strongest)
    crops = read_crop_metadata(str(out / "crops"), label="Metadata_Treatment").meta
    assert index.Metadata_IsControl.sum() == crops.Metadata_IsControl.sum() > 0      # every control cell
    assert table.loc["strongest", "classes"] == 2 and table.loc["all", "classes"] == 7
    own = pd.read_parquet(out / "evaluate" / "comparison.parquet").set_index(["feature_set", "correction"])
    assert table.loc["all", "map_paper"] == own.loc[("cnn", "sphered λ=0.01"), "map_paper"]
    assert table.loc["all", "map_paper_none"] == own.loc[("cnn", "none"), "map_paper"]
    trial = folder / "trials" / table.loc["all", "trial_id"]
    assert (trial / "train" / table.loc["all", "trial_id"]).is_dir()   # the Train run is named after the trial
    assert table.loc["all", "queries_unseen"] == 0 and pd.isna(table.loc["all", "map_paper_unseen"])
    assert table.loc["strongest", "queries_unseen"] > 0     # queries of the treatments it never saw
    assert (folder / "subsets.png").stat().st_size > 0
    before = (folder / "sweep.json").read_bytes()
    again = _sweep_cli("subsets", "--run", str(out), "--subsets", "weakest", timeout=120)
    assert again.returncode == 2 and "already holds a subset sweep" in again.stderr, again.stderr
    assert (folder / "sweep.json").read_bytes() == before        # a refused command writes nothing
    empty = out / "sweeps" / "empty"
    again = _sweep_cli("subsets", "--run", str(out), "-o", str(empty), "--resume", timeout=120)
    assert again.returncode == 2 and "holds no subset sweep to resume" in again.stderr, again.stderr
    assert not (empty / "sweep.json").exists()
    run(load(TINY_RUN, sets), start="report", echo=lambda line: None)
    contents = json.loads((out / "report" / "contents.json").read_text())
    assert any(s.startswith("Training subsets") for s in contents["sections"])


@pytest.mark.timeout(400)
def test_an_asha_stopped_train_trial_does_not_hang_the_sweep(tiny_run):
    """ASHA with ``max_t`` 1 stops every 3-epoch Train trial after its first epoch. Stopping kills
    the trial's process; its Train workers' placement group is released only by Ray Train's
    cleaner, which needs the State API: without it the first stopped trial keeps its CPU and the
    next trial never starts on 2 CPUs. A random search (2 draws of the learning rate per subset)
    runs its 4 trials one at a time, as the grid does: all are stopped, one after the other."""
    out, _, _ = tiny_run
    folder = out / "sweeps" / "asha"
    done = _sweep_cli("subsets", "--run", str(out), "--subsets", "strongest,all", "--set", "train.optim.epochs=3",
                      "--search", "random", "--num-samples", "2", "--param", "train.optim.lr=log:1e-3:1e-1",
                      "--asha", "--max-t", "1", "-o", str(folder), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_parquet(folder / "subsets.parquet")
    assert table["state"].tolist() == ["stopped"] * 4 and table["subset"].tolist() == ["strongest"] * 2 + ["all"] * 2
    assert table["epochs_reported"].tolist() == [1] * 4 and table["val_loss"].notna().all()
    assert table["map_paper"].isna().all()                     # stopped before the evaluation
    assert table["train.optim.lr"].between(1e-3, 1e-1).all() and table["train.optim.lr"].nunique() == 4
    assert "4 stopped early" in done.stdout and "stops every trial" in done.stderr


@pytest.mark.timeout(400)
def test_a_crop_size_axis_makes_the_trials_own_crops(tiny_run):
    """``--param crops.size=48``: the trial runs the image stages into its own folder, crops every
    cell at 48 px, trains on its subset of those crops and extracts from them."""
    from raycp.train.data import read_crop_metadata

    out, _, _ = tiny_run
    folder = out / "sweeps" / "crop-size"
    done = _sweep_cli("subsets", "--run", str(out), "--subsets", "strongest", "--param", "crops.size=48",
                      "-o", str(folder), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = pd.read_parquet(folder / "subsets.parquet").iloc[0]
    assert row["state"] == "done" and row["crops.size"] == 48 and row["label"] == "strongest · size=48"
    trial = folder / "trials" / row["trial_id"]
    crops = read_crop_metadata(str(trial / "crops"), label="Metadata_Treatment")
    assert crops.shape[1:] == (48, 48)
    assert json.loads((trial / "train" / "model" / "model.json").read_text())["crop_size"] == 48
    index = pd.read_parquet(trial / "subset.parquet")
    assert index["Metadata_IsControl"].sum() == crops.meta["Metadata_IsControl"].sum()
    assert index["crops_file"].str.startswith(str(trial / "crops")).all()
    assert json.loads((trial / "features" / "cnn" / "model.json").read_text())["crop_size"] == 48


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_interrupted_subset_sweep_resumes_its_train_run_and_skips_finished_trials(tiny_run):
    """The sweep's driver and its Ray are killed (``kill -9``) while the second trial trains; with
    ``--resume`` the first trial is restored as finished (its files untouched) and the second one's
    Train run, named after its trial, continues from its last checkpoint."""
    from tests.jobs.conftest import kill_cluster, own_ray_env

    out, _, _ = tiny_run
    folder = out / "sweeps" / "resumed"
    ray_tmp, env = own_ray_env("rsr")
    argv = [str(Path(sys.executable).parent / "raycp"), "sweep", "subsets", "--run", str(out), "--subsets",
            "strongest,all", "--set", "train.optim.epochs=40", "-o", str(folder)]

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline, finished, training = time.time() + 400, [], []
    while time.time() < deadline and proc.poll() is None:
        finished = [p.parents[1] for p in folder.glob("trials/*/evaluate/status.json") if '"complete"' in p.read_text()]
        # a checkpoint Ray Train has committed (in its snapshot), of the trial that is still training
        training = [p for p in folder.glob("trials/*/train/*/checkpoint_manager_snapshot.json")
                    if p.parents[2] not in finished and "epoch_" in p.read_text()]
        if finished and training:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted: {proc.stdout.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    kill_cluster(ray_tmp)
    proc.wait(30)
    first, second = finished[0], training[0].parents[2]
    kept = {p: p.read_bytes() for p in first.rglob("*.parquet")}
    assert not (second / "train" / "model" / "model.json").exists()
    try:
        again = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    finally:
        kill_cluster(ray_tmp)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    meta = json.loads((folder / "sweep.json").read_text())
    assert meta["state"] == "complete" and meta["accounting"]["restored"] == 1 and meta["accounting"]["processed"] == 2
    assert {p: p.read_bytes() for p in first.rglob("*.parquet")} == kept        # not run again
    history = json.loads((second / "train" / "metrics.json").read_text())["history"]
    assert [e["epoch"] for e in history] == list(range(40)) and sum(e["resumed"] for e in history) == 1
