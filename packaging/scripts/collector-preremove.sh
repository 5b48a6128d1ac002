#!/bin/sh
set -e
if [ "${1:-}" = "remove" ] || [ "${1:-}" = "0" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop warden-collector.service >/dev/null 2>&1 || true
        systemctl disable warden-collector.service >/dev/null 2>&1 || true
    fi
fi
exit 0
