"""pytest-trio fixtures for tests that need a real testnet (a pytest plugin:
``pytest_plugins = ["testnet.fixtures"]``).

    async def test_something(testnet_factory):
        async with testnet_factory(nodes=6, min_swarm=3, links="toxiproxy") as net:
            await net.node_kill("n02")
            ...

or, outside the fixture, ``async with running_testnet(tmp_path, nodes=6) as net``.
Teardown happens in ``async with`` (code after a cancelled ``yield`` may
never run), and afterwards every process the run recorded is checked gone.
"""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from .controller import Options, Testnet, open_testnet
from .links import ToxiproxyMissing, find_toxiproxy
from .procs import proc_state
from .rundir import load_run, recorded_processes

SMALL = dict(nodes=5, users=2, min_swarm=3, links="direct", ready_timeout_s=30.0)


class LeakedProcess(AssertionError):
    """A process recorded by a test's run was still running after teardown."""


def toxiproxy_available() -> bool:
    try:
        find_toxiproxy()
    except ToxiproxyMissing:
        return False
    return True


requires_toxiproxy = pytest.mark.skipif(not toxiproxy_available(), reason="Toxiproxy not installed (make toxiproxy)")


def assert_no_leaks(run_dir: Path) -> None:
    """Raise :class:`LeakedProcess` if any process recorded in ``run_dir``'s run.json still runs."""
    leaked = [f"{name} (pid {pid})" for name, pid, ct in recorded_processes(load_run(run_dir))
              if proc_state(pid, ct) != "dead"]
    if leaked:
        raise LeakedProcess(f"still running after teardown: {', '.join(leaked)}")


@asynccontextmanager
async def running_testnet(tmp_path: Path, **options: Any) -> AsyncIterator[Testnet]:
    """A small network (5 nodes, 2 users, min swarm 3, direct links unless told) in ``tmp_path``."""
    opts = Options(**{**SMALL, **options, "run_dir": Path(tmp_path)})
    if opts.links == "toxiproxy" and not toxiproxy_available():
        pytest.skip("Toxiproxy not installed (make toxiproxy)")
    async with open_testnet(opts) as net:
        yield net
    assert_no_leaks(net.run_dir)


@pytest.fixture
def testnet_factory(tmp_path: Path) -> Callable[..., Any]:
    """``testnet_factory(**options)`` -> an async context manager of a running network;
    several may run side by side, each in its own run directory under ``tmp_path``."""
    counter = itertools.count(1)

    def factory(**options: Any) -> Any:
        return running_testnet(tmp_path / f"net{next(counter)}", **options)

    return factory


@pytest.fixture
async def testnet(tmp_path: Path) -> AsyncIterator[Testnet]:
    """A small running network (see :data:`SMALL`) for one test."""
    async with running_testnet(tmp_path / "net") as net:
        yield net
