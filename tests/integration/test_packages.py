"""The deb/rpm packages: contents, modes, conffiles, scriptlets, dependencies; a real install
and removal of the agent .deb on this machine; systemd hardening scores of both units."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = os.path.join(ROOT, "packaging", "systemd")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="package install tests need root")


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def packages():
    res = run([sys.executable, os.path.join(ROOT, "packaging", "build_packages.py")], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    found = {os.path.basename(p): p for p in glob.glob(os.path.join(ROOT, "dist", "warden-*")) if p.endswith((".deb", ".rpm"))}
    assert len(found) == 4, found
    return found


def pick(packages, kind, ext):
    return next(p for n, p in packages.items() if n.startswith(f"warden-{kind}") and n.endswith(ext))


def test_deb_metadata_and_contents(packages):
    agent = pick(packages, "agent", ".deb")
    info = run(["dpkg-deb", "-I", agent]).stdout
    assert re.search(r"Depends: .*python3 \(>= 3\.11\).*python3-bpfcc", info)
    assert "Recommends: linux-headers" in info
    for script in ("postinst", "prerm", "postrm"):
        assert script in info
    listing = run(["dpkg-deb", "-c", agent]).stdout
    assert re.search(r"-rw-r--r-- .*\./opt/warden/agent/wheels/warden-\d", listing)
    # Warden's wheel twice: native for the build's CPython, pure Python for the others
    assert re.search(r"/wheels/warden-[\d.]+-cp3\d+-cp3\d+-linux_\w+\.whl", listing), listing
    assert re.search(r"/wheels/warden-[\d.]+-py3-none-any\.whl", listing), listing
    assert re.search(r"-rw-r----- .*\./etc/warden/agent\.yaml", listing)
    assert re.search(r"-rw-r----- .*\./etc/warden/policy\.cedar", listing)
    assert re.search(r"drwx------ .*\./var/lib/warden/", listing)
    assert "./usr/lib/systemd/system/warden-agent.service" in listing
    conffiles = run(["dpkg-deb", "-f", agent, "Conffiles"]).stdout + run(
        ["sh", "-c", f"dpkg-deb --ctrl-tarfile {agent} | tar -xO ./conffiles"]).stdout
    assert "/etc/warden/agent.yaml" in conffiles and "/etc/warden/policy.cedar" in conffiles
    collector = pick(packages, "collector", ".deb")
    cinfo = run(["dpkg-deb", "-I", collector]).stdout
    assert "preinst" in cinfo and "python3-bpfcc" not in cinfo


@pytest.mark.skipif(shutil.which("rpm") is None, reason="rpm tool not installed")
def test_rpm_metadata(packages):
    agent = pick(packages, "agent", ".rpm")
    requires = run(["rpm", "-qp", "--requires", agent]).stdout
    for dep in ("python3.11", "bcc", "python3-bcc", "bpftool"):
        assert re.search(rf"^{re.escape(dep)}\b", requires, re.M), requires
    scripts = run(["rpm", "-qp", "--scripts", agent]).stdout
    assert "make-venv.sh" in scripts and "systemctl stop warden-agent" in scripts
    files = run(["rpm", "-qp", "-l", agent]).stdout
    assert "/etc/warden/agent.yaml" in files and "/usr/lib/systemd/system/warden-agent.service" in files
    configs = run(["rpm", "-qp", "-c", agent]).stdout
    assert "/etc/warden/agent.yaml" in configs
    collector = pick(packages, "collector", ".rpm")
    cscripts = run(["rpm", "-qp", "--scripts", collector]).stdout
    assert "useradd --system" in cscripts


def test_agent_deb_installs_checks_and_removes(packages):
    if "install ok installed" in run(["dpkg", "-s", "warden-agent"]).stdout:
        pytest.skip("warden-agent is already installed on this machine; not touching it")
    agent = pick(packages, "agent", ".deb")
    res = run(["dpkg", "-i", agent], timeout=600)
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert os.access("/opt/warden/agent/venv/bin/warden-agent", os.X_OK)
        assert os.stat("/var/lib/warden").st_mode & 0o777 == 0o700
        check = run(["/opt/warden/agent/venv/bin/warden-agent", "check", "--config", "/etc/warden/agent.yaml"],
                    timeout=120)
        # the packaged default config is valid and this host can run BPF
        assert "config /etc/warden/agent.yaml is valid" in check.stdout, check.stdout + check.stderr
        assert check.returncode == 0, check.stdout
        assert run(["/usr/bin/warden-agent", "--help"]).returncode == 0
        # the venv took the wheel with the native sealing module (this CPython), not the pure one
        native = run(["/opt/warden/agent/venv/bin/python", "-c", "import records.codec as c; print(c.NATIVE)"])
        assert native.stdout.strip() == "True", native.stdout + native.stderr
    finally:
        removed = run(["dpkg", "-r", "warden-agent"], timeout=300)
    assert removed.returncode == 0, removed.stderr
    assert not os.path.exists("/opt/warden/agent/venv")
    assert os.path.exists("/etc/warden/agent.yaml")          # conffiles stay until purge
    run(["dpkg", "-P", "warden-agent"], timeout=300)
    assert not os.path.exists("/etc/warden/agent.yaml")


@pytest.mark.parametrize("unit, limit", [("warden-collector.service", 2.5), ("warden-agent.service", 6.0)])
def test_systemd_exposure(unit, limit):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    res = run(["systemd-analyze", "security", "--offline=true", "--no-pager", os.path.join(UNITS, unit)])
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= limit, res.stdout


@pytest.mark.parametrize("unit", ["warden-agent.service", "warden-collector.service"])
def test_units_have_no_key_systemd_would_ignore(unit):
    """systemd skips a key it does not know with a warning, so a misspelt or too-new directive
    (RestartKillSignal needs systemd 244) would silently not apply: this machine's systemd
    must read every line."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", os.path.join(UNITS, unit)],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if "is not executable" not in line]          # not installed here: expected
    assert problems == [], "\n".join(problems)


def test_the_agent_unit_and_upgrades_restart_by_handover():
    """A handover exits EXIT_HANDOVER with the programs attached: the unit must restart it at
    once and not count it as a failure, `systemctl restart` must ask for one (a stop and start
    would leave governed connects going direct in between) while `systemctl stop` still sends
    SIGTERM, and an upgrade must restart the agent that way."""
    from agent.daemon import EXIT_HANDOVER, HANDOVER_SIGNAL
    with open(os.path.join(UNITS, "warden-agent.service")) as f:
        unit = f.read()
    assert re.search(rf"^RestartForceExitStatus={EXIT_HANDOVER}$", unit, re.M), unit
    assert re.search(rf"^SuccessExitStatus={EXIT_HANDOVER}$", unit, re.M), unit
    assert re.search(rf"^RestartKillSignal={HANDOVER_SIGNAL.name}$", unit, re.M), unit
    assert not re.search(r"^KillSignal=", unit, re.M), unit          # a stop is SIGTERM: detach
    assert re.search(r"^FileDescriptorStoreMax=[1-9]\d*$", unit, re.M), unit     # listeners kept meanwhile
    with open(os.path.join(os.path.dirname(UNITS), "scripts", "agent-postinstall.sh")) as f:
        postinst = f.read()
    upgrade = postinst[postinst.index("on upgrade"):postinst.index("else")]
    assert "/opt/warden/agent/venv/bin/warden-agent restart" in upgrade
    assert upgrade.index("warden-agent restart") < upgrade.index("try-restart")     # the fallback only
