"""The run report: ``report.html`` drawn from a run directory alone (``page``:
the layout): what it shows, read from the run's records (``model``), its charts
(``charts``), the faults' timing (``timing``) and every message a checker
flagged shown with its journey (``flagged``).

May import: the vocabulary, the checkers' pure parts and ``chaos.trace``; it
reads files and never starts or talks to a network (no trio, no controller,
no runner).
"""
