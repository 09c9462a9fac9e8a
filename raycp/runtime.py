"""Ray runtime, the one home for Ray: join ``RAY_ADDRESS`` (or the configured address) or start a
small local cluster. Entry points choose the cluster (:func:`use`, or :func:`init` to connect now);
library code asks for it with :func:`connection` and never connects by itself.

Local defaults suit a laptop or a 2-core CI box: object store capped, dashboard off, usage
stats off, token auth off (Ray >= 2.59 turns it on for local clusters and writes a token under
``$HOME``), temp files under ``$RAYCP_RAY_TMPDIR`` or the system temp dir.

Known trap on small machines: a Ray Data actor pool whose actors take every CPU deadlocks the
pipeline (read tasks never schedule). :func:`actor_pool_size` sizes pools so that at least one
CPU stays free for the tasks that feed them.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

from raycp.errors import RuntimeSetupError

if TYPE_CHECKING:
    from raycp.config import ComputeConfig

_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


_QUIET = {"on": False}


def set_quiet(on: bool = True) -> None:
    """Called once by a command-line entry point: when this process connects to Ray, Ray's own
    console output is kept off the terminal (see :func:`quiet_console`). Library use (a
    notebook) keeps Ray's defaults."""
    _QUIET["on"] = bool(on)


def _quiet_env() -> None:
    for key, value in _LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def init(compute: ComputeConfig | None = None, *, log_to_driver: bool = False):
    """Connect to Ray once per process and return the ``ray`` module.

    Precedence: an already-initialised Ray > ``compute.ray_address`` > ``RAY_ADDRESS`` > a new
    local cluster sized by ``compute``. The local-cluster environment (token auth and usage stats
    off) is applied only when raycp starts the cluster itself: a joined cluster keeps its auth.
    """
    import ray

    if ray.is_initialized():
        _quiet_data_context()
        return ray
    from raycp.config import ComputeConfig

    compute = compute or ComputeConfig()
    address = compute.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        _quiet_env()
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver, logging_level="WARNING")
        else:
            tmp = os.environ.get("RAYCP_RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "raycp-ray")
            os.makedirs(tmp, exist_ok=True)
            env = dict(_LOCAL_ENV)
            dashboard = {}
            if compute.include_dashboard:
                dashboard, api = _local_dashboard()
                env["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"] = api
            ray.init(
                num_cpus=compute.num_cpus,
                num_gpus=compute.num_gpus,
                object_store_memory=int(compute.object_store_memory_gb * 1024**3),
                include_dashboard=compute.include_dashboard,
                log_to_driver=log_to_driver,
                logging_level="WARNING",
                _temp_dir=tmp,
                runtime_env={"env_vars": env},
                **dashboard,
            )
    except ConnectionError as exc:
        raise RuntimeSetupError(f"cannot reach the Ray cluster at {address}: {exc}",
                                fix="check RAY_ADDRESS or start the cluster with `ray start --head`") from None
    except OSError as exc:
        if address or "path length" not in str(exc):
            raise
        raise RuntimeSetupError(f"cannot start a local Ray cluster under {tmp}: {exc}",
                                fix="set RAYCP_RAY_TMPDIR to a short folder, e.g. /tmp/raycp-ray") from None
    _quiet_data_context()
    if _QUIET["on"]:
        quiet_console()
    _record_connection(address)
    return ray


def _local_dashboard() -> tuple[dict, str]:
    """``ray.init`` arguments of a local cluster's dashboard (127.0.0.1, a free port) and its URL.

    The State API (and Ray Train's placement-group cleaner, which uses it) finds a cluster by
    ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else ``/tmp/ray/ray_current_cluster``: a
    cluster started under its own temp dir is in none of them (and that file may name another
    machine-wide cluster), so its workers are told the dashboard's URL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port}, f"http://127.0.0.1:{port}"


_CHOSEN: dict = {"set": False, "compute": None}


def use(compute: ComputeConfig | None = None) -> None:
    """For entry points (the CLI, ``raycp run``, jobs): the cluster this process works on, by
    :func:`init`'s rules (``compute.ray_address`` > ``RAY_ADDRESS`` > a local cluster sized by
    ``compute``). Nothing connects yet: library code connects on first need through
    :func:`connection`, so a command whose work is already done starts no cluster."""
    _CHOSEN.update(set=True, compute=compute)


def connection():
    """The ``ray`` module for library code: the connection this process already has, or the one
    its entry point chose with :func:`use` (made now, once). Library code never connects by
    itself; it raises :class:`RuntimeSetupError` when no entry point chose a cluster."""
    import ray

    if ray.is_initialized():
        _quiet_data_context()
        return ray
    if not _CHOSEN["set"]:
        raise RuntimeSetupError("this needs a Ray cluster and no entry point chose one",
                                fix="call raycp.runtime.init(compute) first (the raycp command does)")
    return init(_CHOSEN["compute"])


def _quiet_data_context() -> None:
    """Ray Data defaults for batch jobs: no per-operator progress spam, deterministic order."""
    import logging

    import ray.data

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # raycp draws its own progress bars; Ray Data's notice that its own are off is noise.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    no_data_progress_bars()


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        local = started_here()
        ray.shutdown()
        if local:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # set by init for the dashboard it started


STATUS_ENV = "RAYCP_STATUS_FILE"
"""Set by the supervising ``raycp`` process (:func:`raycp.cli.entry`) for the command it runs."""


def read_status_record(path: str) -> dict:
    """The record a supervised command left for its ``raycp`` process (empty when none)."""
    import json

    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def update_status_record(**fields) -> None:
    """Add ``fields`` to the record for a supervising ``raycp`` process (:data:`STATUS_ENV`),
    atomically; nothing when this process is not supervised."""
    import json

    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    record = {**read_status_record(path), **fields}
    with open(f"{path}.tmp", "w") as fh:
        json.dump(record, fh)
    os.replace(f"{path}.tmp", path)


def _local_node():
    """Ray's node object when this process started the cluster it is connected to, else ``None``."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node if ray.is_initialized() and node is not None and node.all_processes else None


