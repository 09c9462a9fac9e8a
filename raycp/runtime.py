"""Ray runtime: join ``RAY_ADDRESS`` (or the configured address) or start a small local cluster.

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


def _quiet_env() -> None:
    for key, value in _LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def init(compute: ComputeConfig | None = None, *, log_to_driver: bool = False):
    """Connect to Ray once per process and return the ``ray`` module.

    Precedence: an already-initialised Ray > ``compute.ray_address`` > ``RAY_ADDRESS`` > a new
    local cluster sized by ``compute``.
    """
    _quiet_env()
    import ray

    if ray.is_initialized():
        _quiet_data_context()
        return ray
    from raycp.config import ComputeConfig

    compute = compute or ComputeConfig()
    address = compute.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver, logging_level="WARNING")
        else:
            tmp = os.environ.get("RAYCP_RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "raycp-ray")
            os.makedirs(tmp, exist_ok=True)
            ray.init(
                num_cpus=compute.num_cpus,
                num_gpus=compute.num_gpus,
                object_store_memory=int(compute.object_store_memory_gb * 1024**3),
                include_dashboard=compute.include_dashboard,
                log_to_driver=log_to_driver,
                logging_level="WARNING",
                _temp_dir=tmp,
                runtime_env={"env_vars": {k: v for k, v in _LOCAL_ENV.items()}},
            )
    except ConnectionError as exc:
        raise RuntimeSetupError(f"cannot reach the Ray cluster at {address}: {exc}",
                                fix="check RAY_ADDRESS or start the cluster with `ray start --head`") from None
    _quiet_data_context()
    return ray


def _quiet_data_context() -> None:
    """Ray Data defaults for batch jobs: no per-operator progress spam, deterministic order."""
    import logging

    import ray.data

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # raycp draws its own progress bars; Ray Data's notice that its own are off is noise.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def actor_pool_size(*, cpus_per_actor: float = 1.0, max_size: int | None = None) -> tuple[int, int]:
    """``(min_size, max_size)`` for a CPU actor pool that leaves a CPU for the feeding tasks."""
    free = max(cluster_cpus() - 1.0, cpus_per_actor)
    size = max(1, int(free // cpus_per_actor))
    if max_size is not None:
        size = min(size, max_size)
    return 1, size
