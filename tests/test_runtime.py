"""Ray runtime: one local cluster, sized so actor pools never starve the tasks that feed them."""

from __future__ import annotations

from raycp import runtime


def test_init_is_idempotent_and_local_defaults_apply(ray_cluster):
    import os

    assert runtime.init() is ray_cluster
    assert runtime.cluster_cpus() == 2.0
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_actor_pool_leaves_a_cpu_for_read_tasks(ray_cluster):
    # 2 CPUs: a pool of 1-CPU actors gets at most 1 actor, so read tasks always have a CPU.
    assert runtime.actor_pool_size(cpus_per_actor=1.0) == (1, 1)
    assert runtime.actor_pool_size(cpus_per_actor=0.5) == (1, 2)
    assert runtime.actor_pool_size(cpus_per_actor=0.25, max_size=3) == (1, 3)
