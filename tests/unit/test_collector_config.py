"""collector.yaml parsing, time parsing, database URLs."""
import pytest

from collector.config import ConfigError, load_config, parse_listen
from collector.storage.engine import DatabaseURLError, normalize_url
from collector.timeparse import TimeFormatError, format_ns, parse_duration_ns, parse_time_ns

NOW = 1_714_530_900 * 10**9


def test_full_config(tmp_path):
    path = tmp_path / "collector.yaml"
    path.write_text("listen: 0.0.0.0:8443\ndb: postgresql://warden@127.0.0.1:5432/warden\n"
                    "tls:\n  cert: /etc/warden/c.pem\n  key: /etc/warden/k.pem\nstate_dir: /var/lib/x\n"
                    "tokens:\n  issuer: me\n  audience: us\nretention:\n  days: 400\n"
                    "approvals:\n  timeout: 10m\nwebhook:\n  url: http://127.0.0.1:9/hook\n  secret: s\n")
    config = load_config(path)
    assert config.listen_host_port() == ("0.0.0.0", 8443)
    assert (config.tls_cert, config.tls_key) == ("/etc/warden/c.pem", "/etc/warden/k.pem")
    assert (config.tokens.issuer, config.tokens.audience, config.retention_days) == ("me", "us", 400)
    assert config.approval_timeout_ns == 600 * 10**9 and config.webhook.secret == "s"
    assert load_config(None).database_url.startswith("sqlite:///")


@pytest.mark.parametrize("text, message", [
    ("listen: 127.0.0.1:8443\nbogus: 1\n", ":2: unknown key 'bogus'"),
    ("retention:\n  days: many\n", ":2: retention.days must be a non-negative whole number"),
    ("tls:\n  cert: /c.pem\n", ":1: tls needs both cert and key"),
    ("listen: nowhere\n", ":1: bad listen address"),
    ("db: mysql://x\n", ":1: db must be sqlite"),
    ("approvals:\n  timeout: soon\n", ":1: approvals.timeout: bad duration"),
    ("- a\n- b\n", ":1: the top level must be a mapping"),
    ("tokens: yes\n", ":1: 'tokens' must be a mapping"),
    ("ingest:\n  workers: -1\n", ":2: ingest.workers must be a non-negative whole number"),
])
def test_config_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}{message}" in str(caught.value)


def test_ingest_workers(tmp_path):
    path = tmp_path / "collector.yaml"
    path.write_text("ingest:\n  workers: 0\n")
    assert load_config(path).ingest_workers == 0
    assert load_config(None).ingest_workers is None


def test_times_and_durations():
    assert parse_duration_ns("5m") == 300 * 10**9 and parse_duration_ns("1.5h") == 5400 * 10**9
    assert parse_time_ns("2h", now=NOW) == NOW - 7200 * 10**9
    assert parse_time_ns("2024-05-01T02:35:00Z") == NOW
    assert parse_time_ns("2024-05-01T04:35:00+02:00") == NOW
    assert parse_time_ns("2024-05-01 02:35:00") == NOW  # naive means UTC
    assert parse_time_ns("1714530900") == NOW and parse_time_ns(str(NOW)) == NOW
    assert parse_time_ns("2024-05-01T02:35:00.000001Z") == NOW + 1000
    assert format_ns(NOW + 5000) == "2024-05-01T02:35:00.000005Z"
    for bad in ("yesterday", "5 parsecs", ""):
        with pytest.raises(TimeFormatError):
            parse_time_ns(bad)


def test_listen_and_urls():
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ConfigError):
        parse_listen("127.0.0.1:99999")
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(DatabaseURLError):
        normalize_url("mysql://x")
