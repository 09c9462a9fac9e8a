"""The `raycp` CLI: the demo path on the real site, one-line errors, meaningful exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raycp.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_stage_verb(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for verb in ("index", "config", "version", "screen", "preprocess", "profile"):
        assert verb in out
    code, out, _ = run(capsys, "index", "--help")
    assert code == 0 and all(v in out for v in ("build", "check", "summarize"))


def test_demo_path_summarises_the_real_site(site_5ch, ray_cluster, tmp_path, capsys):
    """`make demo`: index the real 5-channel site, read it through Ray, print its summary."""
    index = tmp_path / "run" / "index" / "sites.parquet"
    code, out, err = run(capsys, "index", "build", str(site_5ch / "images" / "orig"), "--from", "phenix",
                         "--plate", "BR00143976", "--channel-map", "5=DNA,2=ER,6=RNA,3=AGP,4=Mito",
                         "--output", str(index))
    assert code == 0, err
    assert "sites 1 · plates 1 · wells 1 · channels DNA, ER, RNA, AGP, Mito" in out
    code, out, err = run(capsys, "index", "summarize", str(index), "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert "BR00143976 C03 site 3" in out and "1080×1080" in out
    assert "summary: 1 input(s) = 1 processed + 0 quarantined" in out
    folder = tmp_path / "run" / "summary"
    stats = pd.read_parquet(folder / "summary.parquet")
    assert stats.channel.tolist() == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert (stats.dtype == "uint16").all() and (stats.height == 1080).all()
    assert (stats["p0.05"] <= stats["p50"]).all() and (stats["p50"] <= stats["p99.95"]).all()
    assert json.loads((folder / "ledger.json").read_text())["processed"] == 1
    assert "data:" in (folder / "config.yaml").read_text()


def test_quarantined_site_gives_exit_code_3_and_a_reason(site_5ch, ray_cluster, tmp_path, capsys):
    orig = tmp_path / "orig"
    shutil.copytree(site_5ch / "images" / "orig", orig)
    for n in (2, 3, 4, 5, 6):  # a second site whose DNA file is truncated
        src = orig / f"r03c03f03p01-ch{n}sk1fk1fl1.tiff"
        data = src.read_bytes()
        (orig / f"r03c03f04p01-ch{n}sk1fk1fl1.tiff").write_bytes(data[: len(data) // 4] if n == 5 else data)
    index = tmp_path / "sites.parquet"
    assert run(capsys, "index", "build", str(orig), "--from", "phenix", "--plate", "P",
               "--channel-map", "5=DNA,2=ER,6=RNA,3=AGP,4=Mito", "--output", str(index))[0] == 0
    code, out, _ = run(capsys, "index", "summarize", str(index), "--output", str(tmp_path / "run"))
    assert code == 3
    assert "2 input(s) = 1 processed + 1 quarantined" in out
    assert "r03c03f04p01-ch5sk1fk1fl1.tiff: unreadable TIFF" in out
    ledger = pd.read_parquet(tmp_path / "run" / "summary" / "ledger.parquet")
    assert ledger.status.tolist() == ["processed", "quarantined"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["index", "check", "{tmp}/nope.parquet"], "nope.parquet: index not found (fix: run `raycp index build` first)"),
        (["index", "build", "{tmp}", "--from", "phenix", "--plate", "P", "--channel-map", "5=DNA", "--output", "{tmp}/i.parquet"],
         "no Phenix-named images"),
        (["index", "build", "{tmp}", "--from", "phenix", "--plate", "P", "--channel-map", "DNA", "--output", "x"],
         "channel map entry 'DNA' is not SOURCE=CHANNEL"),
        (["config", "show", "--set", "data.index=a", "--set", "data.output=b", "--set", "crops.colour=1"],
         "unknown key 'crops.colour'"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raycp: error: ") and needle in lines[0]


def test_config_show_prints_the_resolved_config(capsys):
    code, out, _ = run(capsys, "config", "show", "--set", "data.index=s3://b/i.parquet", "--set", "data.output=o")
    assert code == 0 and "index: s3://b/i.parquet" in out and "size: 128" in out


def test_import_raycp_imports_neither_ray_nor_torch():
    code = ("import sys, raycp, raycp.config, raycp.io.index, raycp.io.importers, raycp.cli; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- usage errors are usage errors (issue 12, kind 8) -------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["index", "build", "x", "--frm", "x"], "No such option: --frm"),
        (["index", "build"], "Missing argument"),
        (["profile", "evaluate", "wells.csv"], "Missing option '--treatment-cols'"),
        (["run", "--from", "extract", "--nope"], "No such option: --nope"),
        (["frobnicate"], "No such command"),
    ],
)
def test_a_command_line_mistake_prints_the_usage_and_exits_2(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert needle in err and "Usage: raycp" in err and "internal error" not in err


def test_the_console_script_reports_usage_errors_the_same_way():
    exe = shutil.which("raycp", path=str(Path(sys.executable).parent))
    assert exe, "the raycp console script is installed with the package"
    proc = subprocess.run([exe, "index", "build", "x", "--frm", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "No such option: --frm" in proc.stderr and "Usage: raycp index build" in proc.stderr


def _fix_texts() -> list[tuple[str, int, str]]:
    """Every literal piece of every ``fix=`` argument in raycp's source, with its file and line."""
    import ast

    out = []
    root = Path(__file__).resolve().parents[1] / "raycp"
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg != "fix":
                    continue
                parts = [n.value for n in ast.walk(kw.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                out.append((str(path.relative_to(root.parent)), kw.value.lineno, " ".join(parts)))
    return out


def _cli_options() -> set[str]:
    import typer.main

    from raycp.cli import app  # every stage's app is registered at import

    options: set[str] = set()

    def walk(command):
        for param in getattr(command, "params", []):
            options.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return options


# flags of other programs that a fix may name, with the program
OTHER_PROGRAMS = {"--head": "ray start", "--include-dashboard": "ray start"}


def test_every_flag_a_fix_names_exists():
    import re

    options = _cli_options()
    assert {"--treatment-cols", "--na-cutoff", "--sphere-scope-col", "--platemap"} <= options
    texts = _fix_texts()
    assert len(texts) > 100
    bad = []
    for where, line, text in texts:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
            if flag not in options and flag not in OTHER_PROGRAMS:
                bad.append(f"{where}:{line}: {flag}")
    assert not bad, bad


def test_tables_are_not_cut_when_stdout_is_not_a_terminal(monkeypatch):
    """CI, ``tee`` and log files get the whole table (a terminal gets its own width)."""
    import io

    from rich.table import Table

    from raycp.console import console

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setenv("COLUMNS", "80")
    table = Table(title="comparison")
    for col in ("feature set", "correction", "map_paper", "note"):
        table.add_column(col)
    table.add_row("cellprofiler", "sphered λ=0.01", "0.715", "x" * 150)
    con = console()
    con.print(table)
    con.print("a long line " * 20, markup=False)
    lines = stream.getvalue().splitlines()
    row = next(ln for ln in lines if "cellprofiler" in ln)
    assert "x" * 150 in row and len(row) > 150
    assert any(ln.startswith("a long line") and len(ln) >= 230 for ln in lines)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "configs/demo.yaml", "--from", "extrct"], "--from 'extrct' is not a stage"),
        (["run", "configs/demo.yaml", "--set", "train.optim.epoch=1"], "--set train.optim.epoch: unknown key"),
        (["config", "show", "-c", "configs/demo.yaml", "--set", "profiles.na_cutof=0.1"],
         "--set profiles.na_cutof: unknown key"),
    ],
)
def test_the_first_thing_wrong_is_what_a_config_error_names(capsys, argv, needle):
    """The demo config lacks its weights path (the Makefile passes it): a typo must still be
    reported as the typo, and a key given on the command line as --set, not as the file."""
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err, err


