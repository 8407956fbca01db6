"""The deterministic simulation: the same node, registry, client and chaos
code in one process, on trio's virtual clock and an in-memory network, every
random choice drawn from one seed (see README, "Simulation")."""
