import pytest

from tests.bpfenv import ScratchCgroup, require_bpf


@pytest.fixture
def bpf_required():
    require_bpf()


@pytest.fixture
def test_cgroup(bpf_required):
    cg = ScratchCgroup()
    yield cg
    cg.cleanup()