def _record_connection(address: str | None) -> None:
    """Tell a supervising ``raycp`` process which cluster this process uses: the pids of the
    processes of a local cluster started here, or the address joined."""
    node = _local_node()
    pids = {kind: [info.process.pid for info in infos] for kind, infos in node.all_processes.items()} if node else {}
    update_status_record(ray={"address": address, "started_here": bool(pids), "pids": pids})


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def started_here() -> bool:
    """Whether this process started the Ray cluster it is connected to (a local one)."""
    return _local_node() is not None


def actor_restart_args() -> dict:
    """``ray_remote_args`` for Ray Data actor pools. On a local cluster raycp started there is no
    other node to restart an actor on, and Ray Data passes an actor's constructor arguments by
    reference, which with restarts on makes the driver log an error line per pool (ray#53727):
    restarts are off there. On a joined cluster Ray Data's default (restart forever) is kept, so
    an actor lost with its node comes back elsewhere."""
    return {"max_restarts": 0} if started_here() else {}


# -- entry points: quiet console, lost cluster --------------------------------------------------------

_RAY_MESSAGES: list[str] = []


def quiet_console() -> None:
    """For command-line entry points: Ray's own console output stays off the terminal.

    Ray Data's console handler is raised to CRITICAL (its log file, in the Ray session folder,
    keeps every record), and the messages Ray pushes to the driver (``(raylet) ...`` notices)
    are kept in memory: :func:`lost_cluster` quotes the last one; the others are printed as one
    ``raycp: ray: ...`` line each on stderr. Private Ray API (``ray._private.worker``), pinned to
    the locked Ray by a test."""
    import logging
    import sys

    import ray._private.worker as ray_worker

    for name in ("ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if not hasattr(handler, "baseFilename") and type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.CRITICAL + 1)
    if getattr(ray_worker.print_to_stdstream, "_raycp", False):
        return

    def keep(data, ignore_prefix: bool = False):
        lines = [str(line) for line in data.get("lines", [])]
        text = "\n".join(lines).strip()
        if not text:
            return
        _RAY_MESSAGES.append(text)
        if not _is_node_death(text):
            first = next((ln.strip() for ln in lines if ln.strip()), "")
            print(f"raycp: ray: {first}", file=sys.stderr, flush=True)

    keep._raycp = True
    ray_worker.print_to_stdstream = keep


def _is_node_death(text: str) -> bool:
    lower = text.lower()
    return any(k in lower for k in ("raylet is terminated", "has been marked dead", "node has crashed"))


def _cluster_reachable(timeout_s: float = 5.0) -> bool:
    import threading

    import ray

    answer: list[bool] = []

    def ping():
        try:
            answer.append(any(n.get("Alive") for n in ray.nodes()))
        except Exception:  # noqa: BLE001 - unreachable
            answer.append(False)

    thread = threading.Thread(target=ping, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


def lost_cluster(exc: BaseException) -> RuntimeSetupError | None:
    """The one-line error (exit code 4) for an exception raised because the Ray cluster went away
    mid-run (a ``ray stop`` elsewhere, an OOM-killed raylet or GCS); ``None`` when the cluster is
    still there (the exception is something else). A local cluster raycp started is checked
    through its processes, a joined one by asking the GCS for its nodes (5 s at most)."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    node = _local_node()
    if node is not None:
        dead = sorted({kind for kind, _ in node.dead_processes()})
        if not dead:
            return None
        what = f"its {', '.join(dead)} process(es) died"
    elif _cluster_reachable():
        return None
    else:
        what = "its head (GCS) no longer answers"
    said = next((m for m in reversed(_RAY_MESSAGES) if _is_node_death(m)), "").lower()
    if "raylet is terminated" in said:
        hint = "; Ray: the raylet was terminated (SIGKILL by the out-of-memory killer or by hand)"
    elif "marked dead" in said:
        hint = "; Ray: the node was marked dead after missed heartbeats (a crashed or out-of-memory raylet)"
    else:
        hint = ""
    return cluster_gone(f"{what} ({type(exc).__name__}){hint}")


def cluster_gone(what: str) -> RuntimeSetupError:
    """The one-line error (exit code 4) for a Ray cluster that went away mid-run, saying what
    was seen and that re-running resumes."""
    return RuntimeSetupError(
        f"the Ray cluster went away during the run: {what}",
        fix="re-run the same command: finished stages and sites are kept and the run resumes where it "
            "stopped (if memory ran out, lower compute.object_store_memory_gb or the batch sizes)")


def abandon() -> None:
    """After :func:`lost_cluster`: disconnect from the dead cluster and stop what is left of a
    local one, with Ray's shutdown chatter (lost-object recovery notices) kept off stderr."""
    import sys

    import ray

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001 - the cluster is gone already
                pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cluster_cpus() -> float:
    """CPUs raycp sizes its pools for: the connected cluster's (1 when it reports none), or on a
    joined cluster the size its autoscaler can reach when larger (:func:`max_cluster_resources`)."""
    return max_cluster_resources().get("CPU", 1.0)


def cluster_gpus() -> float:
    """GPUs raycp plans for (0 when there are none): as :func:`cluster_cpus`."""
    return max_cluster_resources().get("GPU", 0.0)


def max_cluster_resources() -> dict[str, float]:
    """The most of each resource the connected cluster can have: what it has now, or more

    - on a cluster raycp joined, the ``compute.num_cpus`` / ``compute.num_gpus`` its entry point
      was given (:func:`use`): the size an autoscaling cluster reaches (its node types' bounds),
      so raycp sizes its task and actor pools, chooses CUDA and asks for GPUs before the
      autoscaler has added the nodes;
    - where the autoscaler reports its node types' bounds to the GCS (Ray's private
      ``ray._private.state.state.get_max_resources_from_cluster_config``, the call Ray Train and
      Ray Data make; pinned to the locked Ray by ``tests/test_runtime.py``).
    On a local cluster raycp started, ``num_cpus`` / ``num_gpus`` already sized it."""
    import ray

    most = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        from ray._private.state import state

        reported = dict(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 - an older or newer Ray without the call: what is there now
        reported = {}
    compute = _CHOSEN["compute"]
    if compute is not None and not started_here():
        for key, value in (("CPU", compute.num_cpus), ("GPU", compute.num_gpus)):
            if value:
                reported[key] = max(float(value), float(reported.get(key, 0.0)))
    for key, value in reported.items():
        most[key] = max(most.get(key, 0.0), float(value))
    return most


def has_state_api(timeout_s: float = 10.0) -> bool:
    """Whether the connected cluster answers Ray's State API (served by its dashboard). Ray Train's
    placement-group cleaner needs it to release the workers of a run whose driver was killed (a
    Tune trial that a scheduler stopped)."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=int(max(1, timeout_s)), raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - no dashboard, or it does not answer: either way, no State API
        return False
    return True


def notice(message: str) -> None:
    """One ``raycp: <message>`` line on stderr: something the user should know that is not an error."""
    import sys

    print(f"raycp: {message}", file=sys.stderr, flush=True)


def cluster_may_grow() -> bool:
    """Whether resources asked for explicitly (GPUs, CPUs for Train workers) may still arrive: on a
    cluster raycp joined, its autoscaler adds nodes on demand (e.g. a GPU node type with
    ``min_workers: 0``); a local cluster raycp started never grows."""
    return not started_here()


def no_data_progress_bars() -> None:
    """Ray Data's own progress bars off in this process (raycp draws its own); for the driver
    and for Ray Train workers that read with Ray Data."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def actor_pool_size(*, cpus_per_actor: float = 1.0, max_size: int | None = None) -> tuple[int, int]:
    """``(min_size, max_size)`` for a CPU actor pool that leaves a CPU for the feeding tasks."""
    free = max(cluster_cpus() - 1.0, cpus_per_actor)
    size = max(1, int(free // cpus_per_actor))
    if max_size is not None:
        size = min(size, max_size)
    return 1, size


def train_storage(url: str):
    """``(storage_path, storage_filesystem)`` for a Ray Train or Tune ``RunConfig`` at ``url``.

    The URL is resolved by raycp's own fsspec filesystem (:func:`raycp.io.urls.filesystem`), as
    every other read and write is: a local path comes back absolute (``~`` expanded) with no
    filesystem object; any other URL keeps the same S3 endpoint, credentials and anonymity (one
    S3 configuration), wrapped for pyarrow as Ray's docs describe
    (``pyarrow.fs.PyFileSystem(FSSpecHandler(fs))``)."""
    import pyarrow.fs as pafs

    from raycp.io import urls

    fs, path = urls.filesystem(url)
    if urls.protocol_of(url) == "file":
        return path, None
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def detach_from_working_dir() -> str | None:
    """For a Ray job's driver (``jobs/*.py``): work from a private copy of the job's uploaded
    ``working_dir`` instead of Ray's own, and return the copy's path (None outside a job).

    Ray 2.60 re-extracts a ``working_dir`` on a node whenever another runtime env with the same
    package starts there (``download_and_unpack_package(..., overwrite=True)``: ``rmtree`` then
    unzip), e.g. Ray Train's controller; the driver's current directory is deleted under it and
    any later ``os.getcwd()`` (torch calls one on import) raises ``FileNotFoundError``. The copy
    keeps relative paths (a config under the working_dir) valid for the whole job."""
    import atexit
    import shutil

    try:
        here = os.getcwd()
    except FileNotFoundError:
        return None
    if f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}" not in here + os.sep:
        return None
    copy = tempfile.mkdtemp(prefix="raycp-job-")
    shutil.copytree(here, copy, dirs_exist_ok=True, symlinks=True)
    os.chdir(copy)
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    return copy
