"""Chaos runs on a Ray cluster: ``swarmnet chaos run SCENARIO --cluster HOST:PORT``.

The same run as on one machine (:func:`chaos.run.runner.run_chaos`: schedule,
nemeses, workload, checkers, report), in a world whose nodes run on the
cluster's hosts (:mod:`testnet.cluster.run`).  Before the checkers read the
run directory, every host's databases, captures and logs are brought home.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .runner import Progress, RealProcesses


class ClusterProcesses(RealProcesses):
    """Real processes on the cluster at ``address`` (its head), on ``hosts`` of its hosts (all if None)."""

    def __init__(self, address: str, hosts: int | None = None) -> None:
        self.address = address
        self.hosts = hosts

    def open(self, opts: Any, progress: Progress) -> Any:
        from testnet.cluster.run import open_cluster_testnet

        return open_cluster_testnet(dataclasses.replace(opts, cluster=self.address, hosts=self.hosts),
                                    progress=progress)

    async def before_checks(self, net: Any) -> None:
        """Every host's files of the run, home for the checkers."""
        from testnet.cluster.run import collect

        got = await collect(net)
        net.progress(f"collected {sum(got.values()):,} bytes from {len(got)} hosts")
