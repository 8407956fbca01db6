"""Joining a Ray cluster as a driver, and the checks before any work goes out.

Ray is an optional dependency (``pip install 'swarmnet[cluster]'``): this
module imports it only inside :func:`connect`.  A swarmnet cluster runs with
Ray's token authentication, so a driver needs ``RAY_AUTH_MODE=token`` and
the token in ``RAY_AUTH_TOKEN`` before ``ray`` is imported (Ray reads them
once, at import and ``init``).

Before anything runs, :func:`connect` says clearly what is wrong: an
address that does not answer (within seconds, where Ray itself would retry
for a minute), a missing token, a rejected token, and hosts that run
another swarmnet than this one (both versions named).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT_S = 10.0
CHECK_TIMEOUT_S = 60.0
GCS_RETRIES = 5  # attempts, about a second apart, to be let in by the head
PACKAGES = ("testnet", "nodes", "clients", "chaos")
HOST_RESOURCE_PREFIX = "swarmnet_host_"


class ClusterError(Exception):
    """The cluster cannot be used: unreachable, unauthenticated, mixed versions, a host lost."""


@dataclass(frozen=True)
class ClusterHost:
    """A Ray node that can run swarmnet's work (it has CPUs)."""

    name: str  # its swarmnet_host_<name> resource, else its address
    address: str
    node_id: str
    cpus: int


def code_identity() -> dict[str, str]:
    """This install's swarmnet: its version and a digest of its source files (a host with
    the same version number and other code is another swarmnet too)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*")):
            if path.suffix in (".py", ".toml") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        from importlib.metadata import version

        ver = version("swarmnet")
    except Exception:  # running from a source tree without installed metadata
        ver = "unknown"
    return {"version": ver, "code": h.hexdigest()[:16]}


def _probe(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"cluster address {address!r}: give HOST:PORT (the Ray head's GCS address)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"cluster address {address} does not answer: {exc.strerror or exc}") from None


def connect(address: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """Join the cluster at ``address`` (the head's ``HOST:PORT``) as a driver; the ``ray`` module.
    Returns at once if this process already joined it."""
    if os.environ.get("RAY_AUTH_MODE") != "token" or not os.environ.get("RAY_AUTH_TOKEN"):
        raise ClusterError("a swarmnet cluster runs with Ray's token authentication: set RAY_AUTH_MODE=token and "
                           "the cluster's token in RAY_AUTH_TOKEN")
    _probe(address, timeout_s)
    try:
        import ray
    except ImportError:
        raise ClusterError("Ray is not installed: pip install 'swarmnet[cluster]'") from None
    if ray.is_initialized():
        return ray
    from ray.exceptions import AuthenticationError

    # The port answered, so the head is up: a refused token need not be retried for
    # Ray's default 20 s (an operator's own setting is kept).
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(GCS_RETRIES))
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False, configure_logging=True,
                 namespace="swarmnet")
    except AuthenticationError as exc:
        raise ClusterError(f"the cluster at {address} refused this driver's token: {exc.message}") from None
    except (ConnectionError, RuntimeError) as exc:
        cause = f"{exc} {exc.__cause__}"
        if "InvalidAuthToken" in cause or "Unauthenticated" in cause:
            raise ClusterError(f"the cluster at {address} refused this driver's token "
                               "(RAY_AUTH_TOKEN is not the cluster's)") from None
        raise ClusterError(f"could not join the cluster at {address}: {exc}") from None
    return ray


def disconnect() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def cluster_hosts(ray: Any) -> list[ClusterHost]:
    """The alive nodes with CPUs, by name."""
    out = []
    for n in ray.nodes():
        res = n.get("Resources") or {}
        if not n.get("Alive") or res.get("CPU", 0) <= 0:
            continue
        names = [k[len(HOST_RESOURCE_PREFIX):] for k in res if k.startswith(HOST_RESOURCE_PREFIX)]
        out.append(ClusterHost(name=names[0] if names else n["NodeManagerAddress"], address=n["NodeManagerAddress"],
                               node_id=n["NodeID"], cpus=int(res.get("CPU", 0))))
    return sorted(out, key=lambda h: h.name)


def on_host(ray: Any, host: ClusterHost, *, soft: bool = False) -> Any:
    """Scheduling options that pin a task or actor to ``host``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=host.node_id, soft=soft)


def check_hosts(ray: Any, *, mine: dict[str, str] | None = None,
                timeout_s: float = CHECK_TIMEOUT_S) -> list[ClusterHost]:
    """Every host with CPUs runs this swarmnet (same version and code), or :class:`ClusterError`
    naming each one that does not, with both versions; the hosts."""
    hosts = cluster_hosts(ray)
    if not hosts:
        raise ClusterError("the cluster has no host with CPUs to run on")
    probe = ray.remote(num_cpus=0, max_retries=0)(code_identity)
    refs = {h.name: probe.options(scheduling_strategy=on_host(ray, h)).remote() for h in hosts}
    deadline = time.monotonic() + timeout_s
    theirs: dict[str, dict[str, str] | str] = {}
    for name, ref in refs.items():
        try:
            theirs[name] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            theirs[name] = f"cannot run swarmnet ({type(exc).__name__}: {str(exc)[:200]})"
    same_swarmnet(theirs, mine)
    return hosts


def same_swarmnet(theirs: dict[str, Any], mine: dict[str, str] | None = None) -> None:
    """Raise :class:`ClusterError` naming every host (name -> its :func:`code_identity`, or why
    it has none) that runs another swarmnet than this one, with both versions."""
    mine = mine or code_identity()
    bad = [f"{name}: {ident}" if isinstance(ident, str) else
           f"{name} runs swarmnet {ident['version']} (code {ident['code']})"
           for name, ident in theirs.items() if ident != mine]
    if bad:
        raise ClusterError(f"this controller runs swarmnet {mine['version']} (code {mine['code']}); "
                           + "; ".join(bad))
