#!/bin/sh
# warden-collector: after install or upgrade
set -e
/opt/warden/collector/make-venv.sh /opt/warden/collector
install -d -m 0700 -o warden-collector -g warden-collector /var/lib/warden-collector
chgrp warden-collector /etc/warden/collector.yaml 2>/dev/null && chmod 0640 /etc/warden/collector.yaml || true
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if { [ "${1:-}" = "configure" ] && [ -n "${2:-}" ]; } || [ "${1:-0}" -ge 2 ] 2>/dev/null; then
        systemctl try-restart warden-collector.service >/dev/null 2>&1 || true
    else
        systemctl enable warden-collector.service >/dev/null 2>&1 || true
        echo "warden-collector installed. Edit /etc/warden/collector.yaml (TLS certificate), then 'systemctl start warden-collector'."
    fi
fi
exit 0
