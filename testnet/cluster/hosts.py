"""Test hosts on one machine: Linux network namespaces on a bridge.

Each host is a network namespace with one veth pair: one end (``eth0``) in
the namespace with one address from a private /24, the other end on a
bridge in the root namespace, which holds the /24's first address (where
the controller and the Ray head listen).  The namespaces have no default
route: a host reaches the other hosts and the bridge address, nothing else.

The /24 is chosen among ``10.213.47.0/24`` and the ones after it: the first
that no address or route of the root namespace touches, under a lock so
that two sets of hosts made at once on this machine never share one.

Removal deletes each veth explicitly before its namespace: a namespace
deleted while its veth is busy leaves the root-side end up for minutes.
Every name carries the set's tag (``sn<tag>...``), so :func:`leftovers`
finds anything a set left behind.  Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

FIRST_SUBNET = ipaddress.ip_network("10.213.47.0/24")
LAST_SUBNET = ipaddress.ip_network("10.213.254.0/24")
HOST_OFFSET = 10  # host i has address .(10 + i); .1 is the bridge's
LOCK_PATH = Path("/tmp/swarmnet-hosts.lock")
IP_TIMEOUT_S = 10.0
PREFIX = "sn"  # every interface and namespace name starts with it (15 characters at most)


class HostsError(Exception):
    """Test hosts could not be made (no root, no ``ip``, no free /24)."""


@dataclass(frozen=True)
class Host:
    """One test host: a network namespace and its address."""

    name: str  # h1, h2, ...
    netns: str
    address: str
    veth: str  # the root-side end, on the bridge


@dataclass
class NamespaceHosts:
    """A set of test hosts on one bridge; :func:`remove_hosts` undoes it."""

    tag: str
    bridge: str
    subnet: str  # "10.213.47.0/24"
    gateway: str  # the bridge's address: the controller's side
    hosts: list[Host] = field(default_factory=list)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)
    except subprocess.CalledProcessError as exc:
        raise HostsError(f"ip {' '.join(args)}: {exc.stderr.strip() or exc.returncode}") from None


def require_ip() -> None:
    """Raise :class:`HostsError` unless this process can make namespaces."""
    if shutil.which("ip") is None:
        raise HostsError("`ip` (iproute2) is not installed: apt-get install -y iproute2")
    if os.geteuid() != 0:
        raise HostsError("test hosts need root (network namespaces, a bridge, veth pairs)")


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network an address or route of the root namespace is on."""
    out = []
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            out.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show").stdout.splitlines():
        dest = line.split()[0] if line.strip() else ""
        if dest and dest != "default":
            try:
                out.append(ipaddress.ip_network(dest, strict=False))
            except ValueError:
                pass
    return out


def free_subnet(used: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /24 from :data:`FIRST_SUBNET` on that overlaps none of ``used``."""
    net = FIRST_SUBNET
    while net.network_address <= LAST_SUBNET.network_address:
        if not any(net.overlaps(u) for u in used):
            return net
        net = ipaddress.ip_network(f"{net.network_address + 256}/24")
    raise HostsError(f"no free /24 between {FIRST_SUBNET} and {LAST_SUBNET}")


def new_tag() -> str:
    return os.urandom(3).hex()


def create_hosts(n: int, *, tag: str | None = None) -> NamespaceHosts:
    """Make ``n`` hosts (h1..hn) on a new bridge; on any failure, remove what was made."""
    require_ip()
    if not 1 <= n <= 200:
        raise HostsError(f"{n} hosts: give 1..200")
    tag = tag or new_tag()
    bridge = f"{PREFIX}{tag}br"
    LOCK_PATH.touch(exist_ok=True)
    with open(LOCK_PATH) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        net = free_subnet(_used_networks())
        gateway = str(net.network_address + 1)
        made = NamespaceHosts(tag=tag, bridge=bridge, subnet=str(net), gateway=gateway)
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{gateway}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
        except HostsError:
            remove_hosts(made)
            raise
    try:
        for i in range(1, n + 1):
            host = Host(name=f"h{i}", netns=f"{PREFIX}{tag}h{i}", address=str(net.network_address + HOST_OFFSET + i),
                        veth=f"{PREFIX}{tag}v{i}")
            _ip("netns", "add", host.netns)
            made.hosts.append(host)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", host.veth, "master", bridge, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
    except BaseException:
        remove_hosts(made)
        raise
    return made


def remove_hosts(hosts: NamespaceHosts) -> list[str]:
    """Delete every veth, namespace and the bridge of ``hosts`` (stop their processes
    first); what could not be deleted, as messages (empty when all went)."""
    problems = []
    for h in hosts.hosts:
        for args in (("link", "del", h.veth), ("netns", "del", h.netns)):
            r = _ip(*args, check=False)
            if r.returncode != 0 and "Cannot find" not in r.stderr and "No such" not in r.stderr:
                problems.append(f"ip {' '.join(args)}: {r.stderr.strip()}")
    r = _ip("link", "del", hosts.bridge, check=False)
    if r.returncode != 0 and "Cannot find" not in r.stderr:
        problems.append(f"ip link del {hosts.bridge}: {r.stderr.strip()}")
    return problems


def leftovers(tag: str) -> list[str]:
    """Interfaces and namespaces of the set ``tag`` that still exist."""
    mark = f"{PREFIX}{tag}"
    found = [ln.split()[0] for ln in _ip("netns", "list").stdout.splitlines() if ln.startswith(mark)]
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(mark):
            found.append(name)
    return found


def netns_argv(host: Host, argv: list[str]) -> list[str]:
    """``argv`` run inside ``host``'s network namespace (``ip netns exec`` execs it: same pid)."""
    return ["ip", "netns", "exec", host.netns, *argv]
