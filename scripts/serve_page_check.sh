#!/usr/bin/env bash
# Check the served web page in a real headless browser, end to end: start `python -m src.serve`
# on a loopback port, open / in Chromium, type a prompt and a seed, click Generate, wait for
# the image and save a screenshot (reports/serve/page.png).
#   scripts/serve_page_check.sh            # from the repository root, venv active, after `dvc repro`
# Needs Chromium from the Debian packages: apt-get update && apt-get install -y chromium
set -euo pipefail
PORT=${PORT:-8799}
OUT=${OUT:-reports/serve/page.png}
LOG=$(mktemp)

python -m src.serve --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.5; done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "server not ready; see $LOG"; cat "$LOG"; exit 1; }

python scripts/browser_page.py "http://127.0.0.1:$PORT/" "$OUT"
echo "OK: the page showed a generated image; screenshot in $OUT"
