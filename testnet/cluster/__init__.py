"""swarmnet on a Ray cluster (README, "Running on a cluster").

* :mod:`.driver` — joining a cluster as a driver (token authentication, a
  clear error for an address that does not answer, a refused token, or a
  host running another swarmnet) and the hosts it offers;
* :mod:`.agent` — the host agent: a run's hands on one host (a Ray actor):
  its zygote and nodes, its Toxiproxy server, signals, exits, its files;
* :mod:`.launch` — the controller's side of the hosts: a link to each agent
  (calls with deadlines, exits, a host lost), remote processes with the
  surface of a local child, and the launcher of a cluster run;
* :mod:`.run` — a cluster run (``open_cluster_testnet``): hosts chosen,
  agents started, the run booted, its files brought home;
* :mod:`.hosts` — test hosts on one machine: network namespaces on a bridge;
* :mod:`.local` — a Ray head and one Ray worker per test host, started and
  stopped by pid, each host in a mount namespace of its own;
* :mod:`.fixtures` — the pytest fixture of a shared three-host cluster;
* :mod:`.cli` — ``swarmnet cluster local`` and ``swarmnet collect``.

Ray is an optional extra (``pip install 'swarmnet[cluster]'``); nothing here
imports it at module level.
"""
