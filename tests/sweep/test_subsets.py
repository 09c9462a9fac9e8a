"""The training-subset sweep's core (issue 15, paper Fig. 3B/C): which treatments each subset holds,
which cells a subset trains on, the axes a trial may vary, and how many trials run at once.
(The sweep itself, on a real run, is in ``tests/run/test_run.py``.)"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from raycp.errors import InputError
from raycp.sweep.subsets import check_key, max_concurrent, parse_axis, subset_index, subset_treatments


def _ranking(n: int = 10) -> pd.DataFrame:
    """n treatments t00…t(n-1) whose effect grows with their number (rank 1 = strongest)."""
    table = pd.DataFrame({"Metadata_Treatment": [f"t{i:02d}" for i in range(n)], "ate": [float(i) for i in range(n)]})
    return table.sort_values("ate", ascending=False).assign(rank=range(1, n + 1)).reset_index(drop=True)


def test_subsets_are_the_papers_20_percent_and_all():
    """10 treatments, 20 %: the 2 weakest, the 2 around the middle (from ⌊(10−2)/2⌋ = 4), the 2
    strongest (Table 1's rule); ``all`` is every ranked treatment."""
    got = subset_treatments(_ranking(10), "Metadata_Treatment", 0.2)
    assert got == {"weakest": ["t00", "t01"], "median": ["t04", "t05"], "strongest": ["t08", "t09"],
                   "all": [f"t{i:02d}" for i in range(10)]}
    assert list(subset_treatments(_ranking(10), "Metadata_Treatment", 0.3, ("strongest",))) == ["strongest"]
    assert subset_treatments(_ranking(10), "Metadata_Treatment", 0.3, ("strongest",))["strongest"] == ["t07", "t08", "t09"]


def test_a_subset_trains_on_its_treatments_and_every_control():
    cells = pd.DataFrame({
        "Metadata_Plate": ["P1"] * 6, "Metadata_Well": ["A01", "A01", "A02", "A03", "A04", "A04"],
        "Metadata_Site": [1] * 6, "Metadata_CellId": [0, 1, 0, 0, 0, 1],
        "Metadata_Treatment": ["t01", "t01", "t02", "DMSO", "EMPTY", "EMPTY"],
        "Metadata_IsControl": [False, False, False, True, True, True], "crops_file": ["f"] * 6})
    index = subset_index(cells, ["t01"], source="run", label="Metadata_Treatment")
    assert index["Metadata_Treatment"].tolist() == ["t01", "t01", "DMSO", "EMPTY", "EMPTY"]
    assert (index["Metadata_Source"] == "run").all() and "crops_file" in index
    with pytest.raises(InputError, match="t09"):
        subset_index(cells, ["t09"], source="run", label="Metadata_Treatment")


def test_axes_are_config_keys_with_values_or_distributions():
    a = parse_axis("train.optim.lr=0.01,0.005")
    assert a.key == "train.optim.lr" and a.values == (0.01, 0.005) and a.distribution is None
    b = parse_axis("train.optim.lr=log:1e-4:1e-1")
    assert b.distribution == "log" and math.isclose(b.low, 1e-4) and math.isclose(b.high, 0.1)
    assert parse_axis("train.augment.enabled=true,false").values == (True, False)
    assert parse_axis("crops.size=64,96").values == (64, 96)     # a trial then makes its own crops
    for bad, message in (("train.optim.lr", "KEY=VALUES"), ("nuclei.channel=DNA", "base run's"),
                         ("train.enabled=false", "set by the sweep"), ("train.optim.lr=log:0:1", "LOW > 0"),
                         ("train.optim.lr=0.1,0.1", "twice")):
        with pytest.raises(InputError, match=message):
            parse_axis(bad)
    with pytest.raises(InputError, match="data"):
        check_key("data.output", "--set")


def test_concurrency_is_gpus_over_workers_or_cpus_over_a_trials_needs():
    assert max_concurrent(cpus=64, gpus=8, num_workers=2, cpus_per_worker=4, data_cpus=0.5, use_gpu=True) == 4
    assert max_concurrent(cpus=64, gpus=1, num_workers=2, cpus_per_worker=4, data_cpus=0.5, use_gpu=True) == 1
    assert max_concurrent(cpus=2, gpus=0, num_workers=1, cpus_per_worker=1, data_cpus=0.5, use_gpu=False) == 1
    assert max_concurrent(cpus=16, gpus=0, num_workers=1, cpus_per_worker=1, data_cpus=0.5, use_gpu=False) == 10


def test_mistakes_are_named():
    with pytest.raises(InputError, match="unknown subset"):
        subset_treatments(_ranking(), "Metadata_Treatment", 0.2, ("strong",))
    with pytest.raises(InputError, match="Metadata_Compound"):
        subset_treatments(_ranking(), "Metadata_Compound", 0.2)
    with pytest.raises(InputError, match="too few"):
        subset_treatments(_ranking(2), "Metadata_Treatment", 0.2)
    with pytest.raises(InputError, match="weakest and median 0.3 of 5 treatments overlap"):
        subset_treatments(_ranking(5), "Metadata_Treatment", 0.3)


def test_asha_compares_a_trial_only_with_trials_of_its_own_subset():
    """Subsets are different classification tasks (2 classes vs 7): a loss of 100 on 'all' is not
    worse than a loss of 1 on 'strongest'. One ASHA per subset stops only within a subset."""
    from ray.tune.schedulers import TrialScheduler

    from raycp.sweep.tuning import _PerSubsetASHA

    class Trial:
        def __init__(self, trial_id: str, subset: str):
            self.trial_id, self.config = trial_id, {"subset": subset}

    asha = _PerSubsetASHA({"metric": "val_loss", "mode": "min", "max_t": 4, "grace_period": 1, "reduction_factor": 2})
    a, b, c = Trial("a", "strongest"), Trial("b", "all"), Trial("c", "all")
    for t in (a, b, c):
        asha.on_trial_add(None, t)
    report = {"training_iteration": 1}
    assert asha.on_trial_result(None, a, {**report, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, b, {**report, "val_loss": 100.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, c, {**report, "val_loss": 300.0}) == TrialScheduler.STOP   # worse than b


def test_a_run_started_from_another_folder_gives_trials_absolute_paths(tmp_path, monkeypatch):
    """`raycp run` saves the paths as given (`runs/demo/run`); trials run in Ray Tune's trial folders,
    so the sweep resolves the run's local paths against the folder it is started from."""
    from raycp.config import build_config, save_resolved
    from raycp.run.config import PipelineConfig
    from raycp.sweep.cli import _run_config

    monkeypatch.chdir(tmp_path)
    cfg = build_config(PipelineConfig, None, ["data.index=runs/demo/screen/index/sites.parquet", "data.output=runs/demo/run",
                                              "imagenet_weights=weights/lite0.pth", "train.model.init=models/cpcnn",
                                              "train.model.arch=tf_efficientnet_b0",
                                              "features=[{kind: trained, path: models/cpcnn, name: cpcnn}]"])
    save_resolved(cfg, str(tmp_path / "runs" / "demo" / "run"))
    got = _run_config("runs/demo/run")
    assert got.data.index == str(tmp_path / "runs/demo/screen/index/sites.parquet")
    assert got.data.output == str(tmp_path / "runs/demo/run")
    assert got.imagenet_weights == str(tmp_path / "weights/lite0.pth")
    assert got.train.model.init == got.features[0].path == str(tmp_path / "models/cpcnn")


def test_trials_are_listed_in_the_order_the_axis_gave_its_values():
    """`--param train.formulation=classification,ols,mil,grl`: the table (and the bar plot) keep
    that order, as Supplementary Fig. 1 does, not the alphabet's."""
    from raycp.sweep.subsets import results_table

    rows = [{"subset": "all", "train.formulation": f, "trial_id": f"t{i}"} for i, f in enumerate(["grl", "ols", "classification", "mil"])]
    table = results_table(rows, ["train.formulation"], {"train.formulation": ["classification", "ols", "mil", "grl"]})
    assert table["train.formulation"].tolist() == ["classification", "ols", "mil", "grl"]
    assert results_table(rows, ["train.formulation"])["train.formulation"].tolist() == ["classification", "grl", "mil", "ols"]
