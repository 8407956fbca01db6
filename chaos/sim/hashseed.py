"""The fixed string-hash seed a simulated run needs, set before anything else runs.

Set and dict iteration over strings in node code follows ``PYTHONHASHSEED``,
which Python reads only when it starts: a process that is to run a simulation
exactly must start with it, and ``swarmnet sim run`` re-executes itself with it
when it did not.  This module imports nothing heavy, so the CLI can call it
before it imports any command (``testnet.cli.main``): the process that is
replaced then costs an interpreter start, not the simulation's imports.
"""

from __future__ import annotations

import os
import sys

HASH_SEED = "0"
# ``swarmnet sim <subcommand>``s that run a simulation in their own process.
IN_PROCESS = ("run", "replay")


def ensure_hash_seed() -> None:
    """Re-execute this command with a fixed ``PYTHONHASHSEED`` unless it already has it."""
    if os.environ.get("PYTHONHASHSEED") != HASH_SEED:
        os.environ["PYTHONHASHSEED"] = HASH_SEED
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def ensure_for(args: list[str]) -> None:
    """:func:`ensure_hash_seed` if ``args`` (the command line after ``swarmnet``) run a
    simulation in this process."""
    if len(args) >= 2 and args[0] == "sim" and args[1] in IN_PROCESS:
        ensure_hash_seed()
