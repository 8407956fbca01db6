"""The adversary: a nemesis that uses the network as an attacker would
(``attacks``: one module of attack loops per family), what it knows and
records without the network (``model``), and raw-socket tools (``raw``).

It registers its fault kind with ``chaos.run.nemesis`` when imported.  May
import: the vocabulary, ``chaos.run.nemesis`` (the registry and its errors),
the authority checker's record format, the foundations, the node's auth
helpers and the registry's request builders.  Never imports the runner, the
report, the trace or the simulation.
"""
