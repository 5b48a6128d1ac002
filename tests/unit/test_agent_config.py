"""agent.yaml validation: every problem is reported with file:line, and good configs parse."""
import ipaddress

import pytest

from agent.config import ConfigError, parse, resolve_target_networks

GOOD = """\
agent:
  state_dir: /tmp/warden-state
scope:
  cgroups: [/system.slice]
targets:
  - name: customers-db
    protocol: postgres
    match: {cidr: [127.0.1.0/24, "2001:db8::/64"], port: 5432}
    upstream_tls: {mode: verify-full, ca: /etc/warden/rds-ca.pem}
  - name: partner-api
    protocol: http
    match: {hostname: localhost, port: 443}
    on_enforcer_down: bypass
identities:
  - name: payments
    match: {systemd_unit: payments.service}
    groups: [pci]
spool:
  max_bytes: 2GiB
approvals:
  timeout: 5m
"""


def test_good_config_parses_with_defaults():
    cfg = parse(GOOD, "agent.yaml")
    assert cfg.scope_cgroups == ("/system.slice",)
    db, api = cfg.targets
    assert db.match.cidrs == ("127.0.1.0/24", "2001:db8::/64") and db.match.port == 5432
    assert db.upstream_tls == "verify-full" and db.upstream_ca == "/etc/warden/rds-ca.pem"
    assert db.listen_port == 15400 and api.listen_port == 15401
    assert api.on_enforcer_down == "bypass" and db.on_enforcer_down == "refuse"
    assert cfg.spool.max_bytes == 2 << 30 and cfg.spool.on_full == "refuse"
    assert cfg.spool.path == "/tmp/warden-state/spool"
    assert cfg.approvals_timeout == 300
    assert cfg.identities[0].groups == ("pci",)


def test_default_scope_is_whole_host():
    cfg = parse("targets: []\n")
    assert cfg.scope_cgroups == ("/",)


@pytest.mark.parametrize("text, line, fragment", [
    ("targets:\n  - name: db\n    protocol: mysql\n    match: {cidr: 127.0.0.10/32, port: 3306}\n", 3, "protocol must be"),
    ("targets:\n  - name: db\n    match: {cidr: 127.0.0.300/32, port: 5432}\n", 3, "not a CIDR"),
    ("targets:\n  - name: db\n    match: {cidr: 127.0.0.10/32}\n", 3, "match.port"),
    ("targets:\n  - name: db\n    match:\n      cidr: 127.0.0.10/32\n      port: 99999\n", 5, "match.port"),
    ("identities:\n  - name: x\n    match: {shoe_size: 9}\n", 3, "unknown identity match key"),
    ("spool:\n  on_full: drop\n", 2, "on_full"),
    ("colector:\n  url: https://x\n", 1, "unknown key 'colector'"),
    ("targets:\n  - name: a\n    match: {cidr: 127.0.0.10/32, port: 1}\n    upstream_tls: verify-full\n", 4, "needs a CA"),
    ("agent: {}\nagent: {}\n", 2, "duplicate key"),
    ("targets: [\n", 2, "YAML syntax error"),
])
def test_errors_name_file_and_line(text, line, fragment):
    with pytest.raises(ConfigError) as exc:
        parse(text, "/etc/warden/agent.yaml")
    joined = "\n".join(exc.value.problems)
    assert f"/etc/warden/agent.yaml:{line}:" in joined, joined
    assert fragment in joined


def test_all_problems_reported_at_once():
    text = "targets:\n  - name: a\n    protocol: ftp\n    match: {cidr: nope, port: 0}\n"
    with pytest.raises(ConfigError) as exc:
        parse(text, "a.yaml")
    assert len(exc.value.problems) == 3


def test_duplicate_listen_ports_refused():
    text = ("targets:\n  - name: a\n    match: {cidr: 127.0.0.10/32, port: 1}\n    listen_port: 16000\n"
            "  - name: b\n    match: {cidr: 127.0.0.11/32, port: 1}\n    listen_port: 16000\n")
    with pytest.raises(ConfigError) as exc:
        parse(text, "a.yaml")
    assert "a.yaml:7: listen_port 16000 is used by another target" in exc.value.problems


def test_hostname_targets_resolve_to_addresses():
    cfg = parse("targets:\n  - name: a\n    match: {hostname: localhost, port: 5432}\n")
    nets = resolve_target_networks(cfg.targets[0])
    assert ipaddress.ip_network("127.0.0.1/32") in nets


def test_packaged_default_config_is_valid():
    """Empty keys (only comments under them) are null, not errors: the shipped file must load."""
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "config", "agent.yaml")
    with open(path) as f:
        cfg = parse(f.read(), path)
    assert cfg.targets == () and cfg.policy_path == "/etc/warden/policy.cedar"
    assert cfg.spool.on_full == "refuse" and cfg.spool.max_bytes == 1 << 30


def test_brokered_credentials_are_validated_with_line():
    text = ("targets:\n  - name: db\n    protocol: postgres\n    match: {cidr: 127.0.0.10/32, port: 5432}\n"
            "    credentials:\n      mode: brokered\n      user: app\n      password_file: relative/path\n")
    with pytest.raises(ConfigError) as exc:
        parse(text, "a.yaml")
    assert any(p.startswith("a.yaml:5:") and "password_file" in p for p in exc.value.problems)
