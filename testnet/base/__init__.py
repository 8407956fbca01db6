"""The foundations every swarmnet process uses, and the seams.

Wire protocol and rpc, identities and crypto, swarm maths, the service-node
list's records, and the seams through which node, registry and client code
get the network (:mod:`.net`), time (:mod:`.clock`) and randomness
(``randbytes`` in :mod:`.crypto`).  Nothing here imports the controller
(the rest of :mod:`testnet`), nodes, clients or chaos; protocol, crypto,
swarm, records and clock do not import trio either (tests/test_layers.py).
"""
