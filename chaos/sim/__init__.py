"""The deterministic simulation: the same node, registry, client and chaos
code in one process, on trio's virtual clock and an in-memory network, every
random choice drawn from one seed (see README, "Simulation").

May import: every room that runs or judges a scenario (``chaos.run``, the
checkers, the report, the adversary) and the controller's parts it replaces
with simulated ones; never the fuzzer.  Worker processes (``jobs``) run the
seeds, or Ray tasks on a cluster (``cluster``); ``cli`` and ``explore`` sit
on top of them.
"""
