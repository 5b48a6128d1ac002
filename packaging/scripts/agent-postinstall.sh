#!/bin/sh
# warden-agent: after install or upgrade
set -e
/opt/warden/agent/make-venv.sh /opt/warden/agent
/opt/warden/agent/venv/bin/python -m agent.bccfind --link /opt/warden/agent/venv >/dev/null 2>&1 || \
    echo "warden-agent: BCC's Python module was not found; install python3-bpfcc (Debian/Ubuntu) or python3-bcc (Amazon Linux/RHEL)" >&2
install -d -m 0700 -o root -g root /var/lib/warden /var/log/warden
chmod 0640 /etc/warden/agent.yaml 2>/dev/null || true
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    # deb: "configure <old-version>" on upgrade; rpm: $1 >= 2 on upgrade
    if { [ "${1:-}" = "configure" ] && [ -n "${2:-}" ]; } || [ "${1:-0}" -ge 2 ] 2>/dev/null; then
        # a handover: the old run leaves its programs attached until the new one takes them
        # over, so governed connects are refused during the upgrade, never sent direct
        if systemctl is-active --quiet warden-agent.service; then
            /opt/warden/agent/venv/bin/warden-agent restart >/dev/null 2>&1 || \
                systemctl try-restart warden-agent.service >/dev/null 2>&1 || true
        fi
    else
        # enabled, not started: it governs nothing until /etc/warden/agent.yaml names targets
        systemctl enable warden-agent.service >/dev/null 2>&1 || true
        echo "warden-agent installed. Edit /etc/warden/agent.yaml, run 'warden-agent check', then 'systemctl start warden-agent'."
    fi
fi
exit 0
