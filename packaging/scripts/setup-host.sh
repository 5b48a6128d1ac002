#!/bin/sh
# Installs what Warden's build, tests and demo need on a Debian/Ubuntu host.
# Idempotent: installs only what is missing. Needs root.
set -eu

need=""
for pkg in python3-bpfcc bpftool iproute2 postgresql postgresql-contrib curl openssl python3-venv python3-dev rpm wrk pgbouncer libssl-dev gcc tshark; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
kver="$(uname -r)"
if [ ! -e "/lib/modules/$kver/build/Makefile" ]; then
    # headers for the running kernel if the archive has them, else the distribution's current ones
    if ! ls -d /usr/src/linux-headers-*amd64 /usr/src/linux-headers-*arm64 >/dev/null 2>&1; then
        need="$need linux-headers-$(dpkg --print-architecture)"
    fi
fi
if [ -n "$need" ]; then
    echo "setup: installing:$need"
    apt-get update -qq
    # prefer headers that match the running kernel exactly
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
        need="$(echo "$need" | sed "s/linux-headers-[a-z0-9]*$/linux-headers-$kver/")"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

if [ ! -e "/lib/modules/$kver/build/Makefile" ]; then
    build="$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)"
    if [ -z "$build" ]; then
        echo "setup: no kernel headers found under /usr/src; BPF programs cannot be compiled" >&2
        exit 1
    fi
    common="$(echo "$build" | sed -E 's/-(cloud-)?(amd64|arm64)$/-common/')"
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$build" "/lib/modules/$kver/build"
    [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$kver/source"
    echo "setup: no headers packaged for kernel $kver; linked $build (and $common) into /lib/modules/$kver." \
         "Warden's BPF programs use only UAPI structs and tracepoint formats, so nearby headers serve."
fi
