#!/usr/bin/env bash
# Serves the demo model with every mount read-only and an empty tmpfs on /tmp (what
# `docker run --read-only --tmpfs /tmp` gives), streams two steps through it, and lists what was written.
# Needs root and mount namespaces: run as `sudo unshare -m --propagation private scripts/check_readonly_root.sh`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${1:-$ROOT/models/demo.pt}
for m in $(findmnt -rn -o TARGET | sort -u); do mount -o remount,bind,ro "$m" 2>/dev/null || true; done
mount -t tmpfs tmpfs /tmp
if touch "$ROOT/.probe" 2>/dev/null; then echo "the file system is still writable" >&2; exit 3; fi
cd "$ROOT"
HOME=/nonexistent PYTHONDONTWRITEBYTECODE=1 .venv/bin/lstmserve --model-path "$MODEL" --port 50778 \
    --metrics-port 0 > /tmp/server.log 2>&1 &
pid=$!
for _ in $(seq 1 300); do grep -q "serving model" /tmp/server.log && break; sleep 0.2; done
printf '1,2,3,4\n4,3,2,1\n' | .venv/bin/lstmserve-client --address 127.0.0.1:50778 stream --show-state
kill -TERM "$pid"
wait "$pid"
echo "server exited $?; written under /tmp besides its log: $(ls -A /tmp | grep -v '^server.log$' || echo nothing)"
