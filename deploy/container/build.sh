#!/usr/bin/env bash
# Builds the lstmserve image from the repository's Dockerfile with podman on this machine: the base image is
# made locally when missing (no registry is reachable), and torch comes from this machine's CPU wheel (no
# index that serves it is reachable; PyPI is, and supplies everything else).
# Usage: build.sh [IMAGE]   (default localhost/lstmserve:latest)
set -euo pipefail
IMAGE=${1:-localhost/lstmserve:latest}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-localhost/python:3.11-slim-bookworm}
WHEELS=${PIP_FIND_LINKS:-/opt/wheels}

"$HERE/base-image.sh" "$BASE_IMAGE"

torch_args=()
wheel=$(find "$WHEELS" -maxdepth 1 -name 'torch-2.13.0+cpu-cp311-*.whl' 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
    cp -u "$wheel" "$HERE/wheels/"
    # Only PyPI: the local +cpu wheel is the highest torch==2.13.0 pip sees, and PyTorch's index is unreachable.
    torch_args=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
    echo "torch from $wheel"
fi

# Raising rlimits fails here, so the build's limits stay within the host's hard limits.
"$HERE/podman.sh" build --isolation chroot --network host --pull=never --format docker \
    --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096 \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" "${torch_args[@]}" \
    --tag "$IMAGE" --file "$ROOT/Dockerfile" "$ROOT"
