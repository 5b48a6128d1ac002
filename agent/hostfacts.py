"""Host facts over netlink (pyroute2): interfaces, addresses, routes; and test network namespaces."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute


@dataclass(frozen=True)
class Interface:
    index: int
    name: str
    state: str
    addresses: tuple[str, ...]   # "addr/prefix"


def interfaces() -> list[Interface]:
    with IPRoute() as ipr:
        addrs: dict[int, list[str]] = {}
        for msg in ipr.get_addr():
            addrs.setdefault(msg["index"], []).append(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        result = []
        for link in ipr.get_links():
            result.append(Interface(link["index"], link.get_attr("IFLA_IFNAME"),
                                    link.get_attr("IFLA_OPERSTATE") or "", tuple(addrs.get(link["index"], ()))))
        return result


def routes() -> list[dict]:
    with IPRoute() as ipr:
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family, table=254):
                dst = r.get_attr("RTA_DST")
                out.append({"family": 4 if family == socket.AF_INET else 6,
                            "dst": f"{dst}/{r['dst_len']}" if dst else "default",
                            "gateway": r.get_attr("RTA_GATEWAY"), "oif": r.get_attr("RTA_OIF")})
        return out


def describe_host() -> dict:
    """What records say about the host: name and non-loopback addresses."""
    addrs = []
    for iface in interfaces():
        if iface.name == "lo":
            continue
        addrs.extend(iface.addresses)
    return {"hostname": socket.gethostname(), "addresses": addrs}


def route_source_for(ip: str) -> str | None:
    """The source address the kernel would use towards ip (RTM_GETROUTE), None if unroutable."""
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    with IPRoute() as ipr:
        try:
            msgs = ipr.route("get", dst=ip, family=family)
        except Exception:
            return None
        for m in msgs:
            return m.get_attr("RTA_PREFSRC")
    return None


def networks_overlap(target_nets, collector_ips) -> list[str]:
    """Collector addresses a target's CIDRs would capture (redirecting our own shipping)."""
    hits = []
    for ip in collector_ips:
        addr = ipaddress.ip_address(ip)
        for net in target_nets:
            if addr.version == net.version and addr in net:
                hits.append(f"{ip} in {net}")
    return hits


# ---- a second "host" for tests and demos: a network namespace joined by a veth pair ----------
class VethNamespace:
    """A network namespace with one end of a veth pair, addressed like a remote host.

    Everything is created here and removed by `remove()`: tests use it to put a real server
    behind a real route without any address outside what they created themselves.
    """

    def __init__(self, name: str, host_ip: str, ns_ip: str, prefixlen: int = 30):
        from pyroute2 import NetNS, netns
        self.name, self.host_ip, self.ns_ip, self.prefixlen = name, host_ip, ns_ip, prefixlen
        self.host_if, self.ns_if = f"{name[:10]}-h", f"{name[:10]}-n"
        netns.create(name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_if, kind="veth", peer=self.ns_if)
                peer = ipr.link_lookup(ifname=self.ns_if)[0]
                ipr.link("set", index=peer, net_ns_fd=name)
                host = ipr.link_lookup(ifname=self.host_if)[0]
                ipr.addr("add", index=host, address=host_ip, prefixlen=prefixlen)
                ipr.link("set", index=host, state="up")
            with NetNS(name) as ns:
                idx = ns.link_lookup(ifname=self.ns_if)[0]
                ns.addr("add", index=idx, address=ns_ip, prefixlen=prefixlen)
                ns.link("set", index=idx, state="up")
                lo = ns.link_lookup(ifname="lo")[0]
                ns.link("set", index=lo, state="up")
        except Exception:
            self.remove()
            raise

    def exec_argv(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace (iproute2's `ip netns exec`)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def remove(self) -> None:
        from pyroute2 import netns
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=self.host_if):
                ipr.link("del", index=idx)     # deleting one end removes the pair
        if self.name in netns.listnetns():
            netns.remove(self.name)


def collector_endpoint(url: str) -> tuple[str, int, list[str]]:
    """(host, port, resolved addresses) of the collector URL; no addresses when it does not resolve."""
    from urllib.parse import urlparse
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parsed.hostname, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return parsed.hostname or "", port, []
    return parsed.hostname or "", port, sorted({info[4][0] for info in infos})


def collector_capture(config) -> list[str]:
    """Targets that would redirect the agent's own collector traffic through the enforcer."""
    from agent.config import resolve_target_networks
    if not config.collector.url:
        return []
    _host, port, ips = collector_endpoint(config.collector.url)
    problems = []
    for target in config.targets:
        if target.match.port != port:
            continue
        hits = networks_overlap(resolve_target_networks(target), ips)
        if hits:
            problems.append(f"target {target.name!r} would capture the collector's own traffic "
                            f"({', '.join(hits)}, port {port}); narrow its match")
    return problems
