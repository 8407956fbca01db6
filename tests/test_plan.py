"""The planner, without processes: names, addresses, seeds, links, paths."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from testnet import plan as P
from testnet.base.crypto import Identity


def make(nodes=5, users=3, links="toxiproxy", seed=7, block=(12, 40), **kw):
    return P.plan_network(nodes=nodes, users=users, min_swarm=kw.pop("min_swarm", 3), seed=seed, links=links,
                          run_dir=Path("/r"), run_id="run-1", block=block, **kw)


def test_names_and_order():
    p = make(nodes=12, users=6)
    assert [n.name for n in p.nodes] == [f"n{i:02d}" for i in range(1, 13)]
    assert [u.name for u in p.users] == ["alice", "bob", "carol", "dave", "user05", "user06"]
    assert P.node_index("n07") == 7 and P.node_name(123) == "n123"
    with pytest.raises(P.PlanError):
        P.node_index("alice")


def test_every_host_is_distinct_loopback_inside_the_block():
    p = make(nodes=40, users=10)
    hosts = [n.host for n in p.nodes] + [u.host for u in p.users] + [p.controller[0], p.registry_host,
                                                                     p.toxiproxy[0]]
    assert len(set(hosts)) == len(hosts)
    block = ipaddress.ip_network("127.12.40.0/21")
    for h in hosts:
        assert ipaddress.ip_address(h) in block
    assert p.node("n03").host == "127.12.41.3" and p.user("bob").host == "127.12.42.2"


def test_links_one_proxy_per_directed_link_with_unique_listen_addresses():
    p = make(nodes=6, users=3)
    node_links = [link for link in p.links if not link.from_user]
    user_links = [link for link in p.links if link.from_user]
    assert len(node_links) == 6 * 5 and len(user_links) == 3 * 6
    assert len({link.listen for link in p.links}) == len(p.links)
    assert len({link.name for link in p.links}) == len(p.links)
    assert p.link("n03", "n05").name == "n03->n05" and p.link("alice", "n02").name == "alice->n02"
    with pytest.raises(P.PlanError):
        p.link("n03", "n03")
    # What n03 dials for n05 is the n03->n05 proxy, keyed by n05's key.
    assert p.dial_table("n03")[p.node("n05").ed25519_public] == p.link("n03", "n05").listen
    assert p.node("n03").ed25519_public not in p.dial_table("n03")
    assert len(p.dial_table("carol")) == 6


def test_thirty_node_default_counts():
    p = make(nodes=30, users=3, min_swarm=5)
    assert sum(not link.from_user for link in p.links) == 870
    assert sum(link.from_user for link in p.links) == 90


def test_direct_mode_has_no_links_and_no_toxiproxy():
    p = make(links="direct")
    assert len(p.links) == 0 and not p.link_names and list(p.links) == [] and p.toxiproxy is None
    assert p.dial_table("n01") == {} and p.link_named("n01->n02") is None and p.links_touching(["n01"]) == []


def test_seeds_are_deterministic_per_run_seed_and_distinct():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    assert [n.seed for n in a.nodes] == [n.seed for n in b.nodes]
    assert a.nodes[0].seed != c.nodes[0].seed
    seeds = [n.seed for n in a.nodes] + [u.seed for u in a.users]
    assert len(set(seeds)) == len(seeds) and all(len(s) == 32 for s in seeds)
    assert a.user("alice").identity == Identity.from_seed(a.user("alice").seed)
    assert a.nodes[0].seed.hex() not in repr(a.nodes[0]) and "seed=" not in repr(a.users[0])
    assert a.admin_token == b.admin_token != c.admin_token


def test_paths_live_under_the_run_dir():
    n = make().node("n02")
    assert n.dir == Path("/r/nodes/n02") and n.db.parent == n.dir and n.log.parent == n.dir
    assert n.seed_file == Path("/r/nodes/n02/seed") and make().user("alice").seed_file == Path("/r/users/alice/seed")


@pytest.mark.parametrize("kw", [dict(nodes=0), dict(users=-1), dict(min_swarm=9, nodes=5), dict(links="carrier-pigeon"),
                                dict(block=(0, 8)), dict(block=(3, 12)), dict(nodes=509)])
def test_bad_options_are_refused(kw):
    with pytest.raises(P.PlanError):
        make(**kw)


def test_node_added_and_removed():
    p = make(nodes=4, users=2)
    p2, n5 = P.with_node_added(p)
    assert n5.name == "n05" and [n.name for n in p2.nodes][-1] == "n05"
    new = set(p2.links) - set(p.links)
    assert len(new) == 2 * 4 + 2  # to and from each old node, and from each user
    assert all("n05" in (link.src, link.dst) for link in new)
    assert p2.dial_table("n01")[n5.ed25519_public] == p2.link("n01", "n05").listen
    with pytest.raises(P.PlanError):
        P.with_node_added(p2, "n05")
    p3 = P.with_node_removed(p2, "n02")
    assert "n02" not in {n.name for n in p3.nodes}
    assert all("n02" not in (link.src, link.dst) for link in p3.links)
    p4, n2 = P.with_node_added(p3, "n02")
    assert n2.seed == p.node("n02").seed  # a name always means the same key in one run


def listed(p):
    """The links as the planner once listed them, in its order: each node to every other, then
    each user to every node (the reference the derived links are checked against)."""
    out = []
    for s in p.nodes:
        source = P.proxy_source_host(p.block, P.source_slot(s.index, len(p.hosts)))
        out += [P.LinkPlan(f"{s.name}->{d.name}", s.name, d.name, (source, P.PROXY_PORT_BASE + d.index), False)
                for d in p.nodes if d is not s]
    for u in p.users:
        out += [P.LinkPlan(f"{u.name}->{d.name}", u.name, d.name, (f"127.12.44.{u.index}", P.PROXY_PORT_BASE + d.index),
                           True) for d in p.nodes]
    return out


HOSTS3 = (P.HostPlan("h1", "10.213.47.11"), P.HostPlan("h2", "10.213.47.12"), P.HostPlan("h3", "10.213.47.13"))


@pytest.mark.parametrize("hosts", [(), HOSTS3])
def test_links_are_derived_from_their_ends_as_they_were_listed(hosts):
    p = make(nodes=9, users=3, hosts=hosts)
    p, _ = P.with_node_added(P.with_node_removed(p, "n04"), "n12")  # a gap and a late node
    ref = listed(p)
    assert list(p.links) == ref and list(p.link_names) == [l.name for l in ref]
    assert len(p.links) == len(p.link_names) == p.link_count == len(ref) == 9 * 8 + 3 * 9
    for l in ref:
        assert p.link(l.src, l.dst) == l and p.link_named(l.name) == l and l.name in p.link_names and l in p.links
    for name in ("n04->n01", "n01->n04", "n01->n01", "alice->bob", "n02->alice", "n02-n03", "zed->n01", "n1->n02"):
        assert name not in p.link_names and p.link_named(name) is None
        with pytest.raises(P.PlanError):
            p.link(*name.split("->", 1)) if "->" in name else p.link(name, "n01")
    assert 42 not in p.link_names and "n01->n02" not in make(links="direct").link_names
    # What the faults ask, each in the plan's order of links: never by listing every link.
    picks = {"n03", "n12", "alice"}
    assert p.links_touching(picks) == [l for l in ref if l.src in picks or l.dst in picks]
    assert p.links_touching(picks, users=False) == [l for l in ref if (l.src in picks or l.dst in picks)
                                                    and not l.from_user]
    a, b = ["n01", "n12", "n07"], ["n02", "n07", "n09"]
    assert p.links_between(a, b) == [l for l in ref if not l.from_user and
                                     (l.src in a and l.dst in b or l.src in b and l.dst in a)]
    assert p.links_between(a, b, both=False) == [l for l in ref if not l.from_user and l.src in a and l.dst in b]
    assert p.links_from("bob") == [l for l in ref if l.src == "bob"] and p.links_from("n04") == []
    assert p.proxy_hosts() == {l.listen[0] for l in ref}


def test_link_names_is_a_set_the_proxy_table_can_use_without_listing_it():
    p = make(nodes=300, users=3)
    names = p.link_names
    assert len(names) == 300 * 299 + 3 * 300 and names is p.link_names
    made = {"n01->n02", "alice->n300", "n02->n02", "gone->n01"}
    # ProxyTable: `made & fault.names` (a plain set on the left) and `name in fault.names`.
    both = made & names
    assert both == {"n01->n02", "alice->n300"} and isinstance(both, frozenset)
    assert names & made == both and made - names == {"n02->n02", "gone->n01"}
    assert not names.isdisjoint(made) and {"n01->n02"} <= names
    assert names == frozenset(listed_names(p)) and names == make(nodes=300, users=3).link_names


def listed_names(p):
    return [l.name for l in listed(p)]


def test_the_run_directory_keeps_the_links_rule_and_reads_back_every_row(tmp_path):
    import json

    from testnet import rundir

    p, _ = P.with_node_added(P.with_node_removed(make(nodes=6, users=2, hosts=HOSTS3), "n02"))
    # As run.json has them: each node's address (n05 has not listened yet), users' ingress ports.
    nodes = [{"name": n.name, "host": n.host, "port": 0 if n.name == "n05" else 40000 + n.index,
              "dial_host": n.host, "dial_port": 40000 + n.index, "ed25519_public": n.ed25519_public} for n in p.nodes]
    ingress = {n.name: {"alice": 41000 + n.index} for n in p.nodes if n.name != "n05"}
    run = {"run_id": "r", "nodes": nodes, "ingress": ingress, "links_file": "links.json"}
    rundir.write_links(tmp_path / "links.json", {"sources": p.proxy_sources(), "destinations": p.proxy_ports()})
    assert len((tmp_path / "links.json").read_bytes()) < 1000  # the rule, not the rows
    links = rundir.read_links(tmp_path, run)

    def upstream(l):
        node = next(n for n in nodes if n["name"] == l.dst)
        port = node["port"] if not l.from_user else ingress.get(l.dst, {}).get(l.src)
        return [node["host"], port] if node["port"] and port else None

    rows = [{"name": l.name, "src": l.src, "dst": l.dst, "listen": list(l.listen), "upstream": upstream(l)}
            for l in listed(p)]
    assert list(links) == rows and len(links) == len(rows) == 6 * 5 + 2 * 6 and rows[3] in links
    assert sum(r["upstream"] is None for r in rows) == 5 + 2 + 5  # to n05, and bob's (no ingress)
    assert links.row("n04", "n07") == next(r for r in rows if r["name"] == "n04->n07")
    assert links.row("n02", "n01") is None and links.row("n01", "n01") is None
    assert links.from_source("alice") == [r for r in rows if r["src"] == "alice"]
    assert rundir.proxy_of({**run, "links": links}, "bob", "n03") == next(r for r in rows if r["name"] == "bob->n03")
    # A user dials each node through its proxies: the plan's dial table.
    assert rundir.dial_table({**run, "links": links}, "alice") == p.dial_table("alice")
    # A run directory from before the rule (its rows listed) reads as it did.
    (tmp_path / "links.json").write_text(json.dumps(rows))
    assert rundir.read_links(tmp_path, run) == rows


def test_node_config_follows_the_contract():
    p = make(nodes=3)
    n = p.node("n02")
    cfg = P.node_config(p, n, registry=("127.12.40.2", 4444), parent_pid=99)
    assert cfg["listen"] == [["127.12.41.2", 0]] and cfg["registry"] == ["127.12.40.2", 4444]
    assert cfg["seed_file"] == "/r/nodes/n02/seed" and cfg["parent_pid"] == 99
    assert cfg["links"][p.node("n03").ed25519_public] == list(p.link("n02", "n03").listen)
    assert P.node_config(p, n, registry=("h", 1), parent_pid=None, port=5555)["listen"] == [["127.12.41.2", 5555]]


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_candidate_blocks_are_valid_and_deterministic(run_id):
    blocks = list(P.candidate_blocks(run_id, count=8))
    assert blocks == list(P.candidate_blocks(run_id, count=8))
    for a, b in blocks:
        assert 1 <= a <= 255 and 0 <= b <= 248 and b % 8 == 0
        ipaddress.ip_network(f"127.{a}.{b}.0/21")  # strict: raises if b is not /21-aligned


def test_past_254_nodes_every_node_and_every_proxy_source_has_an_address_of_its_own():
    p = make(nodes=508, users=3)
    hosts = [n.host for n in p.nodes]
    assert len(set(hosts)) == 508 and hosts[253].endswith(".254") and hosts[254] != hosts[0]
    sources = {link.src: link.listen[0] for link in p.links}
    listens = [link.listen for link in p.links]
    assert len(set(listens)) == len(listens)  # no two proxies on one address and port
    # A node's proxies share one address, the users' theirs; none is a node's or user's address.
    assert len(set(sources.values())) == 508 + 3
    assert not set(sources.values()) & (set(hosts) | {u.host for u in p.users})
    assert all(30000 < link.listen[1] < 32768 for link in p.links)  # below the ephemeral ports


def test_proxies_are_shared_out_among_servers_by_source():
    p = make(nodes=40, users=3, toxiproxy_servers=4)
    apis = p.toxiproxy_apis
    assert len(apis) == 4 and len(set(apis)) == 4 and p.toxiproxy == apis[0]
    by_server = [0] * 4
    for link in p.links:
        by_server[p.server_of(link.name)] += 1
        assert p.server_of(link.name) == p.server_of(f"{link.src}->n01")  # a source's proxies stay together
    assert min(by_server) >= 0.8 * max(by_server)
    assert make(nodes=5, links="direct", toxiproxy_servers=4).toxiproxy_apis == []


def test_a_cluster_plan_places_nodes_round_robin_on_its_hosts():
    hosts = (P.HostPlan("h1", "10.213.47.11"), P.HostPlan("h2", "10.213.47.12"), P.HostPlan("h3", "10.213.47.13"))
    p = make(nodes=7, users=2, hosts=hosts)
    assert [n.place for n in p.nodes] == ["h1", "h2", "h3", "h1", "h2", "h3", "h1"]
    assert p.node("n05").host == "10.213.47.12" and [n.name for n in p.nodes_on("h3")] == ["n03", "n06"]
    # One Toxiproxy server for the users' links (the controller's), one per host for its nodes' outgoing links.
    assert p.toxiproxy_servers == 4 and len(p.toxiproxy_apis) == 4
    assert p.server_of("alice->n03") == 0 and p.server_of("n03->n01") == 3 and p.server_of("n04->n02") == 1
    # A node's outgoing proxies listen on its host's own loopback, at its place among that host's
    # nodes (n04 is h1's second): hosts reuse addresses, no two proxies of one host share one.
    assert p.link("n04", "n02").listen == (P.proxy_source_host(p.block, 2), P.PROXY_PORT_BASE + 2)
    for h in hosts:
        on_host = [link.listen for link in p.links if not link.from_user and p.node(link.src).place == h.name]
        assert len(set(on_host)) == len(on_host)
        assert len({listen[0] for listen in on_host}) == len(p.nodes_on(h.name))
    grown, node = P.with_node_added(p)
    assert node.name == "n08" and node.place == "h2" and node.host == "10.213.47.12"
    assert grown.server_of("n08->n01") == 2
    with pytest.raises(P.PlanError, match="Toxiproxy links"):
        make(nodes=3, links="direct", hosts=hosts)
    with pytest.raises(P.PlanError, match="repeat"):
        make(nodes=3, hosts=hosts[:1] * 2)
    assert make(nodes=3).hosts == () and make(nodes=3).node("n01").place is None


def test_a_cluster_addresses_508_nodes_a_host_up_to_what_a_proxy_port_names():
    # One machine: 508 nodes' proxy sources; a cluster: 508 a host (sources repeat across
    # hosts' loopbacks), at most 2,767 destinations below the ephemeral ports.
    assert P.max_nodes("toxiproxy") == 508 and P.max_nodes("direct") == 1016
    assert P.max_nodes("toxiproxy", 3) == 1524 and P.max_nodes("toxiproxy", 8) == 2767
    P.check_options(nodes=2000, users=3, min_swarm=5, links="toxiproxy", hosts=8)
    P.check_options(nodes=2000, users=3, min_swarm=5, links="toxiproxy", hosts=None)  # hosts not known yet
    with pytest.raises(P.PlanError, match=r"1\.\.1524 with toxiproxy links on 3 hosts"):
        P.check_options(nodes=2000, users=3, min_swarm=5, links="toxiproxy", hosts=3)
    with pytest.raises(P.PlanError, match=r"1\.\.508 with toxiproxy links, not 509"):
        P.check_options(nodes=509, users=3, min_swarm=5, links="toxiproxy")
    assert [P.source_slot(i, 4) for i in (1, 4, 5, 9)] == [1, 1, 2, 3] and P.source_slot(9, 0) == 9
