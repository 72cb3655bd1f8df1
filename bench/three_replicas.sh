#!/usr/bin/env bash
# Three coordinator replicas on one PostgreSQL database and NATS, driven by the control-plane
# harness (fake nodes spread over the replicas, clients over the replicas), then one replica
# alone with the same fleet and clients, side by side. Results: artifacts/three_replicas/, with
# the CPU milliseconds per request of each kind of process (coordinators, fake nodes, clients,
# PostgreSQL's backends of the run's database) in the table's last column.
#   bench/three_replicas.sh [CONCURRENCY=64,256] [FLEET=300] [DURATION_S=15] [OUTPUT_TOKENS_MAX=64]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL_DIR=${SPARECYCLES_TINY_MODEL:-/tmp/tiny2}
CONC=${1:-64,256}; FLEET=${2:-300}; DUR=${3:-15}; OUT_MAX=${4:-64}
OUT=artifacts/three_replicas; mkdir -p "$OUT"
[ -f "$MODEL_DIR/config.json" ] || "$PY" -m sparecycles model tiny "$MODEL_DIR"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
run() {  # replicas label
  local n=$1 label=$2
  local db="sc_bench_${label}_$$" urls=() cpids=()
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $db" >/dev/null
  for i in $(seq 1 "$n"); do
    port=$((18100 + i))
    SPARECYCLES_VERIFICATION=false "$PY" -m sparecycles coordinator --port $port \
      --database "postgresql://postgres@127.0.0.1:5432/$db" \
      --bus "nats://127.0.0.1:4222/bench$$$label" --replica-id "r$i" --log-level warning \
      --model "tiny=$MODEL_DIR" > "$OUT/$label-r$i.log" 2>&1 &
    pids+=($!); cpids+=($!); urls+=("http://127.0.0.1:$port")
  done
  for u in "${urls[@]}"; do
    for _ in $(seq 1 120); do curl -fs "$u/readyz" >/dev/null && break; sleep 0.5; done
  done
  "$PY" bench/control_plane.py --urls "$(IFS=,; echo "${urls[*]}")" \
    --coordinator-pids "$(IFS=,; echo "${cpids[*]}")" \
    --database "postgresql://postgres@127.0.0.1:5432/$db" --model-dir "$MODEL_DIR" \
    --scale 0 --fleet "$FLEET" --concurrency "$CONC" --duration-s "$DUR" \
    --output-tokens-max "$OUT_MAX" \
    --out "$OUT/$label"
  cleanup; pids=(); sleep 2
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE $db WITH (FORCE)" >/dev/null
}
run 3 three
run 1 one
echo "results in $OUT/three and $OUT/one"
