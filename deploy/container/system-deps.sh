#!/usr/bin/env bash
# What `make container` and `make container-test` need on the host, installed from Debian's packages when
# missing (as `make test` installs redis-server): podman, runc (the runtime podman.sh picks) and debootstrap
# (base-image.sh makes the base image with it). Runs before anything is built, and refuses where the targets
# cannot work: they need root (podman runs rootful here, debootstrap and chroot need it), and installing needs
# apt-get.
set -euo pipefail
TOOLS=(podman runc debootstrap)

if [ "$(id -u)" != 0 ]; then
    echo "make container needs root: podman runs rootful here and debootstrap makes the base image;" \
        "run it as root (nothing was built)" >&2
    exit 1
fi
missing=()
for tool in "${TOOLS[@]}"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} = 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
    echo "make container needs ${missing[*]} and cannot install them without apt-get: install them with this" \
        "system's package manager (nothing was built)" >&2
    exit 1
fi
echo "installing ${missing[*]} from Debian's packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
for tool in "${missing[@]}"; do
    command -v "$tool" >/dev/null || { echo "$tool was installed but is not on PATH ($PATH)" >&2; exit 1; }
done
