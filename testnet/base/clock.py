"""The real clock, in one place.

Node, registry and client code never read the wall clock themselves: they
take a clock from their caller, and these functions are what real runs pass
(the simulation passes virtual time, ``chaos/sim/testnet.py``).
tests/test_sim.py fails if code in those layers reads the clock, the OS's
randomness or opens sockets directly.
"""

from __future__ import annotations

import time


def wall_s() -> float:
    """Seconds since the Unix epoch."""
    return time.time()


def wall_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return int(time.time() * 1000)
