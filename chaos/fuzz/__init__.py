"""``swarmnet fuzz``: arbitrary frames for every op against a real network,
each answer judged (a 500 or a dropped connection is a failure).  The draws
and the judge (``model``), frame builders (``frames``), fake peers
(``peer``), and the run with its command (``run``).

May import: the foundations, the node's protocol tables and the controller (it
starts its own network).  Never imports the runner, the report, the trace or
the simulation.
"""
