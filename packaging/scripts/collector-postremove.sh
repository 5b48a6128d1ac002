#!/bin/sh
# warden-collector: after removal. The evidence database is kept unless purged.
set -e
case "${1:-}" in
    remove|0)
        rm -rf /opt/warden/collector/venv /opt/warden/collector/venv.new ;;
    purge)
        rm -rf /opt/warden/collector/venv /var/lib/warden-collector
        userdel warden-collector >/dev/null 2>&1 || true ;;
esac
[ -d /run/systemd/system ] && systemctl daemon-reload >/dev/null 2>&1 || true
exit 0
