"""`raycp train CONFIG`: registered as the lead will, one-line errors, exit codes (no training here)."""

from __future__ import annotations

import yaml

from raycp import cli
from raycp.train.cli import app


def run(capsys, *argv: str) -> tuple[int, str, str]:
    if not any(g.name == "train" for g in cli.app.registered_groups):
        cli.app.add_typer(app, name="train")
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_the_plan(crops64, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"crops": str(crops64), "output": str(tmp_path / "run"),
                                      "optim": {"batch_size": 8}}))
    code, out, err = run(capsys, "train", str(config), "--dry-run")
    assert code == 0, err
    assert "crops 512 (304 train / 208 val, leave_cells_out) · classes 6 · balanced epoch 120 (20 per class)" in out
    code, out, err = run(capsys, "train", "--crops", str(crops64), "-o", str(tmp_path / "r"), "--dry-run",
                         "--set", "split.strategy=leave_plates_out")
    assert code == 0 and "leave_plates_out" in out, err


def test_bad_inputs_are_one_line_with_exit_code_2(crops64, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"crops": str(crops64), "output": str(tmp_path / "run"), "optim": {"lr": 0.01,
                                      "learning_rate": 1}}))
    code, _, err = run(capsys, "train", str(config))
    assert code == 2 and "unknown key 'optim.learning_rate'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "train", "--crops", str(crops64), "-o", str(tmp_path / "r"), "--dry-run",
                       "--set", "classes=[DMSO, EMPTY, T1, T2, T3, T4, T9]")
    assert code == 2 and "class 'T9' has zero cells in the crop shards" in err and "fix:" in err
    code, _, err = run(capsys, "train", "--crops", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r"))
    assert code == 2 and "crop shards not found" in err
