import glob
import os
import shutil
import tempfile

import pytest

from tests.bpfenv import ScratchCgroup, require_bpf

# work directories tests create with tempfile.mkdtemp (agents, collectors, Postgres data dirs
# that other users must reach, so not under pytest's private tmp_path)
_TEST_DIR_PREFIXES = ("warden-agent-http-", "warden-agent-test-", "warden-collector-pg-", "warden-demo-test-",
                      "warden-direct-ssl-", "warden-e2e-agent-", "warden-http-approvals-", "warden-notify-",
                      "warden-notify-agent-", "warden-ops-", "warden-pg-", "warden-test-collector-", "warden-tls-",
                      "warden-rel-")


def _test_dirs() -> set:
    base = tempfile.gettempdir()
    return {path for prefix in _TEST_DIR_PREFIXES for path in glob.glob(os.path.join(base, prefix + "*"))}


@pytest.fixture(scope="session", autouse=True)
def _remove_test_work_dirs(request):
    """Work directories this session created are removed when it passes (kept for a look when a
    test failed, or with WARDEN_KEEP_TEST_DIRS=1)."""
    before = _test_dirs()
    yield
    if request.session.testsfailed or os.environ.get("WARDEN_KEEP_TEST_DIRS"):
        return
    for path in _test_dirs() - before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bpf_required():
    require_bpf()


@pytest.fixture
def test_cgroup(bpf_required):
    cg = ScratchCgroup()
    yield cg
    cg.cleanup()
