#!/bin/sh
# warden-agent: before removal (not on upgrade). Stopping the agent detaches its BPF programs.
set -e
if [ "${1:-}" = "remove" ] || [ "${1:-}" = "0" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop warden-agent.service >/dev/null 2>&1 || true
        systemctl disable warden-agent.service >/dev/null 2>&1 || true
    fi
fi
exit 0
