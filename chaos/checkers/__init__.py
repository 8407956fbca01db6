"""Checkers: each reads a run's history and ground truth and returns a verdict
(Jepsen style); none talks to the network except where its name says so.
Verdict shapes: CHECKERS.md.

May import: the foundations (``testnet.base``), the run directory's reader
(``testnet.rundir``) and the nodes' capture format; no other room of chaos
(no runner, no nemesis, no report) and never the controller.
"""

from .authority import check_authority
from .delivery import check_delivery
from .replication import check_replication, current_swarms_from_registry, load_ground_truth
from .unlinkability import check_unlinkability, scan_for_plaintext
from .verdict import exit_code, run_checks, summary

__all__ = ["check_authority", "check_delivery", "check_replication", "check_unlinkability",
           "current_swarms_from_registry", "exit_code", "load_ground_truth", "run_checks", "scan_for_plaintext",
           "summary"]
