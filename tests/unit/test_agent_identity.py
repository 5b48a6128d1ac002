"""Identity rules, process enrichment patterns and address forms used in the BPF maps."""
import os

import pytest

from agent.bpfmgr import CONN_INFO, mapped16, parse_conn_info, unmap16
from agent.config import IdentityRule
from agent.identity import IdentityResolver, unknown_identity
from agent.procinfo import container_id, describe, systemd_unit
from enforcer.context import ProcessInfo


def proc(**kw):
    base = dict(pid=10, tgid=10, uid=1000, gid=1000, comm="python3", cgroup_id=5,
                cgroup_path="/system.slice/payments.service", exe="/usr/bin/python3.11",
                user="payments", systemd_unit="payments.service")
    base.update(kw)
    return ProcessInfo(**base)


def test_first_matching_rule_wins_and_all_keys_must_hold():
    resolver = IdentityResolver([
        IdentityRule("payments-batch", {"systemd_unit": "payments.service", "uid": 0}),
        IdentityRule("payments", {"systemd_unit": "payments*.service", "exe": "/usr/bin/python3*"}, ("pci",)),
        IdentityRule("anything-python", {"comm": "python*"}),
    ], host="ip-10-0-0-1")
    name, attrs = resolver.resolve(proc())
    assert name == "payments"
    assert attrs["groups"] == ["pci"] and attrs["host"] == "ip-10-0-0-1" and attrs["unit"] == "payments.service"
    assert resolver.resolve(proc(uid=0))[0] == "payments-batch"
    assert resolver.resolve(proc(systemd_unit="cron.service", cgroup_path="/system.slice/cron.service"))[0] == "anything-python"


def test_container_and_claim_rules():
    cid = "a" * 64
    resolver = IdentityResolver([
        IdentityRule("etl", {"claim": {"sub": "etl-job"}}),
        IdentityRule("containerised", {"container": "a*"}),
    ])
    assert resolver.resolve(proc(container_id=cid))[0] == "containerised"
    name, attrs = resolver.resolve(proc(), claims={"sub": "etl-job"})
    assert name == "etl" and attrs["claims"] == {"sub": "etl-job"}


def test_unknown_identity_is_deterministic():
    assert unknown_identity(proc()) == "unknown:payments.service"
    assert unknown_identity(proc(systemd_unit="")) == "unknown:python3.11"
    assert unknown_identity(proc(systemd_unit="", exe="")) == "unknown:python3"
    assert IdentityResolver([]).resolve(proc())[0] == "unknown:payments.service"


@pytest.mark.parametrize("path, expected", [
    ("/system.slice/docker-" + "b" * 64 + ".scope", "b" * 64),
    ("/docker/" + "c" * 64, "c" * 64),
    ("/system.slice/containerd.service/kubepods-besteffort.slice/cri-containerd-" + "d" * 64 + ".scope", "d" * 64),
    ("/ecs/8f1c6a8e-1b8a-4bde-9a7d-0f6e4e1c1a11/" + "e" * 64, "e" * 64),
    ("/system.slice/payments.service", ""),
])
def test_container_ids(path, expected):
    assert container_id(path) == expected


def test_systemd_unit_is_innermost():
    assert systemd_unit("/system.slice/payments.service") == "payments.service"
    assert systemd_unit("/user.slice/user-1000.slice/session-3.scope") == "session-3.scope"
    assert systemd_unit("/warden-test-x") == ""


def test_describe_live_and_exited_processes():
    me = describe(os.getpid(), os.getpid(), os.getuid(), os.getgid(), "pytest", 1)
    assert me.exe and os.path.exists(me.exe) and me.cmdline and me.start_time > 0
    gone = describe(2 ** 22 + 12345, 1, 0, 0, "ghost", 0)
    assert gone.exe == "" and gone.comm == "ghost" and gone.user == "root"


def test_address_forms_round_trip():
    assert mapped16("127.0.0.2") == b"\0" * 10 + b"\xff\xff\x7f\x00\x00\x02"
    assert unmap16(mapped16("127.0.0.2")) == "127.0.0.2"
    assert unmap16(mapped16("::1")) == "::1"
    assert mapped16("::ffff:127.1.2.3") == mapped16("127.1.2.3")


def test_conn_info_layout_matches_c_struct():
    raw = CONN_INFO.pack(99, 7, 123, mapped16("127.0.0.5"), 3, 41, 42, 1000, 1001, 5432, 4, 5, b"psql\0")
    cap = parse_conn_info(raw)
    assert (cap.cookie, cap.cgroup_id, cap.orig_ip, cap.orig_port, cap.target_id) == (99, 7, "127.0.0.5", 5432, 3)
    assert (cap.tgid, cap.pid, cap.uid, cap.gid, cap.comm) == (41, 42, 1000, 1001, "psql")
    assert cap.governed and cap.redirected and not cap.bypass


@pytest.mark.parametrize("argv, expected", [
    (["psql", "postgresql://app:s3cret@db:5432/x"], ["psql", "postgresql://app:[redacted]@db:5432/x"]),
    (["psql", "host=db password=s3cret user=app"], ["psql", "host=db password=[redacted] user=app"]),
    (["tool", "--password", "s3cret", "--user", "x"], ["tool", "--password", "[redacted]", "--user", "x"]),
    (["tool", "--token=abc.def"], ["tool", "--token=[redacted]"]),
    (["curl", "https://api/x?api_key=K123&q=1"], ["curl", "https://api/x?api_key=[redacted]&q=1"]),
    (["python3", "job.py", "--limit", "5"], ["python3", "job.py", "--limit", "5"]),
])
def test_cmdline_secrets_are_redacted(argv, expected):
    from agent.procinfo import redact_cmdline
    assert redact_cmdline(argv) == expected
