"""`warden-agent check`: a schema.table.column masking rule that cannot take effect is a problem."""
from agent.check import unresolvable_masking_rules
from agent.config import parse

BASE = """\
targets:
  - name: customers-db
    protocol: postgres
    match: {cidr: 127.0.0.2/32, port: 5432}
EXTRA
masking:
  rules:
    - {name: ssn-by-table, column: public.customers.ssn, strategy: redact}
    - {name: emails, column: "*email*", strategy: email}
"""


def test_qualified_rule_without_catalog_dsn_is_reported():
    cfg = parse(BASE.replace("EXTRA\n", ""), "agent.yaml")
    [problem] = unresolvable_masking_rules(cfg)
    assert "ssn-by-table" in problem and "customers-db" in problem and "catalog_dsn" in problem


def test_qualified_rule_with_catalog_dsn_is_fine():
    cfg = parse(BASE.replace("EXTRA", "    catalog_dsn: postgresql://warden@127.0.0.2/app"), "agent.yaml")
    assert unresolvable_masking_rules(cfg) == []
