#!/bin/sh
# warden-collector: a dedicated system user with no shell and no home of its own
set -e
if ! getent group warden-collector >/dev/null; then
    groupadd --system warden-collector
fi
if ! getent passwd warden-collector >/dev/null; then
    useradd --system --gid warden-collector --home-dir /var/lib/warden-collector --no-create-home \
        --shell /usr/sbin/nologin --comment "Warden collector" warden-collector
fi
exit 0
