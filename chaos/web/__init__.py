"""``swarmnet serve``: a web page to watch a live network, act on it, and
browse every run and night of a runs directory; ``/metrics`` for Prometheus.

What this room may do, and through what:

* **read run directories** — ``run.json`` (through :func:`testnet.rundir.load_run`),
  ``verdict.json``, ``chaos.json``, ``faults.jsonl``, ``history.jsonl``,
  ``adversary.jsonl``, ``report.html``, ``nightly.json``.  Reading never
  writes: the page shows a report or a journey only if the run has one or
  the tracer can build it from the directory as it is.
* **watch a live network** only along the read paths ``swarmnet status``
  uses: the run record, each process's state by pid and start time
  (:mod:`testnet.procs`, psutil), and every node's and the registry's
  ``info`` (:func:`testnet.base.rpc.call_once`).
* **act on a live network** only through its controller's authenticated
  control API (:func:`testnet.rundir.control_call`, the run's control
  token), which records every fault it starts in ``faults.jsonl``
  (:mod:`testnet.control_faults`).  It never starts a network, never signals
  a process and never talks to Toxiproxy itself.

Imports: :mod:`testnet` (rundir, procs, base.rpc, base.bugs), the web stack
(Starlette, Hypercorn's trio worker, sse-starlette, prometheus-client), and
from the rest of :mod:`chaos` only through :mod:`chaos.web.harness`, its one
adapter.  Nothing outside this package imports it but the CLI's command
table (``serve`` -> :mod:`chaos.web.cli`).

Modules: :mod:`.runs` (the runs and nights of a runs directory),
:mod:`.live` (one live network, watched), :mod:`.metrics` (Prometheus),
:mod:`.app` (the HTTP surface, its checks), :mod:`.cli` (the command);
the page itself is ``static/`` (plain HTML, CSS and JavaScript).
"""
