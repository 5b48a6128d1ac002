"""`warden-agent run`: BPF attached to the scope, one enforcer listener per target, events out."""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import time
import uuid
from typing import Optional

from agent import cgroups, hostfacts, procinfo, sdnotify
from agent.bpfmgr import BpfManager, Capture, TargetRule
from agent.catalogs import load_catalog
from agent.config import AgentConfig, TargetConfig, resolve_target_networks
from agent.events import JsonLinesSink, fanout
from agent.identity import IdentityResolver
from agent.inventory import Inventory
from enforcer.context import Attribution, ConnectionContext, TargetInfo, UpstreamTLS
from records.schema import EVENT_FIELDS, SchemaError, new_session_id
from records.writer import RecordBacklogFull

log = logging.getLogger("warden.agent")

HOSTNAME_REFRESH_S = 30.0
VERSION = "0.1.0"
# spool.on_full: block: how long a new session waits for the spool to take records again
# before it is refused like with refuse
SPOOL_BLOCK_WAIT_S = 10.0
# `run` exits with this after a handover (SIGUSR2); the unit has systemd start it again
EXIT_HANDOVER = 75
# asks for a handover: sent by `warden-agent restart`, and by systemd at `systemctl restart`
# (the unit's RestartKillSignal)
HANDOVER_SIGNAL = signal.SIGUSR2
HANDOVER_FILE = "handover.json"
# how long connects an earlier run redirected (waiting in a handed-back listener) stay attributable
EARLIER_RUN_MAPS_KEPT_S = 60.0


def load_or_create_agent_id(state_dir: str, configured: Optional[str]) -> str:
    if configured:
        return str(configured)
    path = os.path.join(state_dir, "agent_id")
    try:
        with open(path) as f:
            value = f.read().strip()
            if value:
                return value
    except FileNotFoundError:
        pass
    value = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return value


