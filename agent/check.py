"""`warden-agent check`: everything that would stop the agent from governing this host."""
from __future__ import annotations

import os
import shutil
import socket

from agent import cgroups, hostfacts
from agent import config as config_mod


def run_checks(config_path: str) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []

    cfg = None
    try:
        cfg = config_mod.load(config_path)
        notes.append(f"config {config_path} is valid ({len(cfg.targets)} target(s), {len(cfg.identities)} identity rule(s))")
    except config_mod.ConfigError as exc:
        problems.extend(exc.problems)

    try:
        mount = cgroups.cgroup2_mount()
        notes.append(f"cgroup2 mounted at {mount}")
        if cfg is not None:
            for cg in cfg.scope_cgroups:
                path = cgroups.abs_path(cg, mount)
                if not os.path.isdir(path):
                    problems.append(f"scope cgroup {cg} does not exist ({path})")
    except cgroups.CgroupError as exc:
        problems.append(str(exc))

    if os.geteuid() != 0:
        problems.append("not running as root: loading and attaching BPF programs needs CAP_BPF, CAP_NET_ADMIN "
                        "and CAP_SYS_ADMIN (run as root or under the packaged systemd unit)")
    else:
        notes.append("running with root privileges")

    try:
        from agent.bccfind import import_bcc
        bcc = import_bcc()
        notes.append(f"BCC importable from {os.path.dirname(bcc.__file__)}")
    except Exception as exc:
        problems.append(str(exc))

    release = os.uname().release
    build = f"/lib/modules/{release}/build"
    if os.path.exists(os.path.join(build, "Makefile")) or os.path.exists("/sys/kernel/kheaders.tar.xz"):
        notes.append(f"kernel headers available for {release}")
    else:
        problems.append(f"no kernel headers at {build}: install linux-headers-{release} (or the distribution's "
                        f"nearest headers and link them there; `make setup` does this)")

    if shutil.which("bpftool") or os.path.exists("/usr/sbin/bpftool"):
        notes.append("bpftool present (used to remove stale attachments)")
    else:
        problems.append("bpftool is missing: install it (apt-get install bpftool / dnf install bpftool)")

    if cfg is not None and os.geteuid() == 0:
        problems.extend(programs_left_attached(cfg))

    if cfg is not None:
        from enforcer.postgres.broker import PostgresBroker
        for target in cfg.targets:
            if target.protocol == "postgres" and target.credentials:
                broker = PostgresBroker.from_credentials(target.credentials, target.name)
                if broker is not None:
                    found = broker.check()
                    problems.extend(found)
                    if not found:
                        notes.append(f"target {target.name}: brokered secret and token keys readable")
            elif target.protocol == "http" and target.credentials:
                from enforcer.http.credentials import CredentialError, credential_for
                try:
                    credential_for({"credentials": target.credentials}).value()
                    notes.append(f"target {target.name}: brokered credential file readable")
                except CredentialError as exc:
                    problems.append(f"target {target.name}: {exc}")

    if cfg is not None and cfg.masking_engine is not None:
        notes.extend(uncataloged_masking_rules(cfg))
    if cfg is not None:
        from agent.catalogs import check_catalogs
        found, read = check_catalogs(cfg)
        problems.extend(found)
        notes.extend(read)

    if cfg is not None and cfg.collector.url:
        problems.extend(hostfacts.collector_capture(cfg))
        _host, port, ips = hostfacts.collector_endpoint(cfg.collector.url)
        try:
            if not ips:
                raise OSError("its host name does not resolve")
            with socket.create_connection((ips[0], port), timeout=3):
                notes.append(f"collector {cfg.collector.url} reachable")
        except OSError as exc:
            problems.append(f"collector {cfg.collector.url} is not reachable: {exc}; check collector.url, "
                            f"DNS and any firewall between this host and the collector")
    return problems, notes


def programs_left_attached(cfg) -> list[str]:
    """Warden programs on the scope's cgroups that no running process holds: a stopped agent
    left them (on_stop: hold, a handover, a crash) and governed connects are refused."""
    from agent.bpfmgr import BpfUnavailable, attached_programs, held_prog_ids, ours
    try:
        mount = cgroups.cgroup2_mount()
        held = held_prog_ids()
        left = {}
        for cg in cfg.scope_cgroups:
            path = cgroups.abs_path(cg, mount)
            if os.path.isdir(path):
                count = sum(1 for prog in ours(attached_programs(path)) if prog["id"] not in held)
                if count:
                    left[cg] = count
    except (cgroups.CgroupError, BpfUnavailable, OSError, ValueError):
        return []            # reported above (no cgroup2, no bpftool)
    return [f"scope cgroup {cg}: {n} Warden program attachment(s) left by a stopped agent; its governed "
            f"connects are refused until the agent runs (`warden-agent release` detaches them instead)"
            for cg, n in left.items()]


def uncataloged_masking_rules(cfg) -> list[str]:
    """schema.table.column rules on a Postgres target without catalog_dsn: they are then matched by
    the table names the statements use, which misses a view or a function over the table and
    over-masks a same-named table in another schema. Worth a note, not a failure."""
    notes = []
    rules = [r for r in cfg.masking_engine.rules if r.qualified is not None]
    for target in cfg.targets:
        if target.protocol != "postgres" or target.options.get("catalog_dsn"):
            continue
        for rule in rules:
            if not rule.targets or any(p.match(target.name) for p in rule.targets):
                notes.append(f"masking rule {rule.name!r} names schema.table.column but target {target.name} "
                             f"has no catalog_dsn: it is matched by the table names statements use (a view "
                             f"or function over the table is not followed; a same-named table in another "
                             f"schema is masked too); set catalog_dsn (a read-only DSN) to match by table OID")
    return notes
