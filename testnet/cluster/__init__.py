"""swarmnet on a Ray cluster.

* :mod:`.driver` — joining a cluster as a driver (token authentication, a
  clear error for an address that does not answer, a refused token, or a
  host running another swarmnet) and the hosts it offers;
* :mod:`.hosts` — test hosts on one machine: network namespaces on a bridge;
* :mod:`.local` — a Ray head and one Ray worker per test host, started and
  stopped by pid, each host in a mount namespace of its own;
* :mod:`.fixtures` — the pytest fixture of a shared three-host cluster.

Ray is an optional extra (``pip install 'swarmnet[cluster]'``); nothing here
imports it at module level.
"""
