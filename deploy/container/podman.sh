#!/usr/bin/env bash
# podman as this machine allows it: the runc runtime (crun fails on this cgroup setup), overlay storage in a
# store of our own (vfs is very slow), cgroupfs and file events (no systemd or journald here). Without systemd
# podman cannot put a timer on an image's HEALTHCHECK and says so on every run; test.sh runs the check itself,
# so those lines are dropped.
set -euo pipefail
STORE=${LSTMSERVE_PODMAN_STORE:-/var/tmp/lstmserve-podman}
exec podman --root "$STORE/root" --runroot "$STORE/run" --storage-driver overlay \
    --runtime runc --cgroup-manager cgroupfs --events-backend file "$@" \
    2> >(grep -v "unable to get systemd connection" >&2)
