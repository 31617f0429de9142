#!/usr/bin/env bash
# `make container-test`: builds the image, runs it on the host network, waits for its health check to report
# SERVING, runs the README's walk-through against it with the client, stops it with SIGTERM (a graceful
# shutdown exits 0) and removes the container it started.
# Usage: test.sh [IMAGE]   (run from the repository root with .venv installed)
set -euo pipefail
IMAGE=${1:-localhost/lstmserve:latest}
HERE=$(cd "$(dirname "$0")" && pwd)
PODMAN="$HERE/podman.sh"
PY=${PY:-.venv/bin/python}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$HERE/build.sh" "$IMAGE"

PORT=$(free_port)
METRICS_PORT=$(free_port)
CID=$("$PODMAN" run --detach --network host --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" \
    --ulimit nproc=4096:4096 --env LSTMSERVE_HOST=127.0.0.1 --env "LSTMSERVE_PORT=$PORT" \
    --env LSTMSERVE_METRICS_HOST=127.0.0.1 --env "LSTMSERVE_METRICS_PORT=$METRICS_PORT" "$IMAGE")
trap '"$PODMAN" rm --force --time 0 "$CID" >/dev/null' EXIT
echo "container ${CID:0:12} on 127.0.0.1:$PORT (metrics :$METRICS_PORT), user $("$PODMAN" inspect --format '{{.Config.User}}' "$CID")"

# No systemd here to run the image's HEALTHCHECK on a timer, so run it by hand until it passes.
for _ in $(seq 120); do
    if "$PODMAN" healthcheck run "$CID" >/dev/null 2>&1; then break; fi
    if [ "$("$PODMAN" inspect --format '{{.State.Running}}' "$CID")" != true ]; then
        "$PODMAN" logs "$CID"; echo "container exited"; exit 1
    fi
    sleep 1
done
echo "image health check: $("$PODMAN" inspect --format '{{.State.Health.Status}}' "$CID")"
echo "client health: $(.venv/bin/lstmserve-client --address "127.0.0.1:$PORT" --timeout 5 health)"

"$PY" -m tests.walkthrough "127.0.0.1:$PORT"
"$PY" - "$METRICS_PORT" <<'PYEOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(*[line for line in text.splitlines() if line.startswith(("lstmserve_steps_applied_total", "lstmserve_sessions_created_total"))], sep="\n")
PYEOF

"$PODMAN" stop --time 40 "$CID" >/dev/null
code=$("$PODMAN" inspect --format '{{.State.ExitCode}}' "$CID")
echo "stopped with SIGTERM, exit code $code"
"$PODMAN" logs "$CID" 2>&1 | tail -n 3
[ "$code" = 0 ]
echo "container test passed"
