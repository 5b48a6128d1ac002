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
