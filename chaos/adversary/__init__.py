"""The adversary: a nemesis that uses the network as an attacker would.
``attacks`` is the fault (one loop per attack); ``attacker`` what every attack
acts through (knowledge, connections, the record); one module per attack
family (``stranger``, ``signatures``, ``abuse`` — stores, frames, floods —,
``liar``); what it knows and records without the network (``model``), and
raw-socket tools (``raw``).

It registers its fault kind with ``chaos.run.nemesis`` when imported.  May
import: the vocabulary, ``chaos.run.nemesis`` (the registry and its errors),
the authority checker's record format, the foundations, the node's auth
helpers and the registry's request builders.  Never imports the runner, the
report, the trace or the simulation.
"""
