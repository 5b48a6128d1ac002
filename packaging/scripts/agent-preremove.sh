#!/bin/sh
# warden-agent: before removal (not on upgrade). Stop the agent and detach its BPF programs.
set -e
if [ "${1:-}" = "remove" ] || [ "${1:-}" = "0" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop warden-agent.service >/dev/null 2>&1 || true
        systemctl disable warden-agent.service >/dev/null 2>&1 || true
    fi
    # with agent.on_stop: hold (or after a crash) the programs stay attached and would refuse
    # governed connects for good once the agent is gone
    /opt/warden/agent/venv/bin/warden-agent release --config /etc/warden/agent.yaml >/dev/null 2>&1 || true
fi
exit 0
