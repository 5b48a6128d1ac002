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


def test_client_tls_defaults_are_allow_for_postgres_and_refuse_for_http():
    """An HTTP target intercepts workload TLS only when its config says so."""
    db, api = parse(GOOD, "agent.yaml").targets
    assert (db.client_tls, api.client_tls) == ("allow", "refuse")


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
    assert_refused_at(text, "/etc/warden/agent.yaml", line, fragment)


def assert_refused_at(text: str, filename: str, line: int, fragment: str) -> None:
    """parse() refuses `text`, naming `filename:line` and saying `fragment`."""
    with pytest.raises(ConfigError) as exc:
        parse(text, filename)
    joined = "\n".join(exc.value.problems)
    assert f"{filename}:{line}:" in joined, joined
    assert fragment in joined, joined


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


PG_TARGET = "targets:\n  - name: db\n    protocol: postgres\n    match: {cidr: 127.0.0.10/32, port: 5432}\n"
HTTP_TARGET = "targets:\n  - name: api\n    protocol: http\n    match: {cidr: 127.0.0.10/32, port: 80}\n"


def test_target_options_take_units_and_are_stored_as_numbers():
    cfg = parse(PG_TARGET + "    max_message_bytes: 16MiB\n    startup_timeout: 500ms\n    idle_timeout: 10m\n"
                            "    max_connections: 20\n")
    assert cfg.targets[0].options == {"max_message_bytes": 16 << 20, "startup_timeout": 0.5,
                                      "idle_timeout": 600.0, "max_connections": 20}
    api = parse(HTTP_TARGET + "    allow_connect: true\n    redact_headers: X-Api-Key\n"
                              "    response_timeout: 2m\n").targets[0]
    assert api.options == {"allow_connect": True, "redact_headers": ["X-Api-Key"], "response_timeout": 120.0}
    for target in (PG_TARGET, HTTP_TARGET):
        strict = parse(target + "    durable_before_forward: true\n    durable_timeout: 2s\n").targets[0]
        assert strict.options == {"durable_before_forward": True, "durable_timeout": 2.0}


@pytest.mark.parametrize("text, line, fragment", [
    (PG_TARGET + "    startup_timeout: soon\n", 5, "startup_timeout must be a duration such as 30s"),
    (PG_TARGET + "    max_message_bytes: 0\n", 5, "max_message_bytes must be more than zero"),
    (PG_TARGET + "    max_connections: -1\n", 5, "max_connections must be zero or more"),
    (PG_TARGET + "    max_connections: many\n", 5, "max_connections must be a whole number"),
    (PG_TARGET + "    idle_timout: 5m\n", 5, "unknown key 'idle_timout' for a postgres target"),
    (PG_TARGET + "    redact_headers: [X-Key]\n", 5, "unknown key 'redact_headers' for a postgres target"),
    (HTTP_TARGET + "    allow_connect: yes please\n", 5, "allow_connect must be true or false"),
    (PG_TARGET + "    durable_before_forward: always\n", 5, "durable_before_forward must be true or false"),
    (HTTP_TARGET + "    durable_timeout: 0\n", 5, "durable_timeout must be more than zero"),
    (HTTP_TARGET + "    redact_query: [1]\n", 5, "redact_query must be a list of names"),
    (HTTP_TARGET + "    credentials: [Authorization]\n", 5, "credentials' must be a mapping"),
    (HTTP_TARGET + "    credentials: {header: Authorization}\n", 5, "need both 'header' and 'value_file'"),
    ("targets:\n  - name: t\n    protocol: tcp\n    match: {cidr: 127.0.0.10/32, port: 1}\n"
     "    credentials: {header: X, value_file: /x}\n", 5, "credentials apply to postgres and http"),
    # a misspelt key must not change what is injected, or leave a target in pass-through
    (HTTP_TARGET + "    credentials: {header: Authorization, value_file: /x, schem: Bearer}\n", 5,
     "unknown key 'schem' in credentials"),
    (PG_TARGET + "    credentials:\n      mod: brokered\n      user: app\n      password_file: /x\n", 5,
     "unknown keys mod"),
    (PG_TARGET + "    credentials: {user: app, password_file: /x}\n", 5,
     "password_file, user apply only to mode: brokered"),
    (PG_TARGET + "    upstream_tls:\n      mode: verify-full\n      ca: /x.pem\n      server_nme: db\n", 8,
     "unknown key 'server_nme' in upstream_tls"),
])
def test_bad_target_options_are_refused_with_their_line(text, line, fragment):
    assert_refused_at(text, "a.yaml", line, fragment)


@pytest.mark.parametrize("text, line, fragment", [
    ("collector:\n  url: https://collector.internal\n  enrolment: abc\n", 3, "unknown key 'enrolment' in collector"),
    ("spool:\n  max_byte: 10GiB\n", 2, "unknown key 'max_byte' in spool"),
    ("agent:\n  heartbeat_intervall: 5s\n", 2, "unknown key 'heartbeat_intervall' in agent"),
    ("approvals: {timout: 5m}\n", 1, "unknown key 'timout' in approvals"),
    ("scope:\n  cgroup: [/system.slice]\n", 2, "unknown key 'cgroup' in scope"),
    ("identities:\n  - name: a\n    match: {uid: 1}\n    group: [x]\n", 4, "unknown key 'group' in an identity"),
])
def test_misspelt_keys_in_any_section_are_refused_with_their_line(text, line, fragment):
    """A typo must not leave a default silently in force."""
    assert_refused_at(text, "a.yaml", line, fragment)


def test_on_stop_is_detach_unless_hold_is_asked_and_nothing_else_is_taken():
    assert parse("targets: []\n").on_stop == "detach"
    assert parse("agent:\n  on_stop: hold\ntargets: []\n").on_stop == "hold"
    assert_refused_at("agent:\n  id: a\n  on_stop: keep\n", "a.yaml", 3,
                      "agent.on_stop must be detach (a stop lets governed connects go direct) or hold")


def test_readme_agent_config_is_valid():
    """The configuration reference in the README parses as it is shown."""
    import os
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(path) as f:
        blocks = [b for b in re.findall(r"```yaml\n(.*?)```", f.read(), re.S) if "targets:" in b and "spool:" in b]
    assert len(blocks) == 1
    cfg = parse(blocks[0].replace("masking: {...}", "masking: {}"), "README.md")
    assert [t.name for t in cfg.targets] == ["customers-db", "partner-api"]
    assert cfg.targets[0].options["max_connections"] == 50


def test_stop_drain_is_a_duration_of_five_seconds_unless_set():
    assert parse("targets: []\n").stop_drain == 5.0
    assert parse("agent:\n  stop_drain: 500ms\ntargets: []\n").stop_drain == 0.5
    assert parse("agent:\n  stop_drain: 0\ntargets: []\n").stop_drain == 0.0
    assert_refused_at("agent:\n  id: a\n  stop_drain: soon\n", "a.yaml", 3, "agent.stop_drain must be a duration")
    assert_refused_at("agent:\n  id: a\n  stop_drain: -1s\n", "a.yaml", 3, "agent.stop_drain must be a duration")
