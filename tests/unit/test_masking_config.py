"""load_masking: validation with file:line, separate rules files, hash keys, targets and exemptions."""
import pytest
import yaml

from enforcer.masking import MaskingConfigError, load_masking


def where_from(text, filename="agent.yaml"):
    """A `where` like agent/config's: key path -> file:line, from the YAML node marks."""
    lines = {}

    def walk(node, path):
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    walk(yaml.compose(text), ())

    def where(path):
        while path and path not in lines:
            path = path[:-1]
        return f"{filename}:{lines.get(path, 1)}"
    return where


AGENT_YAML = """\
targets: []
masking:
  rules:
    - column: "*ssn*"
      strategy: partial
    - column: public.customers
      strategy: redact
    - column: card
      strategy: scramble
    - scan_all_text: true
      detectors: [card, passport]
    - column: x
      json_key: y
    - column: email
      strategy: hash
      colour: blue
"""


def test_every_problem_is_reported_with_file_and_line():
    data = yaml.safe_load(AGENT_YAML)
    with pytest.raises(MaskingConfigError) as e:
        load_masking(data["masking"], where_from(AGENT_YAML))
    problems = e.value.problems
    assert any(p.startswith("agent.yaml:6: column 'public.customers'") for p in problems), problems
    assert any(p.startswith("agent.yaml:9: unknown strategy 'scramble'") for p in problems), problems
    assert any(p.startswith("agent.yaml:11: unknown detector 'passport'") for p in problems), problems
    assert any(p.startswith("agent.yaml:12: a rule selects with exactly one of") for p in problems), problems
    assert any(p.startswith("agent.yaml:15: strategy hash needs a per-deployment key") for p in problems), problems
    assert any(p.startswith("agent.yaml:16: unknown key 'colour'") for p in problems), problems
    assert len(problems) == 6


def test_default_where_says_masking():
    with pytest.raises(MaskingConfigError) as e:
        load_masking({"rules": [{"column": "a", "on_binary": "explode"}]})
    assert e.value.problems == ["masking: on_binary must be null or error, got 'explode'"]


def test_rules_file_named_by_path_reports_its_own_lines(tmp_path):
    rules = tmp_path / "masking.yaml"
    rules.write_text("rules:\n  - column: ssn\n    strategy: partial\n  - column: card\n    keep_last: -1\n")
    with pytest.raises(MaskingConfigError) as e:
        load_masking({"path": str(rules)})
    assert e.value.problems == [f"{rules}:5: keep_last must be a whole number >= 0"]


def test_rules_file_relative_to_base_dir_and_hash_key_file(tmp_path):
    (tmp_path / "mask.key").write_bytes(b"0123456789abcdef0123456789abcdef\n")
    (tmp_path / "masking.yaml").write_text(
        "masking:\n  hash_key_file: mask.key\n  rules:\n    - column: email\n      strategy: hash\n")
    engine = load_masking({"path": "masking.yaml"}, base_dir=str(tmp_path))
    assert engine.for_session("svc", {}, "db") is not None


def test_missing_rules_file_and_short_key(tmp_path):
    with pytest.raises(MaskingConfigError, match="cannot read masking rules file"):
        load_masking({"path": str(tmp_path / "nope.yaml")})
    (tmp_path / "k").write_bytes(b"short")
    with pytest.raises(MaskingConfigError, match="holds 5 bytes"):
        load_masking({"hash_key_file": str(tmp_path / "k")})


def test_path_excludes_inline_rules():
    with pytest.raises(MaskingConfigError, match="move rules there"):
        load_masking({"path": "/x.yaml", "rules": []})


def test_custom_detector_errors():
    with pytest.raises(MaskingConfigError) as e:
        load_masking({"detectors": [{"name": "card", "regex": "x"}, {"name": "emp", "regex": "EMP-("}]})
    assert "already taken by a built-in detector" in e.value.problems[0]
    assert "does not compile" in e.value.problems[1]


def test_yaml_null_spellings_of_strategy_and_on_binary():
    engine = load_masking(yaml.safe_load("rules:\n  - column: ssn\n    strategy: null\n    on_binary: null\n"))
    masker = engine.for_session("svc", {}, "db")
    assert masker.ruleset.column_whole[0].strategy.apply("x") is None


def test_targets_and_exemptions_select_sessions():
    engine = load_masking({"exempt": ["break-glass-*"], "rules": [
        {"column": "ssn", "targets": ["customers-*"], "exempt": ["fraud-analytics"]},
        {"json_key": "token", "target": "billing-api"}]})
    assert engine.for_session("svc", {}, "customers-db") is not None
    assert engine.for_session("fraud-analytics", {}, "customers-db") is None
    assert engine.for_session("break-glass-ops", {}, "billing-api") is None
    assert engine.for_session("svc", {}, "inventory-db") is None
    only_json = engine.for_session("fraud-analytics", {}, "billing-api")
    assert only_json is not None and not only_json.ruleset.column_whole


def test_empty_masking_section_masks_nothing():
    assert load_masking({}).for_session("svc", {}, "db") is None
