"""pytest fixtures for tests on a Ray cluster of namespace hosts (a pytest plugin:
``pytest_plugins = ["testnet.cluster.fixtures"]``).

    def test_something(ray_cluster):        # one cluster for the whole session
        env = ray_cluster.env()              # a driver's environment (token included)
        ... ray_cluster.address ...

A cluster of three hosts costs ~10 s to start, so every test shares one
(session scope).  Its hosts cannot see pytest's temporary directories (the
controller's runs directories of every test): anything a test reads from a
host came through Ray.  After teardown, no process, namespace, veth or
bridge of it may remain (checked; a leak fails the session).

Skipped where test hosts cannot be made (not root, no ``ip``, no Ray); CI
installs what they need (``.ci/run``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from .hosts import create_hosts, leftovers, remove_hosts
from .local import LocalRayCluster, leftover_processes

CLUSTER_HOSTS = 3
ROOT = Path(__file__).resolve().parents[2]


def cluster_unavailable() -> str | None:
    """Why test hosts cannot be made here (``None`` when they can)."""
    if os.geteuid() != 0:
        return "test hosts need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "test hosts need ip (iproute2) and unshare"
    # Whether Ray is installed, without importing it: a driver imports it with the token set.
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'swarmnet[cluster]')"
    return None


requires_cluster = pytest.mark.skipif(cluster_unavailable() is not None, reason=cluster_unavailable() or "")


@contextmanager
def local_cluster(n: int, *, hide: tuple[Path, ...] = (), cpus_per_host: int = 1) -> Iterator[LocalRayCluster]:
    """``n`` namespace hosts with a Ray head and one Ray worker each; everything removed after,
    and :class:`AssertionError` if anything of it is left."""
    hosts = create_hosts(n)
    # The hosts run this checkout's swarmnet, as every host of a real cluster runs the same install.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cluster = LocalRayCluster(hosts, hide=hide, cpus_per_host=cpus_per_host, env=env)
    try:
        cluster.start()
        yield cluster
    finally:
        stuck = cluster.stop()
        problems = remove_hosts(hosts)
        left = stuck + problems + leftovers(hosts.tag) + leftover_processes(cluster.base_dir, cluster.token)
        if left:
            raise AssertionError(f"left behind by the test cluster: {', '.join(left)}")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    """Three namespace hosts (h1..h3, one CPU each) and a Ray head, for the whole session."""
    why = cluster_unavailable()
    if why:
        pytest.skip(why)
    hidden = (tmp_path_factory.getbasetemp(), ROOT / "runs")
    with local_cluster(CLUSTER_HOSTS, hide=hidden) as cluster:
        yield cluster
