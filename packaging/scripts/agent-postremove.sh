#!/bin/sh
# warden-agent: after removal. Evidence under /var/lib/warden is kept unless purged.
set -e
case "${1:-}" in
    remove|0)
        rm -rf /opt/warden/agent/venv /opt/warden/agent/venv.new ;;
    purge)
        rm -rf /opt/warden/agent/venv /var/lib/warden /var/log/warden ;;
esac
[ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1 || true
exit 0
