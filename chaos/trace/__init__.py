"""Tracing one message: its journey rebuilt from a run directory alone — the
run's files (``run``), the nodes' captures replayed with each node's own keys
(``captures``), the journey itself (``journey``), where its trail ends and
why (``trail``), the Trace Event Format (``events``), and the views and the
``swarmnet trace`` command (``view``).

May import: the vocabulary, the checkers' pure parts, the foundations, and the
pure readers of nodes' and clients' formats; it reads files and never starts or
talks to a network (no trio, no controller, no runner, no report).
"""
