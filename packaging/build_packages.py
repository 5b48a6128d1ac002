#!/usr/bin/env python3
"""`make packages`: warden-agent and warden-collector as .deb and .rpm with nfpm.

The version comes from pyproject.toml (the one place). Each package carries the project's
wheel and its dependency wheels (for CPython 3.11 and 3.12) and builds its venv at install
time from them, with no network access.
"""
from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(ROOT, "dist")
PY_VERSIONS = ("3.11", "3.12")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
MANYLINUX = {"amd64": "x86_64", "arm64": "aarch64"}[ARCH]


def version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["version"]


def build_wheels(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "--quiet", "--disable-pip-version-check", "--wheel-dir", out, ROOT], check=True)
    # Warden's own wheel is built twice: with the native sealing module for this CPython, and
    # pure Python (same records, slower) for the others; pip picks the closer match on install.
    shutil.rmtree(os.path.join(ROOT, "build"), ignore_errors=True)
    subprocess.run(pip + ["wheel", "--quiet", "--disable-pip-version-check", "--no-deps", "--wheel-dir", out, ROOT],
                   check=True, env=dict(os.environ, WARDEN_PURE="1"))
    shutil.rmtree(os.path.join(ROOT, "build"), ignore_errors=True)
    pins = []
    for whl in glob.glob(os.path.join(out, "*.whl")):
        name, ver = os.path.basename(whl).split("-")[:2]
        if name != "warden":
            pins.append(f"{name}=={ver}")
    for py in PY_VERSIONS:
        if py == f"{sys.version_info.major}.{sys.version_info.minor}":
            continue
        # the same pins for another CPython: binary wheels only, never a build on the target
        res = subprocess.run(pip + ["download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
                                    "--python-version", py, "--implementation", "cp",
                                    "--platform", f"manylinux2014_{MANYLINUX}",
                                    "--platform", f"manylinux_2_28_{MANYLINUX}",
                                    "--platform", f"manylinux_2_17_{MANYLINUX}",
                                    "--dest", out, "--no-deps"] + pins, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"warning: wheels for CPython {py} incomplete:\n{res.stderr[-2000:]}", file=sys.stderr)


def nfpm_config(kind: str, ver: str, wheels: str, packager: str) -> dict:
    base = f"/opt/warden/{kind}"
    contents = [
        {"src": os.path.join(wheels, "*.whl"), "dst": f"{base}/wheels/", "file_info": {"mode": 0o644}},
        {"src": os.path.join(ROOT, "packaging/scripts/make-venv.sh"), "dst": f"{base}/make-venv.sh",
         "file_info": {"mode": 0o755}},
        {"src": os.path.join(ROOT, "README.md"), "dst": f"{base}/README.md", "file_info": {"mode": 0o644}},
        {"src": os.path.join(ROOT, f"packaging/systemd/warden-{kind}.service"),
         "dst": f"/usr/lib/systemd/system/warden-{kind}.service", "file_info": {"mode": 0o644}},
        {"dst": "/etc/warden", "type": "dir", "file_info": {"mode": 0o755}},
    ]
    if kind == "agent":
        contents += [
            {"src": os.path.join(ROOT, "packaging/config/agent.yaml"), "dst": "/etc/warden/agent.yaml",
             "type": "config|noreplace", "file_info": {"mode": 0o640}},
            {"src": os.path.join(ROOT, "packaging/policy.example.cedar"), "dst": "/etc/warden/policy.cedar",
             "type": "config|noreplace", "file_info": {"mode": 0o640}},
            {"src": f"{base}/venv/bin/warden-agent", "dst": "/usr/bin/warden-agent", "type": "symlink"},
            {"dst": "/var/lib/warden", "type": "dir", "file_info": {"mode": 0o700}},
        ]
        deb_depends = ["python3 (>= 3.11)", "python3-venv", "python3-bpfcc", "bpftool"]
        deb_recommends = ["linux-headers-amd64 | linux-headers-arm64 | linux-headers-generic | linux-headers-aws"]
        rpm_depends = ["python3.11", "bcc", "python3-bcc", "bpftool"]
        rpm_recommends = ["kernel-devel"]
        description = "Warden agent: eBPF attribution and policy enforcement for machine access to sensitive data"
    else:
        contents += [
            {"src": os.path.join(ROOT, "packaging/config/collector.yaml"), "dst": "/etc/warden/collector.yaml",
             "type": "config|noreplace", "file_info": {"mode": 0o640}},
            {"src": f"{base}/venv/bin/warden-collector", "dst": "/usr/bin/warden-collector", "type": "symlink"},
            {"src": f"{base}/venv/bin/warden", "dst": "/usr/bin/warden", "type": "symlink"},
        ]
        deb_depends = ["python3 (>= 3.11)", "python3-venv"]
        deb_recommends = []
        rpm_depends = ["python3.11", "shadow-utils"]
        rpm_recommends = []
        description = "Warden collector: verified, queryable evidence of machine access to sensitive data"
    scripts = {
        "postinstall": os.path.join(ROOT, f"packaging/scripts/{kind}-postinstall.sh"),
        "preremove": os.path.join(ROOT, f"packaging/scripts/{kind}-preremove.sh"),
        "postremove": os.path.join(ROOT, f"packaging/scripts/{kind}-postremove.sh"),
    }
    pre = os.path.join(ROOT, f"packaging/scripts/{kind}-preinstall.sh")
    if os.path.exists(pre):
        scripts["preinstall"] = pre
    return {
        "name": f"warden-{kind}", "arch": ARCH, "platform": "linux", "version": ver, "release": "1",
        "section": "admin", "priority": "optional", "maintainer": "Warden <security@warden.invalid>",
        "description": description, "vendor": "Warden", "license": "Proprietary",
        "homepage": "https://warden.invalid/",
        "contents": contents, "scripts": scripts,
        "overrides": {
            "deb": {"depends": deb_depends, "recommends": deb_recommends},
            "rpm": {"depends": rpm_depends, "recommends": rpm_recommends},
        },
    }


def find_nfpm() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "nfpm")
    found = here if os.path.exists(here) else shutil.which("nfpm")
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "nfpm"], check=True)
        found = here
    return found


def main() -> int:
    ver = version()
    wheels = os.path.join(DIST, "wheels")
    shutil.rmtree(wheels, ignore_errors=True)
    build_wheels(wheels)
    nfpm = find_nfpm()
    built = []
    for kind in ("agent", "collector"):
        for packager in ("deb", "rpm"):
            cfg_path = os.path.join(DIST, f"nfpm-{kind}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(nfpm_config(kind, ver, wheels, packager), f, sort_keys=False)
            target = os.path.join(DIST, "")
            subprocess.run([nfpm, "package", "--config", cfg_path, "--packager", packager, "--target", target],
                           check=True, capture_output=True)
    for path in sorted(glob.glob(os.path.join(DIST, "warden-*"))):
        if re.search(r"\.(deb|rpm)$", path):
            built.append(path)
            print(f"{os.path.getsize(path) / 1e6:8.1f} MB  {path}")
    return 0 if len(built) >= 4 else 1


if __name__ == "__main__":
    sys.exit(main())
