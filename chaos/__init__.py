"""chaos: what swarmnet does to a network and how it judges what happened.

Rooms (each a subpackage whose docstring says what it is for and what it may
import; tests/test_layers.py checks those rules from the imports):

* ``chaos.scenario``, ``chaos.schedule`` — the vocabulary every room shares: a
  scenario (TOML) and the concrete fault schedule expanded from it.  Pure data.
* ``chaos/run`` — running scenarios: nemeses, the run loop, the nightly,
  shrinking, the ``swarmnet chaos`` / ``check`` / ``bugs`` commands.
* ``chaos/checkers`` — verdicts from a run's history and ground truth.
* ``chaos/report`` — ``report.html`` from a run directory.
* ``chaos/trace`` — a message's journey rebuilt from a run directory.
* ``chaos/adversary`` — the attacker nemesis.
* ``chaos/fuzz`` — ``swarmnet fuzz``: arbitrary frames against a real network.
* ``chaos/sim`` — the deterministic simulation of all of the above.
"""
