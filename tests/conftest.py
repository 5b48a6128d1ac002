import os
import shutil
import tempfile

import pytest

from tests.bpfenv import ScratchCgroup, require_bpf
from tests.native_switch import lanes


_INHERITED_TMPDIR = os.environ.get("TMPDIR", "").rstrip("/")
if os.path.basename(_INHERITED_TMPDIR).startswith("warden-tests-"):
    # a session started by a test of another session (the sanitizer run): it works beside that
    # session's base, not inside it, so its paths (unix sockets) are no longer than at top level
    os.environ["TMPDIR"] = os.path.dirname(_INHERITED_TMPDIR)
    tempfile.tempdir = None


@pytest.fixture(scope="session", autouse=True)
def _session_work_dir(request, tmp_path_factory):
    """Every work directory of this test session (tempfile.mkdtemp: agents, collectors, Postgres
    data dirs) lives under one base of its own, so removing them touches no other session's.
    The base is world-traversable: Postgres (another user) and unprivileged agents reach into it.
    Removed when the session passes; kept for a look when a test failed or with
    WARDEN_KEEP_TEST_DIRS=1."""
    # pytest's own tmp_path stays where it was: unix socket paths there must stay short
    tmp_path_factory.getbasetemp()
    base = tempfile.mkdtemp(prefix="warden-tests-")
    os.chmod(base, 0o755)
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = base          # subprocesses too
    tempfile.tempdir = base
    yield base
    tempfile.tempdir = saved_tempdir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
    if request.session.testsfailed or os.environ.get("WARDEN_KEEP_TEST_DIRS"):
        return
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=[True, False], ids=["c-lane", "python"])
def lane(request):
    """Runs a test with the Postgres session's C lanes and with its Python loops."""
    from enforcer.postgres import native
    if request.param and native.lanes is None:
        pytest.skip("the C lanes are not built or are off (WARDEN_PURE_PYTHON=1)")
    with lanes(request.param):
        yield request.param


@pytest.fixture
def bpf_required():
    require_bpf()


@pytest.fixture
def test_cgroup(bpf_required):
    cg = ScratchCgroup()
    yield cg
    cg.cleanup()
