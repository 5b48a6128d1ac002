"""`warden-agent check`: a schema.table.column masking rule without the catalog is noted (it is then
matched by the table names statements use)."""
from agent.check import uncataloged_masking_rules
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


def test_qualified_rule_without_catalog_dsn_is_noted():
    cfg = parse(BASE.replace("EXTRA\n", ""), "agent.yaml")
    [note] = uncataloged_masking_rules(cfg)
    assert "ssn-by-table" in note and "customers-db" in note and "catalog_dsn" in note
    assert "table names statements use" in note


def test_qualified_rule_with_catalog_dsn_is_fine():
    cfg = parse(BASE.replace("EXTRA", "    catalog_dsn: postgresql://warden@127.0.0.2/app"), "agent.yaml")
    assert uncataloged_masking_rules(cfg) == []
