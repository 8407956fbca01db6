"""The record of a live run in its directory: the secrets a boot writes first,
then ``run.json`` (rewritten on every node event) and ``links.json`` (the link
table, rewritten only when it changed).  Schemas in RUNDIR.md; what goes into
them is :func:`testnet.rundir.build_record` and :func:`~testnet.rundir.build_links`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from . import rundir

if TYPE_CHECKING:
    from .controller import Testnet


class Recorder:
    """Writes the run directory of ``net``."""

    def __init__(self, net: Testnet) -> None:
        self.net = net
        self._links_saved: Any = None  # what links.json was last written for (see save)

    def write_secrets(self) -> None:
        """Tokens and seeds (mode 0600), and the keys the registry lets register."""
        net = self.net
        rundir.write_secret(net.run_dir / rundir.ADMIN_TOKEN_FILE, net.plan.admin_token + "\n")
        rundir.write_secret(net.run_dir / rundir.CONTROL_TOKEN_FILE, net.plan.control_token + "\n")
        for u in net.plan.users:
            rundir.write_secret(u.seed_file, u.seed.hex() + "\n")
        for rt in net.nodes.values():
            rundir.write_secret(rt.plan.seed_file, rt.plan.seed.hex() + "\n")
        (net.run_dir / "registry").mkdir(exist_ok=True)
        # The registry lets only these keys register (new nodes are staked as they are added).
        rundir.write_secret(net.run_dir / "registry" / "stakes.json",
                            json.dumps([rt.plan.ed25519_public for rt in net.nodes.values()]))

    def record(self) -> dict[str, Any]:
        """run.json as it stands (schema in RUNDIR.md)."""
        return rundir.build_record(self.net)

    def save(self) -> None:
        """Write run.json, and links.json first if the link table changed since it was written
        (a 500-node network has 251,000 links: run.json alone is rewritten on every node event)."""
        net = self.net
        if net.plan.link_count:
            # links.json is the table's rule, which changes only with the nodes and users (the
            # rows' upstreams are read from run.json: testnet.rundir.RunLinks).
            key = (tuple(u.name for u in net.plan.users), tuple(n.name for n in net.plan.nodes))
            if key != self._links_saved:
                rundir.write_links(net.run_dir / rundir.LINKS_JSON, rundir.build_links(net))
                self._links_saved = key
        rundir.write_json_atomic(net.run_dir / rundir.RUN_JSON, self.record())
