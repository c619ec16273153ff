"""A Ray cluster of several nodes on this host, every process on loopback: what the tests,
the benchmark and `reir cluster ... --local N` run on.

Ray on Linux replaces 127.0.0.1 with the host's interface address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before Ray is imported (it is read once, at
import); with it, nodes, the GCS and the raylets use 127.0.0.1. Each cluster gets its own
temp directory, so a killed run's leftovers are never joined by the next one.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: see above
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the host
# Serve kills an HTTP proxy not ready within 5 s and serve.start() then fails instead of
# waiting for its replacement; several nodes starting on a loaded 2-core host take longer.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

import shutil
import tempfile
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

LOOPBACK = ("127.0.0.1", "::1")


class LocalCluster:
    """`nodes` Ray nodes (the first is the head) with `cpus` logical CPUs each; the driver
    connects to it on entry and everything stops on exit."""

    def __init__(self, nodes: int = 2, cpus: int = 1, object_store_mb: int = 150, head_cpus: int | None = None):
        """head_cpus=0: the head runs no tasks or actors (the driver and Ray's own services
        only), so killing a worker node surely kills work."""
        self.nodes, self.cpus, self.object_store_mb = nodes, cpus, object_store_mb
        self.head_cpus = cpus if head_cpus is None else head_cpus
        self.cluster: Cluster | None = None
        self.temp_dir: Path | None = None
        self.workers: list = []

    def __enter__(self) -> LocalCluster:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:  # Ray was imported before this module set it
            raise RuntimeError(
                "Ray was imported before reir.cluster.local, so its nodes would not stay on 127.0.0.1: "
                "import reir.cluster.local first, or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment"
            )
        if ray.is_initialized():
            ray.shutdown()
        # Ray's socket paths must stay under 107 bytes: a short directory, not pytest's tmp_path
        self.temp_dir = Path(tempfile.mkdtemp(prefix="reir-ray-", dir="/tmp"))
        (self.temp_dir / "ray").mkdir()
        # the driver's "current cluster" file goes here too, not to a /tmp/ray shared with others
        self._saved_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(self.temp_dir)
        common = {
            "num_cpus": self.cpus,
            "object_store_memory": self.object_store_mb << 20,
            "node_ip_address": "127.0.0.1",
        }
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args=common
            | {"num_cpus": self.head_cpus}
            | {"include_dashboard": False, "temp_dir": str(self.temp_dir / "ray"), "dashboard_host": "127.0.0.1"},
        )
        self.workers = [self.add_node() for _ in range(self.nodes - 1)]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, include_dashboard=False, log_to_driver=False)
        return self

    def add_node(self):
        node = self.cluster.add_node(
            num_cpus=self.cpus, object_store_memory=self.object_store_mb << 20, node_ip_address="127.0.0.1"
        )
        return node

    def kill_node(self, node) -> None:
        """Kill a worker node's processes at once (no graceful drain), as a lost host would."""
        self.cluster.remove_node(node, allow_graceful=False)
        if node in self.workers:
            self.workers.remove(node)

    @property
    def address(self) -> str:
        return self.cluster.address

    def __exit__(self, *exc) -> None:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self.cluster is not None:
                self.cluster.shutdown()
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                if self._saved_tmpdir is None:
                    os.environ.pop("RAY_TMPDIR", None)
                else:
                    os.environ["RAY_TMPDIR"] = self._saved_tmpdir

    def listening_addresses(self) -> set[str]:
        """Every address a process of this cluster (Ray's and the workers it forked) listens
        on: the tests assert it is loopback only."""
        roots = [p for p in psutil.process_iter(["cmdline"]) if _is_ray_process(p, str(self.temp_dir))]
        procs = {p.pid: p for root in roots for p in [root, *_children(root)]}
        out = set()
        for p in procs.values():
            try:
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
        return out


def _is_ray_process(p: psutil.Process, temp_dir: str) -> bool:
    try:
        return any(temp_dir in part for part in p.info["cmdline"] or [])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