def _boot_id() -> Optional[str]:
    """The kernel's id of this boot: agent.start records on either side of a reboot differ in it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def ring_drops_alert(dropped: int, during: str) -> dict:
    """agent.alert for connection events the BPF programs could not report, their ring being
    full: `during` agent_down (no agent read it: a crash, a stop with the programs held, a long
    handover) or agent_behind (this run did not read it fast enough)."""
    if during == "agent_down":
        when = "while no agent ran"
        remedy = ("keep the agent's downtime short: restart it with `warden-agent restart` or "
                  "`systemctl restart` (a handover), and find why it crashed or stayed stopped")
    else:
        when = "because the agent fell behind reading it"
        remedy = "give the agent more CPU (check its unit's CPU limits and the host's load)"
    return {"kind": "bpf_events_dropped", "severity": "error",
            "message": f"{dropped} connection events (connect attempts and their outcomes) were not "
                       f"reported: the BPF programs' ring buffer was full {when}; the connection "
                       f"inventory and the agent.bypass records miss them. To avoid it: {remedy}",
            "detail": {"dropped": dropped, "during": during}}


class Agent:
    def __init__(self, config: AgentConfig, sink=None):
        self.config = config
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        self.agent_id = load_or_create_agent_id(config.state_dir, config.agent_id)
        self.handover_path = os.path.join(config.state_dir, HANDOVER_FILE)
        self.handing_over = False
        self.listeners_passed = 0        # listening sockets handed back by the service manager
        self.host = socket.gethostname()
        self.identities = IdentityResolver(config.identities, host=self.host)
        self.targets_by_id = {i + 1: t for i, t in enumerate(config.targets)}
        self.target_ids = {t.name: i for i, t in self.targets_by_id.items()}
        json_sink = JsonLinesSink(config.event_log) if config.event_log else None
        self.records = None if sink is not None else RecordsPipeline(config, self.agent_id)
        self.sink = fanout(sink or self.records.writer, json_sink)
        # the sessions' contexts take the agent as their sink: durable_before_forward targets
        # wait on the record writer's when_durable through it (None: nothing stores durably)
        self.when_durable = getattr(self.sink, "when_durable", None)
        if self.records is not None and self.records.shipper is not None:
            self.records.shipper.on_alert = self._record_alert
        self._inventory_carry: dict[tuple, dict] = {}   # conn.observed not yet recorded
        mount = cgroups.cgroup2_mount()
        self.scope_paths = [cgroups.abs_path(c, mount) for c in config.scope_cgroups]
        self.bpf = BpfManager(self.scope_paths)
        self.inventory = Inventory(self._describe_capture, self._target_name)
        self.servers: list[asyncio.base_events.Server] = []
        self.active_sessions: set[asyncio.Task] = set()
        # set when the agent starts stopping: sessions leave at their next idle point
        self.stopping = asyncio.Event()
        self.stats = {"accepted": 0, "unattributed": 0, "bypassed": 0}
        self.open_per_target: dict[str, int] = {}    # sessions being served, for max_connections
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.started = time.monotonic()
        self._schema_warned: set[str] = set()
        self._target_nets: dict[int, list] = {}
        self.policy = self._load_policy(config)
        self.masking = config.masking_engine
        self.brokers = self._load_brokers(config)
        self.local_ca = None
        if any((t.protocol, t.client_tls) in (("postgres", "allow"), ("http", "intercept")) for t in config.targets):
            from enforcer.tls import LocalCA
            self.local_ca = LocalCA.load_or_create(os.path.join(config.state_dir, "ca"))
        self._tls_contexts: dict[tuple, object] = {}
        self.catalogs: dict[str, object] = {}     # target name -> (oid, attnum) -> schema.table.column
        self.approvals = None
        if self.records is not None and self.records.shipper is not None:
            from enforcer.approvals import ApprovalClient
            self.approvals = ApprovalClient(config.collector.url, self.records.shipper.bearer_token,
                                            timeout_s=config.approvals_timeout, ca_file=config.collector.ca,
                                            grant_window_s=config.approvals_grant_window)

    @staticmethod
    def _load_brokers(config: AgentConfig) -> dict:
        """Brokered credentials per Postgres target: the agent holds the secret, the workload a token."""
        from enforcer.postgres.broker import PostgresBroker
        brokers = {}
        for target in config.targets:
            if target.protocol == "postgres" and target.credentials:
                broker = PostgresBroker.from_credentials(target.credentials, target.name)
                if broker is not None:
                    brokers[target.name] = broker
        return brokers

    # ---- policy and reload ------------------------------------------------------------------
    def _load_policy(self, config: AgentConfig):
        """The Cedar policy store, or None when no policy is configured (observe-only: recorded, not decided)."""
        if not config.policy_path:
            log.warning("no policy configured: governed sessions are recorded but every statement is allowed")
            return None
        from enforcer.policy.store import PolicyStore
        return PolicyStore(config.policy_path, groups=config.policy_groups(),
                           on_rejected=self._policy_rejected)

    def _policy_rejected(self, error) -> None:
        log.error("policy change refused, previous policy stays active:\n%s", error.format())
        self.emit("agent.policy_rejected", {"file": error.file, "line": error.line, "reason": error.reason,
                                            "problems": [list(p) for p in error.problems]})

    def reload(self) -> None:
        """SIGHUP: re-read agent.yaml and the policy. A bad file is refused and the old one keeps running."""
        from agent import config as config_mod
        try:
            new = config_mod.load(self.config.source)
        except config_mod.ConfigError as exc:
            log.error("config change refused, previous config stays active:\n%s", exc)
            self.emit("agent.config_rejected", {"file": self.config.source, "problems": exc.problems})
            return
        old = self.config
        # what the running agent is built on (listeners, BPF scope, spool, shipper, key, state)
        # changes only with a restart; the rest applies to the next session
        fixed = {"targets": "targets", "scope_cgroups": "scope", "spool": "spool", "collector": "collector",
                 "state_dir": "agent.state_dir", "agent_id": "agent.id", "event_log": "agent.event_log",
                 "policy_path": "policy.path"}
        pending = [name for field, name in fixed.items() if getattr(new, field) != getattr(old, field)]
        if pending:
            self.emit("agent.alert", {"kind": "restart_required", "severity": "warning",
                                      "message": f"changes to {', '.join(pending)} take effect when the agent "
                                                 f"restarts; the running values stay in force until then",
                                      "detail": {"sections": pending}})
        self.identities = IdentityResolver(new.identities, host=self.host)
        self.masking = new.masking_engine
        if self.approvals is not None:
            self.approvals.timeout_s = new.approvals_timeout
            self.approvals.grant_window_s = new.approvals_grant_window
        self.config = dataclasses.replace(new, **{field: getattr(old, field) for field in fixed})
        if self.policy is not None:
            if self.policy.reload(groups=new.policy_groups()):
                self.emit("agent.reloaded", {"what": "policy", "generation": self.policy.generation})
        self.emit("agent.reloaded", {"what": "config", "detail": {
            "identities": len(new.identities), "masking_rules": len((new.masking or {}).get("rules") or []),
            "restart_required": pending}})

    async def _policy_watch_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.policy is not None:
            try:
                await asyncio.wait_for(stop.wait(), timeout=2.0)
                return
            except asyncio.TimeoutError:
                pass
            if await asyncio.to_thread(self.policy.maybe_reload):
                self.emit("agent.reloaded", {"what": "policy", "generation": self.policy.generation})

    def _function_by_oid(self, target: str):
        """OID -> (schema, name, argument types, result type) from the target's newest catalog, for
        fast-path calls: read at each call, so a long session sees functions created after it
        started once the catalog is read again."""
        def lookup(oid: int):
            catalog = self.catalogs.get(target)
            return catalog.function_by_oid(oid) if catalog is not None else None
        return lookup

    async def _catalog_loop(self, stop: asyncio.Event) -> None:
        """Column names for `schema.table.column` masking rules, from each target's catalog DSN."""
        sources = {t.name: t.options["catalog_dsn"] for t in self.config.targets if t.options.get("catalog_dsn")}
        while sources and not stop.is_set():
            for name, dsn in sources.items():
                try:
                    self.catalogs[name] = await asyncio.to_thread(load_catalog, dsn)
                except Exception as exc:
                    log.warning("catalog for target %s not refreshed: %s", name, exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=60)
            except asyncio.TimeoutError:
                pass

    async def _watchdog_loop(self, stop: asyncio.Event) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        stopped_petting = False
        while not stop.is_set():
            failure = self.records.failure if self.records is not None else None
            if failure is None:
                sdnotify.notify("WATCHDOG=1")
            elif not stopped_petting:
                # records can no longer be stored or shipped by this process: let systemd
                # restart it (new sessions are refused meanwhile, the writer being full)
                stopped_petting = True
                log.critical("%s; no longer petting the systemd watchdog, so that systemd restarts "
                             "the agent", failure)
                sdnotify.notify(f"STATUS=records are not being stored: {failure}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=usec / 2e6)
            except asyncio.TimeoutError:
                pass

    # ---- events ---------------------------------------------------------------------------
    def _record_alert(self, fields: dict) -> None:
        """An agent.alert from the records pipeline (shipper): never raises into it."""
        try:
            self.emit("agent.alert", fields)
        except (RecordBacklogFull, RuntimeError) as exc:
            log.error("agent.alert %s not recorded: %s", fields.get("kind"), exc)

    def emit(self, event_type: str, fields: dict, session_id: Optional[str] = None) -> None:
        try:
            self.sink.emit(event_type, fields, session_id)
        except SchemaError as exc:
            # a producer bug must not lose the event or break the session: keep the unknown
            # fields under the x_ prefix the schema reserves for extras, and say so loudly
            allowed = EVENT_FIELDS.get(event_type)
            if allowed is None:
                raise
            if event_type not in self._schema_warned:
                self._schema_warned.add(event_type)
                log.error("event %s does not fit the schema (%s); unknown fields kept as x_*", event_type, exc)
            fixed = {(k if k in allowed or k.startswith("x_") else "x_" + k): v for k, v in fields.items()}
            self.sink.emit(event_type, fixed, session_id)

    def _target_name(self, target_id: int) -> Optional[str]:
        t = self.targets_by_id.get(target_id)
        return t.name if t else None

    def _describe_capture(self, cap: Capture) -> dict:
        return procinfo.as_record(procinfo.describe(cap.tgid, cap.pid, cap.uid, cap.gid, cap.comm, cap.cgroup_id))

    def _on_bpf_event(self, kind: int, cap: Capture, at_ns: Optional[int] = None) -> None:
        """`at_ns` is given for an event an earlier run's programs reported while no agent ran."""
        self.inventory.on_event(kind, cap, at_ns)
        if kind == 1 and cap.bypass:
            self.stats["bypassed"] += 1
            # who went around the enforcer, named as its sessions would have been
            proc = procinfo.describe(cap.tgid, cap.pid, cap.uid, cap.gid, cap.comm, cap.cgroup_id)
            fields = {"target": self._target_name(cap.target_id), "orig_dst": f"{cap.orig_ip}:{cap.orig_port}",
                      "reason": "enforcer_down", "identity": self.identities.resolve(proc)[0],
                      "process": procinfo.as_record(proc)}
            if at_ns is not None:
                # an earlier run's target ids may not be this config's: name it by destination
                fields.update(target=self._target_of(cap.orig_ip, cap.orig_port), reason="agent_down",
                              connected_ns=at_ns)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.emit, "agent.bypass", fields)

    def _target_of(self, ip: str, port: int) -> Optional[str]:
        addr = ipaddress.ip_address(ip)
        for target_id, nets in self._target_nets.items():
            if self.targets_by_id[target_id].match.port == port and any(
                    addr.version == net.version and addr in net for net in nets):
                return self._target_name(target_id)
        return None

    def _replay_recovered(self) -> None:
        """What the programs reported while no agent ran (a crash, a handover), at its own time."""
        wall_minus_monotonic = time.time_ns() - time.monotonic_ns()   # bpf_ktime_get_ns is CLOCK_MONOTONIC
        for kind, cap in self.bpf.recovered:
            self._on_bpf_event(kind, cap, at_ns=cap.ktime_ns + wall_minus_monotonic)
        self.bpf.recovered = []

    # ---- lifecycle ------------------------------------------------------------------------
    def _exempt_self(self) -> None:
        """The enforcer's own upstream connects must never be redirected back to itself."""
        self.bpf.exempt_process(os.getpid())
        own = cgroups.cgroup_of_pid(os.getpid())
        own_path = cgroups.abs_path(own) if own else ""
        # exempting our cgroup is only safe when it is ours alone, i.e. not a scope root or an ancestor of one
        if own_path and own not in ("/", "") and not any(
                p == own_path or p.startswith(own_path.rstrip("/") + "/") for p in self.scope_paths):
            if os.environ.get("INVOCATION_ID"):     # running as a systemd unit: the unit's cgroup is ours
                self.bpf.exempt_cgroup(cgroups.cgroup_id(own_path))

    def _target_rules(self) -> list[TargetRule]:
        rules = []
        for target_id, target in self.targets_by_id.items():
            nets = resolve_target_networks(target)
            self._target_nets[target_id] = nets
            for net in nets:
                rules.append(TargetRule(target_id, net, target.match.port, target.listen_port, target.on_enforcer_down))
        return rules

    async def _start_listeners(self) -> None:
        """Listen for the redirected connects of every target. Under systemd each listening socket
        is also kept in the unit's descriptor store and comes back at the next start: connects
        made while the agent restarts (or after a crash) wait in its backlog to be served,
        instead of being refused."""
        passed = sdnotify.listen_fds()
        for target_id, target in self.targets_by_id.items():
            handler = self._make_handler(target_id, target)
            for host in (self.config.listen_host4, self.config.listen_host6):
                name = f"listen-v{6 if ':' in host else 4}-{target.listen_port}"
                sock = _passed_listener(passed.pop(name, []), host, target.listen_port)
                try:
                    if sock is not None:
                        server = await asyncio.start_server(handler, sock=sock, backlog=4096)
                        self.listeners_passed += 1
                    else:
                        server = await asyncio.start_server(handler, host, target.listen_port,
                                                            reuse_address=True, backlog=4096)
                except OSError as exc:
                    if host == self.config.listen_host6 and exc.errno in (97, 99):   # no IPv6 on this host
                        continue
                    raise RuntimeError(f"cannot listen on {host} port {target.listen_port} for target "
                                       f"{target.name!r}: {exc.strerror}; choose another listen_port") from exc
                self.servers.append(server)
                if sock is None:
                    sdnotify.store_fd(name, server.sockets[0].fileno())
        for name, fds in passed.items():        # a listener the config no longer has
            for fd in fds:
                os.close(fd)
            sdnotify.forget_fd(name)

    def _refuse_collector_capture(self) -> None:
        """A target that matches the collector's address would send our own shipping through us."""
        problems = hostfacts.collector_capture(self.config)
        if problems:
            raise RuntimeError(problems[0])

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._refuse_collector_capture()
        self.bpf.load()
        self._exempt_self()
        # before listening: connects an earlier run redirected may be waiting in a listener the
        # service manager hands back, and are attributed from that run's map
        self.bpf.hold_earlier_runs(self.handover_path)
        await self._start_listeners()
        try:
            self.bpf.set_targets(self._target_rules())
            self.bpf.attach()
            self.bpf.start_events(self._on_bpf_event)
            # pyroute2's synchronous API runs its own event loop: keep it off ours
            host_facts = await asyncio.to_thread(hostfacts.describe_host)
            self.emit("agent.start", {"version": VERSION, "agent_id": self.agent_id, "host": host_facts,
                                      "hostname": self.host, "pid": os.getpid(), "config_path": self.config.source,
                                      "kernel": os.uname().release, "boot_id": _boot_id(),
                                      "bpf": {"attached": len(self.bpf.attached), "scope": self.scope_paths,
                                              "taken_over": self.bpf.taken_over,
                                              "recovered_events": len(self.bpf.recovered)},
                                      "listeners_passed": self.listeners_passed,
                                      "scope": list(self.config.scope_cgroups),
                                      "targets": [{"name": t.name, "protocol": t.protocol, "listen_port": t.listen_port,
                                                   "port": t.match.port, "cidrs": list(t.match.cidrs),
                                                   "hostnames": list(t.match.hostnames)}
                                                  for t in self.config.targets]})
            self._replay_recovered()
            if self.bpf.recovered_drops:
                self.emit("agent.alert", ring_drops_alert(self.bpf.recovered_drops, "agent_down"))
            self._loop.call_later(EARLIER_RUN_MAPS_KEPT_S, self.bpf.forget_earlier_runs)
            if self.records is not None:
                for alert in self.records.startup_alerts():
                    self.emit("agent.alert", alert)
            for alert in await asyncio.to_thread(self._preexisting_connections):
                self.emit("agent.alert", alert)
            sdnotify.notify("READY=1\nSTATUS=governing " + ", ".join(t.name for t in self.config.targets))
            log.info("warden agent %s ready: %d target(s), scope %s", self.agent_id, len(self.targets_by_id),
                     ", ".join(self.scope_paths))
            tasks = [asyncio.create_task(self._inventory_loop(stop)),
                     asyncio.create_task(self._hostname_loop(stop)),
                     asyncio.create_task(self._heartbeat_loop(stop)),
                     asyncio.create_task(self._policy_watch_loop(stop)),
                     asyncio.create_task(self._watchdog_loop(stop)),
                     asyncio.create_task(self._catalog_loop(stop))]
            if self.records is not None and self.records.shipper is not None:
                self.records.shipper_task = asyncio.create_task(self.records.shipper.run(stop),
                                                                name="shipper")
                tasks.append(self.records.shipper_task)
            await stop.wait()
            for t in tasks:
                t.cancel()
            for task, outcome in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True)):
                if isinstance(outcome, Exception):
                    log.error("task %s had failed: %s", task.get_name(), outcome, exc_info=outcome)
        finally:
            sdnotify.notify("STOPPING=1")
            self.stopping.set()
            for server in self.servers:
                server.close()
            try:        # while the counter is ours to read (a next run records what comes after)
                self._record_ring_drops()
            except Exception as exc:
                log.error("connection events the ring had no room for could not be recorded: %s", exc)
            left = self._release_programs()
            self._flush_inventory()
            drained = await self._drain_sessions()
            for task in list(self.active_sessions):
                task.cancel()
            if self.active_sessions:
                await asyncio.wait(list(self.active_sessions), timeout=5)
            try:
                self.emit("agent.stop", {"agent_id": self.agent_id, "stats": dict(self.stats),
                                         "reason": "handover" if self.handing_over else "signal",
                                         "programs_left": left, "sessions_drained": drained[0],
                                         "sessions_cut": drained[1],
                                         "uptime_s": round(time.monotonic() - self.started, 3)})
            except (RecordBacklogFull, RuntimeError) as exc:
                log.error("agent.stop not recorded: %s", exc)
            if self.records is not None:
                await asyncio.to_thread(self.records.close)

    async def _drain_sessions(self) -> tuple[int, int]:
        """Give the sessions up to agent.stop_drain to reach an idle point, where each ends with the
        protocol's own goodbye (Postgres: FATAL 57P01, as at a server shutdown; HTTP: the
        connection closed between requests), so no statement or request is cut that could finish.
        Returns (ended within the drain, still running: they are cut)."""
        sessions = list(self.active_sessions)
        if not sessions:
            return 0, 0
        drain = self.config.stop_drain
        if drain > 0:
            log.info("stopping: waiting up to %gs for %d session(s) to reach an idle point", drain, len(sessions))
            await asyncio.wait(sessions, timeout=drain)
        running = sum(1 for task in sessions if not task.done())
        if running:
            log.warning("stopping: %d session(s) still running after agent.stop_drain (%gs) are cut",
                        running, drain)
        return len(sessions) - running, running

    def hand_over(self, stop: asyncio.Event) -> None:
        """HANDOVER_SIGNAL: stop for a planned restart, leaving the programs attached for the next
        run (`warden-agent restart`, `systemctl restart`). Governed connects wait meanwhile in the
        listeners systemd keeps (or, without them, are refused); none is sent direct."""
        log.info("handover asked: stopping with the BPF programs left attached for the next run")
        self.handing_over = True
        stop.set()

    def _release_programs(self) -> int:
        """Detach at a stop; at a handover, or any stop with `agent.on_stop: hold`, leave them for
        the next run (governed connects wait or are refused meanwhile, never go direct). Returns
        how many were left."""
        if self.handing_over or self.config.on_stop == "hold":
            try:
                return self.bpf.hand_over(self.handover_path)
            except Exception as exc:       # detaching is then the only clean way out
                log.error("the programs could not be left for the next run (%s); detaching them", exc)
                self.handing_over = False
        self.bpf.detach()
        return 0

    def _record_ring_drops(self) -> None:
        """Connection events this run's programs found no room for in their ring (the agent fell
        behind reading it): recorded once each, as an alert with their count; while records
        cannot be taken (RecordBacklogFull), at the next pass."""
        dropped, recorded = self.bpf.ring_drops()
        if dropped <= recorded:
            return
        try:
            self.emit("agent.alert", ring_drops_alert(dropped - recorded, "agent_behind"))
        except RecordBacklogFull as exc:
            log.warning("connection events the ring had no room for: alert kept for the next pass: %s", exc)
            return
        self.bpf.mark_drops_recorded(dropped)

    def _flush_inventory(self) -> None:
        """Record the connection inventory. While records cannot be taken (RecordBacklogFull),
        what is not recorded stays folded, per process and destination, for the next pass."""
        carry = self._inventory_carry
        for fields in self.inventory.flush():
            key = (fields["process"].get("tgid"), fields["dst_ip"], fields["dst_port"])
            if key in carry:
                _fold_observed(carry[key], fields)
            else:
                carry[key] = fields
        while carry:
            key = next(iter(carry))
            try:
                self.emit("conn.observed", carry[key])
            except RecordBacklogFull as exc:
                log.warning("connection inventory (%d pairs) kept for the next pass: %s", len(carry), exc)
                return
            del carry[key]

    async def _inventory_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.inventory_interval)
            except asyncio.TimeoutError:
                pass
            try:
                self._record_ring_drops()
                self._flush_inventory()
            except Exception:
                log.exception("connection inventory not recorded; retried at the next pass")

    def _in_scope(self, cgroup_path: str) -> bool:
        for scope in self.config.scope_cgroups:
            root = "/" + scope.strip("/")
            if root == "/" or cgroup_path == root or cgroup_path.startswith(root + "/"):
                return True
        return False

    def _preexisting_connections(self) -> list[dict]:
        """Connections to governed targets that were established before our programs were attached.

        They cannot be governed any more (the handshake is over), so each is recorded at start
        with its process: a workload that connected early is visible, not silently exempt.
        """
        import psutil
        found = []
        try:
            conns = psutil.net_connections(kind="tcp")
        except (psutil.Error, OSError) as exc:
            log.warning("could not read the kernel's socket table: %s", exc)
            return found
        for conn in conns:
            if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr or conn.pid is None:
                continue
            ip, port = conn.raddr.ip, conn.raddr.port
            if ip.startswith("::ffff:"):
                ip = ip[7:]
            for target_id, nets in self._target_nets.items():
                target = self.targets_by_id[target_id]
                if port != target.match.port or not hostfacts.networks_overlap(nets, [ip]):
                    continue
                if conn.pid == os.getpid() or not self._in_scope(cgroups.cgroup_of_pid(conn.pid)):
                    continue
                try:
                    owner = psutil.Process(conn.pid)
                    uid, gid, comm = owner.uids().real, owner.gids().real, owner.name()
                except psutil.Error:
                    uid, gid, comm = -1, -1, ""
                record = procinfo.as_record(procinfo.describe(conn.pid, conn.pid, uid, gid, comm, 0))
                found.append({"kind": "preexisting_connection", "severity": "warning",
                              "message": f"a connection to governed target {target.name!r} existed before the "
                                         f"agent attached its programs; it is not governed",
                              "detail": {"target": target.name, "dst": f"{ip}:{port}",
                                         "src": f"{conn.laddr.ip}:{conn.laddr.port}", "process": record}})
        return found

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.heartbeat_interval)
                return
            except asyncio.TimeoutError:
                pass
            fields = {"version": VERSION, "sessions_active": len(self.active_sessions), "stats": dict(self.stats),
                      "uptime_s": round(time.monotonic() - self.started, 3)}
            try:
                fields["bpf_state"] = {"attached": len(self.bpf.attached), **self.bpf.map_counts()}
            except Exception as exc:
                fields["bpf_state"] = {"error": str(exc)}
            if self.records is not None:
                fields.update(self.records.status())
            try:
                self.emit("agent.heartbeat", fields)
            except RecordBacklogFull as exc:
                log.warning("heartbeat not recorded: %s", exc)

    async def _hostname_loop(self, stop: asyncio.Event) -> None:
        if not any(t.match.hostnames for t in self.config.targets):
            return
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=HOSTNAME_REFRESH_S)
                return
            except asyncio.TimeoutError:
                pass
            before = dict(self._target_nets)
            rules = await asyncio.to_thread(self._target_rules)
            if before != self._target_nets:
                self.bpf.set_targets(rules)
                log.info("target addresses refreshed")

    # ---- connections ----------------------------------------------------------------------
    def _make_handler(self, target_id: int, target: TargetConfig):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            self.active_sessions.add(task)
            try:
                await self._serve(target_id, target, reader, writer)
            except Exception:
                log.exception("session on target %s failed", target.name)
            finally:
                self.active_sessions.discard(task)
                if not writer.is_closing():
                    writer.close()
        return handle

    def attribute(self, client_ip: str, client_port: int) -> Optional[Capture]:
        return self.bpf.take_redirected(client_ip, client_port)

    async def _serve(self, target_id: int, target: TargetConfig, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        cap = self.attribute(peer[0], peer[1])
        self.stats["accepted"] += 1
        if cap is None or cap.target_id != target_id:
            # not redirected by our programs: we cannot know where it was going, so it goes nowhere
            self.stats["unattributed"] += 1
            self.emit("agent.alert", {"kind": "unattributed_connection", "severity": "warning",
                                      "message": f"a connection reached the listener of target {target.name!r} "
                                                 f"without passing through Warden's BPF programs; refused",
                                      "detail": {"target": target.name, "client": f"{peer[0]}:{peer[1]}"}})
            writer.close()
            return
        proc = procinfo.describe(cap.tgid, cap.pid, cap.uid, cap.gid, cap.comm, cap.cgroup_id)
        identity, attrs = self.identities.resolve(proc)
        if self.records is not None and self.records.full and not await self.records.wait_recordable():
            # no evidence, no access: the session could not be recorded
            self.stats["refused_spool_full"] = self.stats.get("refused_spool_full", 0) + 1
            await refuse_unrecordable(target.protocol, reader, writer)
            return
        limit = target.options.get("max_connections") or 0
        open_now = self.open_per_target.get(target.name, 0)
        if limit and open_now >= limit:
            self.stats["refused_max_connections"] = self.stats.get("refused_max_connections", 0) + 1
            self.emit("agent.alert", {
                "kind": "connection_limit", "severity": "warning",
                "message": f"refused a connection of {identity} to target {target.name!r}: {open_now} are open "
                           f"and the target allows {limit} (max_connections)",
                "detail": {"target": target.name, "identity": identity, "limit": limit,
                           "client": f"{peer[0]}:{peer[1]}", "process": procinfo.as_record(proc)}})
            await refuse_connection(target.protocol, reader, writer, "53300",
                                    f"Warden refused this connection: target {target.name!r} already has {open_now} "
                                    f"connections open, its max_connections; try again when one has closed, or raise "
                                    f"max_connections for this target in agent.yaml")
            return
        self.open_per_target[target.name] = open_now + 1
        try:
            await self._serve_attributed(target_id, target, reader, writer, peer, cap, proc, identity, attrs)
        finally:
            self.open_per_target[target.name] -= 1

    async def _serve_attributed(self, target_id: int, target: TargetConfig, reader, writer, peer, cap: Capture,
                                proc, identity: str, attrs: dict) -> None:
        attribution = Attribution(
            orig_ip=cap.orig_ip, orig_port=cap.orig_port, family=socket.AF_INET if cap.family == 4 else socket.AF_INET6,
            target_id=target_id, client_ip=peer[0], client_port=peer[1], socket_cookie=cap.cookie,
            connect_ns=cap.ktime_ns, process=proc)
        info = TargetInfo(
            name=target.name, protocol=target.protocol, upstream_host=cap.orig_ip, upstream_port=cap.orig_port,
            # http: no fixed server name; each request's Host (one of the hostnames) is the upstream's
            # TLS server name (enforcer/http/proxy.py, _tls_name)
            tls=UpstreamTLS(target.upstream_tls, target.upstream_ca,
                            target.match.hostnames[0] if target.match.hostnames and target.protocol != "http"
                            else None),
            on_enforcer_down=target.on_enforcer_down, options=dict(target.options))
        ctx = ConnectionContext(
            session_id=new_session_id(), identity=identity, identity_attrs=attrs, target=info,
            attribution=attribution, sink=self, host=self.host, agent_id=self.agent_id,
            policy=self.policy, approvals=self.approvals,
            masking=self.masking.for_session(identity, attrs, target.name, catalog=self.catalogs.get(target.name))
            if self.masking is not None else None)
        if self.local_ca is not None and target.protocol == "postgres" and target.client_tls == "allow":
            # workloads that ask for TLS get a leaf for the name or address they connected to
            key = (target.name, cap.orig_ip)
            if key not in self._tls_contexts:
                self._tls_contexts[key] = await asyncio.to_thread(
                    self.local_ca.server_context_for, list(target.match.hostnames), [cap.orig_ip])
            ctx.extra["server_ssl_context"] = self._tls_contexts[key]
        if target.protocol == "http":
            info.options["client_tls"] = target.client_tls
            if target.credentials:
                # brokered: the enforcer injects the secret; the workload never holds it
                info.options["credentials"] = target.credentials
            if target.match.hostnames:
                # certificates are only ever issued for the names this target is about
                info.options.setdefault("client_tls_names", list(target.match.hostnames))
            if self.local_ca is not None:
                ctx.extra["local_ca"] = self.local_ca
        if target.protocol == "postgres" and target.options.get("catalog_dsn"):
            ctx.extra["pg_function_by_oid"] = self._function_by_oid(target.name)
        broker = self.brokers.get(target.name)
        if broker is not None:
            ctx.extra["pg_broker"] = broker

            def reidentify(claims: dict, proc=proc, target=target):
                """A validated service token can name the identity (`match: {claim: {...}}`)."""
                name, new_attrs = self.identities.resolve(proc, claims)
                masker = (self.masking.for_session(name, new_attrs, target.name, catalog=self.catalogs.get(target.name))
                          if self.masking is not None else None)
                return name, new_attrs, masker
            ctx.extra["reidentify"] = reidentify
        ctx.extra["agent_stopping"] = self.stopping
        ctx.extra["session_start_fields"] = {
            "identity": identity, "target": target.name, "protocol": target.protocol,
            "orig_dst": f"{cap.orig_ip}:{cap.orig_port}", "process": procinfo.as_record(proc),
            "client": f"{peer[0]}:{peer[1]}", "host": self.host, "agent": self.agent_id}
        handler = protocol_handler(target.protocol)
        await handler(reader, writer, ctx)


SPOOL_FULL_MESSAGE = ("Warden refused this connection: the agent's record spool is full (or cannot be written), "
                      "and sessions that cannot be recorded are not allowed. Free space under spool.path or raise "
                      "spool.max_bytes.")


async def _read_postgres_startup(reader, writer, timeout: float = 5.0) -> None:
    """Consume the client's startup packet, declining TLS/GSS like a server would, so that the
    ErrorResponse that follows is what libpq shows (with sslmode=prefer it sends SSLRequest first)."""
    from enforcer.postgres import protocol as P
    try:
        for _ in range(3):
            head = await asyncio.wait_for(reader.readexactly(8), timeout)
            length, code = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
            if length == 8 and code in (P.SSL_REQUEST_CODE, P.GSSENC_REQUEST_CODE):
                writer.write(b"N")
                await writer.drain()
                continue
            if 8 < length <= 10000:
                await asyncio.wait_for(reader.readexactly(length - 8), timeout)
            return
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
        return


async def refuse_unrecordable(protocol: str, reader, writer) -> None:
    """No evidence, no access: the spool is full or failing."""
    await refuse_connection(protocol, reader, writer, "53100", SPOOL_FULL_MESSAGE)


async def refuse_connection(protocol: str, reader, writer, sqlstate: str, message: str) -> None:
    """Tell the client why, in its own protocol (Postgres: a FATAL ErrorResponse with `sqlstate`
    after its startup packet; HTTP: 503), then close."""
    if protocol == "postgres":
        from enforcer.postgres import protocol as P
        await _read_postgres_startup(reader, writer)
        writer.write(P.build_error_response(sqlstate, message, severity="FATAL"))
    elif protocol == "http":
        if await _starts_with_tls(reader):
            # an HTTPS workload (client_tls intercept or sni): plaintext would only break its TLS
            # stack with a misleading error, so close; the caller's record says why
            writer.close()
            return
        payload = json.dumps({"error": message}).encode()
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    try:
        await asyncio.wait_for(writer.drain(), timeout=2)
    except (OSError, asyncio.TimeoutError):
        pass
    writer.close()


async def _starts_with_tls(reader, wait_s: float = 2.0) -> bool:
    """Whether the client's first byte is a TLS handshake record (HTTP clients speak first)."""
    try:
        first = await asyncio.wait_for(reader.read(1), timeout=wait_s)
    except (OSError, asyncio.TimeoutError):
        return False
    return first == b"\x16"


class RecordsPipeline:
    """Signing key, spool, chained record writer and (with a collector configured) the shipper."""

    def __init__(self, config: AgentConfig, agent_id: str):
        from records.signing import load_or_create_key
        from records.spool import Spool
        from records.writer import RecordWriter
        self.key = load_or_create_key(os.path.join(config.state_dir, "agent.key"))
        self.on_full = config.spool.on_full
        self.block_wait = SPOOL_BLOCK_WAIT_S
        self.spool = Spool(config.spool.path, max_bytes=config.spool.max_bytes, on_full=config.spool.on_full,
                           block_timeout=SPOOL_BLOCK_WAIT_S)
        self.writer = RecordWriter(agent_id, self.key, os.path.join(config.state_dir, "records"), self.spool,
                                   batch_max_delay=config.spool.flush_interval)
        self.shipper = None
        self.shipper_task: Optional[asyncio.Task] = None
        if config.collector.url:
            from agent.shipper import Shipper
            self.shipper = Shipper(self.spool, config.collector.url, self.key, agent_id,
                                   ca_file=config.collector.ca, enrollment_token=config.collector.enrollment,
                                   state_dir=os.path.join(config.state_dir, "shipper"))

    @property
    def full(self) -> bool:
        """No new session: its records could not be stored (spool full or failing, writer gone)."""
        return bool(self.writer.full)

    @property
    def failure(self) -> Optional[str]:
        """Why this process can no longer store or ship records (None: it can)."""
        failure = self.writer.failure
        if failure is None and self.shipper_task is not None and self.shipper_task.done():
            exc = None if self.shipper_task.cancelled() else self.shipper_task.exception()
            failure = f"the shipper stopped ({type(exc).__name__}: {exc})" if exc else "the shipper stopped"
        return failure

    async def wait_recordable(self) -> bool:
        """Whether a new session may start: with on_full block, wait up to block_wait seconds for
        the spool to take records again; with refuse, not at all."""
        if not self.full:
            return True
        if self.on_full != "block" or self.writer.failure is not None:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.block_wait
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            if not self.full:
                return True
        return False

    def startup_alerts(self) -> list[dict]:
        """agent.alert fields for what opening the spool and the chain had to repair."""
        notes = list(self.spool.recovery_notes) + list(self.writer.recovery_notes)
        if not notes:
            return []
        lost = self.spool.recovery_lost_frames
        return [{"kind": "spool_recovered", "severity": "critical" if lost else "warning",
                 "message": f"the record spool {self.spool.path} was repaired at start ({len(notes)} "
                            f"problem(s)" + (f", {lost} unshipped frame(s) lost" if lost else "")
                            + "): " + "; ".join(notes[:3]) + ("; ..." if len(notes) > 3 else ""),
                 "detail": {"notes": notes[:100], "lost_frames": lost, "spool": self.spool.path}}]

    def status(self) -> dict:
        seq, head = self.writer.chain_head()
        status = {"spool_backlog_bytes": self.spool.used_bytes, "spool_backlog_batches": self.spool.pending_count,
                  "spool_full": self.full, "chain_seq": seq, "chain_hash": bytes(head).hex()}
        if self.writer.problem:
            status["x_records_problem"] = self.writer.problem
        return status

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception as exc:      # what was not stored is in the lost-records file
            log.critical("records not all stored at stop: %s", exc)
        finally:
            try:
                self.spool.close()
            except OSError as exc:
                log.critical("closing the record spool failed: %s", exc)


def _passed_listener(fds: list[int], host: str, port: int) -> Optional[socket.socket]:
    """The listening socket passed back for (host, port), if it is one; extras are closed."""
    sock = None
    for fd in fds:
        try:
            candidate = socket.socket(fileno=fd)
        except OSError:              # not a socket at all
            log.warning("a passed descriptor named for %s port %s is not a socket; closed", host, port)
            os.close(fd)
            continue
        try:
            listening = candidate.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            bound = candidate.getsockname()[:2]
        except OSError:
            listening, bound = 0, None
        if sock is None and listening and bound == (host, port):
            sock = candidate
        else:
            log.warning("a passed descriptor is not the listener on %s port %s; closed", host, port)
            candidate.close()
    return sock


def _fold_observed(into: dict, more: dict) -> None:
    """Add one conn.observed field set to another of the same process and destination."""
    for name in ("attempts", "established", "failed", "pending", "governed", "redirected", "bypassed"):
        into[name] = into.get(name, 0) + more.get(name, 0)
    into["pids"] = sorted(set(into.get("pids", [])) | set(more.get("pids", [])))[:32]
    into["first_ns"] = min(into["first_ns"], more["first_ns"])
    into["last_ns"] = max(into["last_ns"], more["last_ns"])
    into["target"] = into.get("target") or more.get("target")


def protocol_handler(protocol: str):
    if protocol == "postgres":
        from enforcer.postgres.proxy import serve_postgres
        return serve_postgres
    if protocol == "http":
        from enforcer.http.proxy import serve_http
        return serve_http
    from enforcer.relay import serve_tcp
    return serve_tcp


def run_forever(config: AgentConfig) -> int:
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(config)
        loop.add_signal_handler(signal.SIGHUP, agent.reload)
        loop.add_signal_handler(HANDOVER_SIGNAL, agent.hand_over, stop)
        await agent.run(stop)
        if agent.handing_over:
            outcome["code"] = EXIT_HANDOVER

    from agent.bpfmgr import BpfUnavailable
    try:
        from enforcer.policy.loader import PolicyError
    except ImportError:          # pragma: no cover - the policy package ships with the agent
        PolicyError = RuntimeError
    outcome = {"code": 0}

    async def guarded() -> None:
        try:
            await main()
        except PolicyError as exc:
            log.error("the policy could not be loaded, nothing was started:\n%s", exc)
            outcome["code"] = 1
        except BpfUnavailable as exc:
            log.error("BPF is not available: %s (run `warden-agent check` for details)", exc)
            outcome["code"] = 1
        except RuntimeError as exc:
            log.error("%s", exc)
            outcome["code"] = 1

    # uvloop for our loop only: pyroute2 runs its own loops in worker threads and needs
    # the default policy's loops there (uvloop cannot open netlink sockets)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(guarded())
    return outcome["code"]
