#!/usr/bin/env bash
# Makes a local stand-in for python:3.11-slim-bookworm (no image registry is reachable here): a minimal Debian
# bookworm root file system, whose python3 is 3.11, imported into podman. It trusts the same extra CA
# certificates as this machine, so pip inside the build can reach PyPI through this network's egress proxy.
# Usage: base-image.sh IMAGE_NAME   (does nothing if the image exists)
set -euo pipefail
IMAGE=${1:?usage: base-image.sh IMAGE_NAME}
HERE=$(cd "$(dirname "$0")" && pwd)
PODMAN="$HERE/podman.sh"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if "$PODMAN" image exists "$IMAGE"; then
    echo "base image $IMAGE exists"
    exit 0
fi
ROOTFS=$(mktemp -d /var/tmp/lstmserve-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm into $ROOTFS (a few minutes)"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1
fi
# What the slim image leaves out too: package caches and lists, documentation, locales.
rm -rf "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
tar --numeric-owner -C "$ROOTFS" -c . | "$PODMAN" import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE imported"
