"""A real multi-node Ray cluster on one machine for the job tests (issue 14): a head that runs no work
(``CPU: 0``, as the cloud configs have it) and worker nodes, each a ``ray start --address`` with its
own resources and ports, all under the test's own temp dir and HOME (auth off). Nodes can be added
(as an autoscaler or a replacement would) and killed (``kill -9`` of a node's raylet, as a lost spot
instance). Teardown stops only the processes of this cluster, found by its temp dir in their command
lines, never with a machine-wide ``ray stop``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 that this process has not handed out before: the kernel may give a
    port just released again, and one ``ray start`` with the same port twice fails."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def node_ports() -> list[str]:
    """The per-node ports Ray would otherwise take from fixed defaults (several nodes on one host)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


def _processes() -> dict[int, tuple[int, str]]:
    """PID → (parent PID, command line) of every process of the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            found[int(entry.name)] = (ppid, cmd)
    return found


def processes_under(ray_tmp: str, gcs_port: int | None = None) -> dict[int, str]:
    """PID → command line of every process of one cluster: those whose command line names its temp
    dir ``ray_tmp``, the head's Ray Client server (it names only the GCS address), and their
    descendants (the agents and workers rename themselves ``ray::...``)."""
    procs = _processes()
    client = re.compile(rf"ray\.util\.client\.server --address=\S+:{gcs_port}\b") if gcs_port else None
    ours = {pid for pid, (_, cmd) in procs.items() if ray_tmp in cmd or (client and client.search(cmd))}
    while True:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        if not more:
            return {pid: procs[pid][1] for pid in ours}
        ours |= more


def stop(pids: set[int]) -> None:
    """SIGTERM, then SIGKILL after 15 s, to these processes only."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


def own_ray_env(prefix: str) -> tuple[str, dict]:
    """A temp dir for the local Ray a ``raycp`` subprocess starts, and that process's environment:
    its own ``RAYCP_RAY_TMPDIR``, unbuffered output, and no address of another cluster."""
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    env = {**os.environ, "RAYCP_RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    return ray_tmp, env


def kill_cluster(ray_tmp: str) -> None:
    """``kill -9`` of every process of the local Ray under ``ray_tmp`` (:func:`processes_under`)."""
    for pid in processes_under(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class LocalCluster:
    """A head (0 CPU, dashboard and job server on 127.0.0.1) and named worker nodes."""

    ray_tmp: str
    env: dict
    gcs: str
    address: str                                   # the dashboard / job server URL
    nodes: dict[str, set[int]] = field(default_factory=dict)   # node name → the PIDs `ray start` left

    def add_worker(self, name: str, cpus: int = 2) -> None:
        """``ray start --address`` a worker node with ``cpus`` CPUs and the custom resource ``name``,
        and its own temp dir under the cluster's: like a real node's disk, its own runtime_resources,
        where Ray unpacks a job's working_dir (nodes sharing that folder would delete and unpack it
        again under each other's running workers)."""
        before = set(processes_under(self.ray_tmp))
        subprocess.run([str(BIN / "ray"), "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1",
                        f"--temp-dir={self.ray_tmp}/{name}",
                        f"--num-cpus={cpus}", "--num-gpus=0", "--object-store-memory=300000000",
                        f"--resources={json.dumps({name: 1})}", *node_ports()],
                       env=self.env, check=True, capture_output=True, timeout=180)
        self.nodes[name] = set(processes_under(self.ray_tmp)) - before

    def raylet(self, name: str) -> int:
        cmds = processes_under(self.ray_tmp)
        (pid,) = [p for p in self.nodes[name] if "raylet/raylet" in cmds.get(p, "")]
        return pid

    def kill(self, name: str) -> None:
        """``kill -9`` the node's raylet (its workers and agents die with it) and wait until Ray
        has marked the node dead."""
        from ray.util.state import list_nodes

        os.kill(self.raylet(name), signal.SIGKILL)
        deadline = time.time() + 120
        while time.time() < deadline:
            alive = [n for n in list_nodes(address=self.address, limit=100, raise_on_missing_output=False)
                     if n.state == "ALIVE" and name in (n.resources_total or {})]
            if not alive:
                return
            time.sleep(0.5)
        raise AssertionError(f"Ray still lists node {name} as alive 120 s after its raylet was killed")

    def node_name(self, node_id: str) -> str:
        """The worker name (custom resource) of a Ray node id."""
        from ray.util.state import get_node

        node = get_node(node_id, address=self.address)
        names = [k for k in (node.resources_total or {}) if k in self.nodes]
        assert len(names) == 1, (node_id, node.resources_total)
        return names[0]

    def submit(self, *argv: str, submission_id: str, cwd: Path = ROOT,
               runtime_env: str = "jobs/runtime_env.yaml") -> subprocess.CompletedProcess:
        """``ray job submit --no-wait --runtime-env <runtime_env> -- <argv>`` from ``cwd``."""
        cmd = [str(BIN / "ray"), "job", "submit", "--no-wait", f"--address={self.address}",
               f"--submission-id={submission_id}", f"--runtime-env={runtime_env}", "--", *argv]
        return subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=300, check=True)

    def wait(self, submission_id: str, timeout: float = 900, until=None):
        """Poll the job until it ends (or ``until()`` is true while it runs); its final status."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.address)
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = client.get_job_status(submission_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status
            if until is not None and until():
                return status
            time.sleep(0.2)
        raise AssertionError(f"job {submission_id} still running after {timeout} s")

    def logs(self, submission_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address).get_job_logs(submission_id)[-4000:]


@pytest.fixture
def local_cluster(tmp_path):
    """A :class:`LocalCluster` with a head (0 CPU) and two 2-CPU workers, ``node0`` and ``node1``."""
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    cluster = LocalCluster(ray_tmp, env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        f"--temp-dir={ray_tmp}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--object-store-memory=300000000",
                        f"--ray-client-server-port={free_port()}", *node_ports()],
                       env=env, check=True, capture_output=True, timeout=180)
        for name in ("node0", "node1"):
            cluster.add_worker(name)
        yield cluster
    finally:
        stop(set(processes_under(ray_tmp, port)))