def test_one_run_config_serves_every_stage_command(capsys, tmp_path):
    code, out, err = run(capsys, "config", "show", "-c", "configs/demo.yaml", "--set", "imagenet_weights=/w.safetensors")
    assert code == 0, err
    assert "train:" in out and "profiles:" in out and "na_cutoff: 0.05" in out
    from raycp.config import RUN_SECTIONS
    from raycp.preprocess.config import load_config
    from raycp.run.config import PipelineConfig

    assert set(RUN_SECTIONS) == set(PipelineConfig.model_fields)
    cfg = load_config("configs/demo.yaml", [f"data.output={tmp_path}"])  # what raycp preprocess and index summarize read
    assert cfg.crops.size == 64


@pytest.mark.parametrize("argv", [
    ["profile", "aggregate", "{dp}", "--output", "{file}/agg"],
    ["screen", "build", "--preset", "mini", "--output", "{file}/screen"],
    ["index", "build", "{site}", "--from", "phenix", "--plate", "P", "--channel-map", "5=DNA", "--output", "{file}/i.parquet"],
])
def test_an_output_below_a_file_is_one_line_with_exit_code_2(shared_data, site_5ch, tmp_path, capsys, argv):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    dp = shared_data / "interop" / "deepprofiler_example" / "Week1_22123"
    code, _, err = run(capsys, *[a.format(dp=dp, file=afile, site=site_5ch / "images" / "orig") for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert str(afile) in lines[0] and "output location is not writable" in lines[0] and ".raycp-write-test" not in lines[0]
