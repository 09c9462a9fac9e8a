"""The ``raycp`` command line: one sub-command per stage, thin over the library.

Exit codes: 0 done; 2 bad input or config (one line on stderr naming the file and the fix);
3 done but some inputs were quarantined (see the stage's ledger); 4 storage or Ray unreachable;
130 interrupted.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from raycp.console import console as _console
from raycp.console import print_ledger, track, warn
from raycp.errors import RaycpError
from raycp.extract import cli as extract_cli
from raycp.models import cli as models_cli
from raycp.preprocess import cli as preprocess_cli
from raycp.profiles import cli as profiles_cli
from raycp.run import cli as run_cli
from raycp.screens import cli as screens_cli
from raycp.sweep import cli as sweep_cli
from raycp.train import cli as train_cli
from raycp.trainset import cli as trainset_cli

app = typer.Typer(
    name="raycp",
    help="Scale-out image-based profiling of Cell Painting screens (Moshkov et al. 2024) on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Build, check and summarise the screen index (one row per site).",
                        no_args_is_help=True)
config_app = typer.Typer(help="Show the resolved run configuration.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(config_app, name="config")
# the stages' own apps, registered at import (each module is typer + lazy imports of its library)
app.add_typer(screens_cli.app, name="screen")
app.add_typer(preprocess_cli.app, name="preprocess")
app.add_typer(train_cli.app, name="train")
app.add_typer(extract_cli.app, name="extract")
app.add_typer(models_cli.app, name="model")
app.add_typer(profiles_cli.app, name="profile")
app.add_typer(sweep_cli.app, name="sweep")
app.add_typer(trainset_cli.app, name="trainset")
app.command("run")(run_cli.run)

EXIT_QUARANTINED = 3

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: section.key=value")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML run config (URL or path)")]


def _parse_map(text: str, *, int_keys: bool = False) -> dict:
    """``"5=DNA,2=ER"`` -> ``{5: "DNA", 2: "ER"}``."""
    from raycp.errors import ConfigError

    out: dict = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"channel map entry {item!r} is not SOURCE=CHANNEL",
                              fix="write e.g. --channel-map 5=DNA,2=ER,6=RNA,3=AGP,4=Mito")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            out[int(key) if int_keys else key] = value
        except ValueError:
            raise ConfigError(f"channel map key {key!r} is not a channel number",
                              fix="Phenix channels are numbers: 1=Brightfield,5=DNA ...") from None
    if not out:
        raise ConfigError("empty channel map", fix="give at least one SOURCE=CHANNEL pair")
    return out


@index_app.command("build")
def index_build(
    source: Annotated[str, typer.Argument(help="LoadData CSV, DeepProfiler index.csv, or Phenix image folder")],
    output: Annotated[str, typer.Option("--output", "-o", help="where to write the index (.parquet URL)")],
    fmt: Annotated[str, typer.Option("--from", help="source format: loaddata | deepprofiler | phenix")] = "loaddata",
    channel_map: Annotated[Optional[str], typer.Option(
        help="source channel -> raycp channel, e.g. 'DNA=DNA,Mito=Mito' (LoadData) or '5=DNA,2=ER' (Phenix); "
             "required for those two formats")] = None,
    plate: Annotated[Optional[str], typer.Option(help="plate name (Phenix folders)")] = None,
    platemap: Annotated[Optional[str], typer.Option(help="CSV with Metadata_Well (+Metadata_Plate) and treatments")] = None,
    treatment_col: Annotated[Optional[str], typer.Option(help="column holding the treatment")] = None,
    control: Annotated[Optional[list[str]], typer.Option(help="treatment value(s) that mark controls")] = None,
    dp_config: Annotated[Optional[str], typer.Option("--dp-config", help="DeepProfiler config.json (default: ../config/config.json)")] = None,
    images_root: Annotated[Optional[str], typer.Option(help="DeepProfiler images folder (default: inputs/images)")] = None,
    check_files: Annotated[bool, typer.Option(help="check that every image file exists")] = True,
) -> None:
    """Make the canonical index (Parquet, one row per site) from a LoadData CSV, a DeepProfiler
    project, or a folder of Phenix/Operetta images."""
    from raycp.io import importers
    from raycp.io.index import write_index

    controls = tuple(control or ())
    if fmt == "loaddata":
        if not channel_map:
            raise typer.BadParameter("--channel-map is required for LoadData, e.g. DNA=DNA,ER=ER")
        index = importers.from_loaddata(source, channel_map=_parse_map(channel_map), treatment_col=treatment_col,
                                        control_values=controls, platemap=platemap, check_files=check_files)
    elif fmt == "deepprofiler":
        index = importers.from_deepprofiler(source, config_url=dp_config, images_root=images_root,
                                            check_files=check_files)
    elif fmt == "phenix":
        if not channel_map or not plate:
            raise typer.BadParameter("--channel-map and --plate are required for a Phenix folder")
        index = importers.from_phenix_folder(source, plate=plate, channel_map=_parse_map(channel_map, int_keys=True),
                                             platemap=platemap, treatment_col=treatment_col,
                                             control_values=controls, check_files=check_files)
    else:
        raise typer.BadParameter(f"unknown format {fmt!r}: use loaddata, deepprofiler or phenix")
    write_index(index, output)
    _print_index(index, title=f"wrote {output}")
    con = _console()
    for note in index.notes:
        con.print(f"  {note}", markup=False)
    for warning in index.warnings:
        warn(warning)


def _print_index(index, *, title: str) -> None:
    from raycp.io.index import IS_CONTROL, PLATE, TREATMENT, WELL

    t = index.table
    con = _console()
    con.print(f"[bold]{title}[/]")
    con.print(f"  sites {len(t)} · plates {t[PLATE].nunique()} · wells {t[[PLATE, WELL]].drop_duplicates().shape[0]}"
              f" · channels {', '.join(index.channels)}")
    con.print(f"  treatments {t[TREATMENT].nunique()} · control sites {int(t[IS_CONTROL].sum())}")


@index_app.command("check")
def index_check(
    index_url: Annotated[str, typer.Argument(help="index Parquet (or canonical CSV) URL")],
    channels: Annotated[Optional[str], typer.Option(help="comma-separated channels to require")] = None,
    check_files: Annotated[bool, typer.Option(help="check that every image file exists")] = True,
) -> None:
    """Validate an index: columns, duplicate sites, unsafe names, and (in parallel) that every file exists."""
    from raycp.io.index import read_index

    chans = [c.strip() for c in channels.split(",")] if channels else None
    index = read_index(index_url, channels=chans, check_files=check_files)
    _print_index(index, title=f"{index_url}: valid")


@index_app.command("summarize")
def index_summarize(
    index_url: Annotated[Optional[str], typer.Argument(help="index URL (default: data.index of the config)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="folder for summary.parquet")] = None,
) -> None:
    """Read every site on the Ray cluster and print per-channel shape, dtype and intensity
    percentiles (0.05 and 99.95 are the paper's stretch limits)."""
    from raycp import inspect
    from raycp.config import with_options
    from raycp.io import urls
    from raycp.io.index import read_index
    from raycp.preprocess.config import load_config

    overrides = with_options(set_, {"data.index": index_url,
                                    "data.output": output or ("runs/inspect" if config is None else None)})
    run = load_config(config, overrides)
    chosen = config is not None or any(o.startswith("data.channels=") for o in overrides)
    index = read_index(run.data.index, channels=run.data.channels if chosen else None)
    folder = urls.join(run.data.output, "summary")
    urls.ensure_writable(folder)
    from raycp import runtime

    runtime.use(run.compute)
    stats, ledger = inspect.summarize_screen(index, progress=track)
    _write_summary(stats, ledger, run, folder)
    _print_stats(stats)
    print_ledger(ledger.summary())
    if ledger.summary()["quarantined"]:
        raise typer.Exit(EXIT_QUARANTINED)


def _write_summary(stats, ledger, run, folder: str) -> None:
    import io

    from raycp import config as cfg
    from raycp.io import urls

    buf = io.BytesIO()
    stats.to_parquet(buf, index=False)
    urls.atomic_write_bytes(urls.join(folder, "summary.parquet"), buf.getvalue())
    ledger.write(folder)
    cfg.save_resolved(run, folder)


def _print_stats(stats) -> None:
    from rich.table import Table

    from raycp.inspect import PERCENTILES

    con = _console()
    if stats.empty:
        con.print("no site could be read")
        return
    pct_cols = [f"p{p:g}" for p in PERCENTILES]
    for (plate, well, site), grp in stats.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"], sort=True):
        table = Table(title=f"{plate} {well} site {site}", title_justify="left")
        for col in ("channel", "shape", "dtype", "min", *pct_cols, "max"):
            table.add_column(col, justify="left" if col in ("channel", "shape", "dtype") else "right")
        for r in grp.to_dict("records"):
            table.add_row(r["channel"], f"{r['height']}×{r['width']}", r["dtype"], str(r["min"]),
                          *(f"{r[c]:.0f}" for c in pct_cols), str(r["max"]))
        con.print(table)


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved run config (YAML < --set overrides), as `raycp run` saves it with the outputs."""
    from raycp import config as cfg
    from raycp import run

    typer.echo(cfg.dump_config(run.load(config, set_)), nl=False)


@app.command("version")
def version() -> None:
    """Print raycp's version."""
    from raycp import __version__

    typer.echo(__version__)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(usage errors, aborts)``: typer >= 0.2x raises its bundled click's (``typer._click``,
    derived from ``typer.TyperException``, and ``typer.Abort``); older typer raised click's own."""
    usage: list[type] = [typer.TyperException]
    aborts: list[type] = [typer.Abort]
    try:
        import click

        usage.append(click.exceptions.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover - click is optional for typer >= 0.2x
        pass
    return tuple(usage), tuple(aborts)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app. A :class:`RaycpError` becomes one line on stderr with its exit
    code (2 bad input, 4 storage or Ray unreachable); a command-line mistake prints the usage and
    exits 2; a lost Ray cluster exits 4 (see :func:`raycp.runtime.lost_cluster`)."""
    from raycp import runtime

    runtime.set_quiet(not os.environ.get("RAYCP_DEBUG"))
    usage_errors, aborts = _click_exceptions()
    try:
        result = app(args=argv, prog_name="raycp", standalone_mode=False)
    except RaycpError as exc:
        typer.echo(f"raycp: error: {exc.one_line()}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("raycp: interrupted", err=True)
        return 130
    except aborts:
        typer.echo("raycp: interrupted", err=True)
        return 130
    except usage_errors as exc:
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"Error: {exc}", err=True)
        return int(getattr(exc, "exit_code", 2) or 2)
    except Exception as exc:
        from raycp.runtime import lost_cluster

        lost = lost_cluster(exc)
        if lost is not None:
            from raycp.runtime import abandon

            abandon()
            typer.echo(f"raycp: error: {lost.one_line()}", err=True)
            return lost.exit_code
        if os.environ.get("RAYCP_DEBUG"):
            raise
        typer.echo(f"raycp: internal error: {type(exc).__name__}: {exc} "
                   "(set RAYCP_DEBUG=1 for the traceback and report it)", err=True)
        return 1
    return result if isinstance(result, int) else 0


#: Commands that may start or join a Ray cluster: the console script runs them supervised.
RAY_COMMANDS = ("run", "preprocess", "train", "extract", "screen", "index", "sweep")


def entry() -> int:
    """The ``raycp`` console script.

    A command that uses Ray runs in a child process watched by this one: when Ray loses its
    cluster (a ``ray stop`` elsewhere, an OOM-killed raylet) its C++ core may end the process at
    once, where no Python handler runs. The watcher then prints one line saying the Ray cluster
    went away and that re-running resumes, and exits 4 (the stages write ``complete`` only after
    their outputs, so nothing half-written is marked finished)."""
    import signal
    import subprocess
    import tempfile

    from raycp import runtime

    argv = sys.argv[1:]
    words = [a for a in argv if not a.startswith("-")]
    if os.environ.get("RAYCP_SUPERVISED") or not words or words[0] not in RAY_COMMANDS or "--help" in argv:
        return main(argv)
    with tempfile.TemporaryDirectory(prefix="raycp-cmd-") as tmp:
        status = os.path.join(tmp, "status.json")
        env = {**os.environ, "RAYCP_SUPERVISED": "1", runtime.STATUS_ENV: status}
        child = subprocess.Popen([sys.executable, "-c", "import sys; from raycp.cli import child_main; "
                                  "sys.exit(child_main())", *argv], env=env)

        def forward(signum, _frame):
            child.send_signal(signum)

        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets Ctrl-C itself
        old_term = signal.signal(signal.SIGTERM, forward)
        try:
            rc = child.wait()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        record = runtime.read_status_record(status)
    if record.get("exit") is not None:
        return int(record["exit"])  # the child finished and reported its own outcome
    ray_info = record.get("ray")
    if ray_info:
        pids = ray_info.get("pids") or {}
        dead = sorted(k for k, ps in pids.items() if k in ("gcs_server", "raylet") and
                      not all(runtime.pid_alive(p) for p in ps))
        if dead or not pids:
            what = (f"its {', '.join(dead)} process(es) died" if dead else
                    f"the cluster at {ray_info.get('address')} or the connection to it was lost")
            err = runtime.cluster_gone(f"{what}, and Ray ended the process (exit code {rc})")
            typer.echo(f"raycp: error: {err.one_line()}", err=True)
            return err.exit_code
    if rc < 0:
        typer.echo(f"raycp: error: the command was killed by signal {-rc} (out of memory, or killed by hand)",
                   err=True)
        return 128 - rc
    return rc


def child_main() -> int:
    """The supervised command (see :func:`entry`): :func:`main`, then its exit code recorded."""
    return _report_exit(main(sys.argv[1:]))


def _report_exit(code: int) -> int:
    """Record the command's own outcome for a supervising ``raycp`` process (see :func:`entry`)."""
    from raycp import runtime

    runtime.update_status_record(exit=int(code))
    return code


if __name__ == "__main__":
    sys.exit(main())
