#!/bin/sh
# Build (or rebuild) a package's venv from the wheels it ships: no network access.
# usage: make-venv.sh /opt/warden/agent
set -eu
root="$1"
py=""
for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        py="$(command -v "$candidate")"; break
    fi
done
if [ -z "$py" ]; then
    echo "warden: Python 3.11 or newer is required (Debian/Ubuntu: python3; Amazon Linux 2023 / RHEL 9: python3.11)" >&2
    exit 1
fi
rm -rf "$root/venv.new"
"$py" -m venv "$root/venv.new"
"$root/venv.new/bin/pip" install --quiet --no-index --disable-pip-version-check \
    --find-links "$root/wheels" warden
rm -rf "$root/venv"
mv "$root/venv.new" "$root/venv"
# the venv was built at its final path under a temporary name: fix the script headers
sed -i "s#$root/venv.new#$root/venv#g" "$root"/venv/bin/* 2>/dev/null || true
