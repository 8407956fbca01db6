"""``python -m nodes --config FILE``: run one service node until SIGTERM,
``admin_stop`` or the death of its parent."""

from __future__ import annotations

import argparse
import os
import sys

import trio

from testnet.base.logs import announce_listening, die_with_parent, exit_on_signals, setup_logging, watch_parent

from .core import ConfigError, NodeConfig

PARENT_POLL_S = 2.0


async def amain(config: NodeConfig) -> None:
    from .onion import install_onion
    from .server import Node

    node = Node(config)
    install_onion(node)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_on_signals, nursery.cancel_scope)
        # The parent-death signal (die_with_parent) stops us at once; this is the fallback
        # (a wait on a pidfd; a slow poll where the kernel has none, so an idle node wakes rarely).
        nursery.start_soon(watch_parent, config.parent_pid, nursery.cancel_scope, PARENT_POLL_S)

        async def run_then_exit(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            # node.run returns only when the node stops itself (admin_stop).
            await node.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        addresses = await nursery.start(run_then_exit)
        announce_listening(addresses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes", description="Run one swarmnet service node.")
    parser.add_argument("--config", required=True, help="path of the node's JSON configuration")
    args = parser.parse_args(argv)
    try:
        config = NodeConfig.load(args.config)
    except ConfigError as exc:
        print(f"swarmnet node: {exc}", file=sys.stderr)
        return 2
    if config.parent_pid:
        die_with_parent()
    setup_logging(config.log, config.name)
    # A directory: SIGUSR1 starts a CPU profile of this node, SIGUSR2 writes it there
    # (testnet.base.cpuprofile; `swarmnet bench throughput --profile DIR` drives it).
    profile = os.environ.get("SWARMNET_NODE_PROFILE")
    if profile:
        from testnet.base import meter
        from testnet.base.cpuprofile import arm_on_signals

        arm_on_signals(os.path.join(profile, f"{config.name}.collapsed"), tag=meter.ROLE.get,
                       on_start=meter.install, on_stop=meter.uninstall)
    try:
        trio.run(amain, config)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
