"""Running scenarios: the nemeses (``nemesis``: each injects one kind of fault
and always heals), playing a schedule on time and recording it (``play``:
faults.jsonl), the run loop and the nightly (``runner``), shrinking a
failing run's fault list (``shrink``), runs on a Ray cluster (``cluster``),
their commands (``cli``) and ``swarmnet bench faults`` (``bench``).

May import: the vocabulary (``chaos.scenario``, ``chaos.schedule``), the
checkers, the report, the controller (``testnet``) and the clients' workload.
Fault kinds that live in other rooms (the adversary) register themselves with
``nemesis.register``; this room never imports them except to load them
(``runner.load_nemeses``).  Never imports the simulation, the fuzzer or the
trace's internals.
"""
