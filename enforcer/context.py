"""What the enforcer knows about one accepted connection, handed to a protocol handler.

The agent fills this in from the BPF attribution maps and the identity rules before
any byte of the client's protocol is read; protocol handlers only consume it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Protocol


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    pid: int
    tgid: int
    uid: int
    gid: int
    comm: str
    cgroup_id: int
    cgroup_path: str = ""
    exe: str = ""
    cmdline: list[str] = dataclasses.field(default_factory=list)
    user: str = ""
    systemd_unit: str = ""
    container_id: str = ""
    start_time: float = 0.0


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Captured in the kernel at connect() time: correct even if the process exited."""

    orig_ip: str          # the destination the workload asked for (textual IPv4 or IPv6)
    orig_port: int
    family: int           # socket.AF_INET or socket.AF_INET6 of the client's socket
    target_id: int
    client_ip: str        # the client's side of the redirected connection
    client_port: int
    socket_cookie: int
    connect_ns: int       # bpf_ktime_get_ns() at connect
    process: ProcessInfo


@dataclasses.dataclass(frozen=True)
class UpstreamTLS:
    mode: str = "disable"          # disable | prefer | require | verify-full
    ca_file: Optional[str] = None
    server_name: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    name: str
    protocol: str                  # postgres | http | tcp
    upstream_host: str             # where the enforcer connects (the original destination)
    upstream_port: int
    tls: UpstreamTLS = UpstreamTLS()
    on_enforcer_down: str = "refuse"
    options: dict = dataclasses.field(default_factory=dict)   # protocol-specific keys from agent.yaml


class EventSink(Protocol):
    def emit(self, event_type: str, fields: dict, session_id: Optional[str] = None) -> None: ...


@dataclasses.dataclass
class ConnectionContext:
    session_id: str
    identity: str
    identity_attrs: dict           # principal attributes for policy: unit, user, uid, exe, host, container, claims
    target: TargetInfo
    attribution: Optional[Attribution]
    sink: EventSink
    host: str = ""
    agent_id: str = ""
    # optional layers; None means "not configured": allow everything, mask nothing
    policy: Any = None
    masking: Any = None
    approvals: Any = None
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sink is not None:
            # emit() bound in C (the record writer's own emitter, else a partial): no Python
            # frame between the enforcer and its sink on a call made for every statement and request
            emitter = getattr(self.sink, "emitter", None)
            self.emit = (emitter(self.session_id) if emitter is not None
                         else functools.partial(self.sink.emit, session_id=self.session_id))
        # when_durable(callback): targets with durable_before_forward wait on it (None: the
        # sink stores nothing durably, so such a target refuses to forward)
        self.when_durable = getattr(self.sink, "when_durable", None)

    def emit(self, event_type: str, fields: dict) -> None:
        self.sink.emit(event_type, fields, session_id=self.session_id)


# While the agent stops, a session looks this often for its next idle point to end at.
STOPPING_POLL_S = 0.02


def agent_stopping(ctx: "ConnectionContext"):
    """The agent's stopping asyncio.Event (ctx.extra agent_stopping), or None outside an agent."""
    return (ctx.extra or {}).get("agent_stopping")


def cancelled_reason(ctx: "ConnectionContext") -> str:
    """The end reason of a session whose task was cancelled: the agent's stop (its drain ran
    out), or anything else."""
    stopping = agent_stopping(ctx)
    return "agent_stopping" if stopping is not None and stopping.is_set() else "cancelled"
