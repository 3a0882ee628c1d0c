#!/usr/bin/env bash
# Check the deployments against a real local Prefect server (loopback only), end to end:
# start the server, create the work pool, deploy, trigger the `pipeline` deployment, run one
# worker pass, and wait for the flow run to complete.
#   scripts/prefect_server_check.sh            # from the repository root, venv active, after `dvc repro`
set -euo pipefail
PORT=${PORT:-4299}
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_HOME=$(mktemp -d)
export SWIFTBRUSH_WORKSPACE=$(pwd)
LOG="$PREFECT_HOME/server.log"

prefect server start --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "server did not start; see $LOG"; exit 1; }

prefect work-pool create gpu-workers --type process --overwrite >/dev/null
prefect --no-prompt deploy --all >/dev/null
RUN=$(prefect deployment run swiftbrush-pipeline/pipeline 2>&1 | sed -n 's/.*UUID: \([0-9a-f-]*\).*/\1/p' | head -1)
echo "flow run: $RUN"
timeout 900 prefect worker start --pool gpu-workers --run-once >"$PREFECT_HOME/worker.log" 2>&1 || true
STATE=$(prefect flow-run inspect "$RUN" | sed -n "s/.*state_type=StateType.\([A-Z]*\).*/\1/p" | head -1)
echo "state: $STATE"
[ "$STATE" = "COMPLETED" ] || { tail -40 "$PREFECT_HOME/worker.log"; exit 1; }
echo "OK: the pipeline deployment ran to completion on a local Prefect server"
