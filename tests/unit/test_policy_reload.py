"""Policy loading and hot reload: a bad file is refused with file:line, the old policy stays."""
from __future__ import annotations

import os

import pytest

from enforcer.policy import ALLOW, DENY, PolicyError, PolicyStore, load_policies

GOOD = '''// payments may read
@id("read")
permit (principal == Service::"payments", action == Action::"pg:select", resource);
'''

GOOD_DENYING = '''@id("read")
permit (principal == Service::"payments", action == Action::"pg:select", resource);

@id("no-customers")
forbid (principal, action, resource == Table::"db/public.customers");
'''

SYNTAX_ERROR = GOOD + '''
@id("broken")
permit (principal, action == Action::"pg:delete", resource)
when { context.has_where && };
'''

VALIDATION_ERROR = GOOD + '''

@id("typo")
permit (principal, action == Action::"pg:delete", resource)
when { context.has_wher };
'''


def write(path, text, bump=0):
    path.write_text(text)
    if bump:   # make the change visible even within the file system's mtime granularity
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def decide(store, sql="SELECT * FROM customers"):
    (result,) = store.decide_sql("payments", {}, "db", sql)
    return result.decision


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.cedar"
    write(path, GOOD)
    return path


def test_broken_policy_refused_with_line_and_old_policy_kept(policy_file):
    rejected = []
    store = PolicyStore(str(policy_file), on_rejected=rejected.append)
    assert decide(store).kind == ALLOW
    write(policy_file, SYNTAX_ERROR, bump=1)
    assert store.reload() is False
    (error,) = rejected
    assert (error.file, error.line) == (str(policy_file), 5)    # where the broken policy starts
    assert "cannot parse" in error.reason
    assert f"{policy_file}:5:" in str(error)
    assert decide(store).kind == ALLOW and store.generation == 1
    assert store.last_error is error


def test_validation_error_refused_with_line(policy_file):
    rejected = []
    store = PolicyStore(str(policy_file), on_rejected=rejected.append)
    write(policy_file, VALIDATION_ERROR, bump=1)
    assert store.reload() is False
    (error,) = rejected
    assert error.line == 6 and "has_wher" in error.reason and 'policy @id("typo")' in error.reason
    assert decide(store).policy_ids == ("read",)


def test_file_change_reload(policy_file):
    loaded = []
    store = PolicyStore(str(policy_file), on_loaded=loaded.append)
    assert store.maybe_reload() is None
    assert decide(store).kind == ALLOW
    write(policy_file, GOOD_DENYING, bump=1)
    assert store.maybe_reload() is True
    denied = decide(store)
    assert (denied.kind, denied.policy_ids) == (DENY, ("no-customers",))
    assert store.maybe_reload() is None
    assert len(loaded) == 2 and store.cache_stats()["generation"] == 2


def test_file_change_to_broken_reported_once(policy_file):
    rejected = []
    store = PolicyStore(str(policy_file), on_rejected=rejected.append)
    write(policy_file, SYNTAX_ERROR, bump=1)
    assert store.maybe_reload() is False
    assert store.maybe_reload() is None     # the same broken file is not reported again
    assert len(rejected) == 1
    write(policy_file, GOOD_DENYING, bump=2)
    assert store.maybe_reload() is True and decide(store).kind == DENY


def test_reload_clears_the_decision_cache(policy_file):
    store = PolicyStore(str(policy_file))
    assert decide(store).kind == ALLOW
    write(policy_file, GOOD_DENYING, bump=1)
    store.reload()
    assert decide(store).kind == DENY
    assert store.cache_stats()["message_hits"] == 0


def test_reload_with_new_groups(tmp_path):
    path = tmp_path / "p.cedar"
    write(path, '@id("g") permit (principal in Group::"readers", action == Action::"pg:select", resource);')
    store = PolicyStore(str(path), groups={"readers": []})
    assert decide(store).kind == DENY
    assert store.reload(groups={"readers": ["payments"]}) is True
    assert decide(store).policy_ids == ("g",)


def test_first_load_of_a_bad_file_raises(tmp_path):
    path = tmp_path / "bad.cedar"
    write(path, SYNTAX_ERROR)
    with pytest.raises(PolicyError) as caught:
        PolicyStore(str(path))
    assert caught.value.line == 5


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError) as caught:
        load_policies(str(tmp_path / "nope.cedar"))
    assert "cannot read" in caught.value.reason


def test_directory_of_policy_files_names_the_right_file(tmp_path):
    write(tmp_path / "10-base.cedar", GOOD)
    write(tmp_path / "20-extra.cedar", "\n\n" + VALIDATION_ERROR)
    with pytest.raises(PolicyError) as caught:
        load_policies(str(tmp_path))
    assert caught.value.file.endswith("20-extra.cedar") and caught.value.line == 8
    os.remove(tmp_path / "20-extra.cedar")
    assert len(load_policies(str(tmp_path)).names) == 1


@pytest.mark.parametrize("text,expected", [
    ('@id("a") permit (principal, action, resource);\n@id("a") forbid (principal, action, resource);',
     'duplicate @id("a")'),
    ('@id("p") @approval("required") permit (principal, action, resource);', "belongs on a forbid"),
    ('@id("f") @approval("maybe") forbid (principal, action, resource);', "not understood"),
    ('permit (principal, action == Action::"pg:teleport", resource);', "unrecognized action"),
])
def test_annotation_and_schema_problems(tmp_path, text, expected):
    path = tmp_path / "p.cedar"
    write(path, text)
    with pytest.raises(PolicyError) as caught:
        load_policies(str(path))
    assert expected in str(caught.value)


def test_broken_schema_refused(tmp_path, policy_file):
    schema = tmp_path / "schema.cedarschema"
    write(schema, "entity Service {")
    with pytest.raises(PolicyError) as caught:
        load_policies(str(policy_file), str(schema))
    assert caught.value.file == str(schema) and "schema" in caught.value.reason


def test_store_version_changes_on_reload_so_external_caches_invalidate(tmp_path):
    """Bug fix: the Postgres enforcer keys its decision cache on `policy.version`; without it, a
    reloaded policy kept serving the old decisions."""
    from enforcer.policy.store import PolicyStore
    path = tmp_path / "p.cedar"
    path.write_text('@id("a")\npermit (principal, action == Action::"pg:connect", resource);\n')
    store = PolicyStore(str(path))
    before = store.version
    path.write_text('@id("b")\npermit (principal, action == Action::"pg:select", resource);\n')
    assert store.reload()
    assert store.version != before
