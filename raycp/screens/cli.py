"""``raycp screen ...``: build a labelled screen of real cells with known truth, and describe one."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from raycp.console import console as _console

app = typer.Typer(help="Build labelled Cell Painting screens from real cells, with known truth "
                       "(for demos, tests and benchmarks).", no_args_is_help=True)

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="mini (CI, seconds) | small (demo) | bench (~10^4 sites)")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML screen config on top of the preset")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a key: section.key=value")]


@app.command("build")
def build(
    preset: PresetOpt = "mini",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="output folder URL (default runs/screen-<preset>)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed (same seed, same bytes)")] = None,
    engine: Annotated[str, typer.Option(help="ray (tasks on the cluster) | local (this process)")] = "ray",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved config and plan, write nothing")] = False,
) -> None:
    """Compose a multi-plate screen of 16-bit TIFF sites from real cells: images, a raycp index,
    ground truth (treatment → MoA, strength, responding fraction; true nucleus centres) and a manifest."""
    from raycp.config import with_options
    from raycp.screens.build import build_screen, plan_screen
    from raycp.screens.config import dump, load_screen_config

    overrides = with_options(set_, {"seed": seed})
    cfg = load_screen_config(preset, config, overrides)
    source = config or f"preset {preset}"
    out = output or f"runs/screen-{preset}"
    con = _console()
    if dry_run:
        plan = plan_screen(cfg, source=source)
        typer.echo(dump(cfg), nl=False)
        _print_plan(con, plan)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raycp import runtime
    from raycp.io import urls

    urls.ensure_writable(out)  # before the bar: a bad output is one line
    runtime.use(cfg.compute)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("screen: sites", total=None)

        def on_plan(plan) -> None:
            bar.update(task, total=len(plan.sites))

        result = build_screen(cfg, out, engine=engine, source=source, on_plan=on_plan,
                              progress=lambda n: bar.advance(task, n))
    m = result.manifest["counts"]
    con.print(f"[bold]wrote {result.output}[/] in {result.seconds:.1f} s "
              f"({result.task_cpu_seconds:.1f} CPU-s composing and writing sites)")
    con.print(f"  plates {m['plates']} · wells {m['wells']} · sites {m['sites']} · nuclei {m['nuclei']} · "
              f"treatments {m['treatments']} + {m['control']} ({m['control_wells']} control wells)")
    con.print(f"  strength classes {m['strength_classes']} · MoAs {m['moas']}")
    con.print(f"  index {result.output}/index/sites.parquet · truth {result.output}/truth/ · "
              f"manifest {result.output}/manifest.json")


def _print_plan(con, plan) -> None:
    from raycp.io.index import IS_CONTROL

    t = plan.treatments
    con.print(f"plan: plates {len(plan.plates)} · wells {len(plan.plate_map)} · sites {len(plan.sites)} · "
              f"treatments {int((~t[IS_CONTROL]).sum())} + control")


@app.command("describe")
def describe(
    screen: Annotated[str, typer.Argument(help="folder URL written by `raycp screen build`")],
    check: Annotated[bool, typer.Option("--check", help="measure per-site statistics: plate predictability "
                                                       "from controls and treatment effects by true strength")] = False,
) -> None:
    """Summarise a built screen from its manifest; with --check, measure the structure it should have."""
    from raycp.errors import InputError
    from raycp.io import urls
    from raycp.io.index import read_index

    try:
        manifest = json.loads(urls.read_bytes(urls.join(screen, "manifest.json")))
    except FileNotFoundError:
        raise InputError(f"{screen}: no manifest.json", fix="point at a folder written by `raycp screen build`") from None
    con = _console()
    c = manifest["counts"]
    con.print(f"[bold]{manifest['name']}[/] (seed {manifest['seed']}): plates {c['plates']} · wells {c['wells']} · "
              f"sites {c['sites']} · nuclei {c['nuclei']}")
    con.print(f"  treatments {c['treatments']} + {c['control']}; classes {c['strength_classes']}; MoAs {c['moas']}")
    con.print(f"  cells: {manifest['cells']['n_cells']} real cells from "
              f"{', '.join(s['site'] for s in manifest['cells']['sources'])}")
    for moa, p in manifest["treatments"]["programs"].items():
        con.print(f"  program {moa}: {p['what']}", soft_wrap=True)
    for conf in manifest["confounders"]["list"]:
        con.print(f"  confounder {conf['name']}: {conf['what']}", soft_wrap=True)
    if not check:
        return
    import pandas as pd

    from raycp.screens.stats import measure_screen, structure_report

    index = read_index(urls.join(screen, "index", "sites.parquet"))
    sites = measure_screen(index.table, index.channels)
    truth = pd.read_parquet(io_bytes(urls.join(screen, "truth", "treatments.parquet")))
    report = structure_report(sites, truth)
    con.print(f"check: plate from control sites, raw features: {report['plate_accuracy_raw']:.2f} "
              f"(chance {report['chance']:.2f}); after per-plate control normalisation: "
              f"{report['plate_accuracy_normalised']:.2f}")
    for cls in ("strong", "median", "weak", "null"):
        e = report["effect_by_class"].get(cls)
        if e:
            con.print(f"  treatment effect, {cls:6s}: mean {e['mean']:.2f} (min {e['min']:.2f}, max {e['max']:.2f}, "
                      f"n {int(e['count'])})")
    con.print(f"  Spearman(true strength, effect) = {report['spearman_strength_effect']:.2f}")


def io_bytes(url: str):
    import io

    from raycp.io import urls

    return io.BytesIO(urls.read_bytes(url))
