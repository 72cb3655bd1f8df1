#!/usr/bin/env bash
# Drive a coordinator with an established third-party benchmark client for OpenAI-compatible
# servers: GuideLLM (PyPI `guidellm`), installed in its own virtual environment (.venv-bench,
# gitignored) so that its dependencies never touch the project's.
#
#   bench/third_party.sh fake   # a coordinator + 200 fake nodes (control plane only)
#   bench/third_party.sh real   # a coordinator + 2 real `sparecycles node` agents on the tiny model
#
# The tokenizer is the local model directory ($SPARECYCLES_TINY_MODEL, default /tmp/tiny2): no
# hub, no network. Reports land in artifacts/third_party/ (JSON, and GuideLLM's console table).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-fake}"
MODEL_DIR="${SPARECYCLES_TINY_MODEL:-/tmp/tiny2}"
PY="${PY:-$(pwd)/.venv/bin/python}"          # the project's interpreter
[ -x "$PY" ] || PY=python3
BENCH_VENV="${BENCH_VENV:-.venv-bench}"
GUIDELLM_VERSION="${GUIDELLM_VERSION:-0.8.1}"
STREAMS="${STREAMS:-1,4,16}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-20}"
OUT="artifacts/third_party"
mkdir -p "$OUT"

if [ ! -x "$BENCH_VENV/bin/guidellm" ]; then
  python3 -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/pip" install -q --upgrade pip
  "$BENCH_VENV/bin/pip" install -q "guidellm==$GUIDELLM_VERSION"
fi

WORK="$(mktemp -d /tmp/third-party-XXXX)"
DB="sqlite:///$WORK/sparecycles.db"
PORT="$("$PY" -c 'from sparecycles.tools.localnet import free_port; print(free_port())')"
URL="http://127.0.0.1:$PORT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT

CREDS="$WORK/creds.json"
"$PY" -m sparecycles loadtest setup --database "$DB" --keys 2 --model tiny --out "$CREDS"
TOKEN="$("$PY" -c "import json; print(json.load(open('$CREDS'))['node_token'])")"
KEY="$("$PY" -c "import json; print(json.load(open('$CREDS'))['keys'][0])")"

SPARECYCLES_VERIFICATION=false setsid "$PY" -m sparecycles coordinator --port "$PORT" \
  --database "$DB" --model "tiny=$MODEL_DIR" --log-level warning >"$WORK/coordinator.log" 2>&1 &
PIDS+=($!)
if [ "$MODE" = "fake" ]; then
  NODES=200
  setsid "$PY" -m sparecycles loadtest nodes --url "$URL" --token "$TOKEN" --count $NODES \
    --model "tiny=$MODEL_DIR" >"$WORK/nodes.log" 2>&1 &
  PIDS+=($!)
else
  NODES=2
  for n in 1 2; do
    OMP_NUM_THREADS=1 setsid "$PY" -m sparecycles node --coordinator "$URL" --token "$TOKEN" \
      --name "real-$n" --config-dir "$WORK/node-$n" --model "tiny=$MODEL_DIR" \
      --log-level warning >"$WORK/node-$n.log" 2>&1 &
    PIDS+=($!)
  done
fi
for _ in $(seq 1 240); do
  online="$( { curl -s "$URL/readyz" || true; } | "$PY" -c 'import json,sys
try: print(json.load(sys.stdin).get("nodes_online", 0))
except Exception: print(0)')"
  [ "$online" -ge "$NODES" ] && break
  sleep 0.5
done
echo "coordinator $URL with $online nodes ($MODE)"

STAMP="$MODE-$(date +%Y%m%d-%H%M%S)"
# GuideLLM checks GET /health (vLLM's) unless told not to; the coordinator has /healthz.
# prompt 128 and output 64 tokens (synthetic text, counted with the model's own tokenizer);
# concurrent streams $STREAMS, each level for $SECONDS_PER_RUN s
"$BENCH_VENV/bin/guidellm" run \
  --backend "kind=openai_http,target=$URL,api_key=$KEY,model=tiny,validate_backend=false" \
  --tokenizer "kind=huggingface_auto,model=$MODEL_DIR" \
  --data "kind=synthetic_text,prompt_tokens=128,output_tokens=64" \
  --profile "kind=concurrent,streams=1" --override profile.streams "$STREAMS" \
  --constraint "kind=max_duration,seconds=$SECONDS_PER_RUN" \
  --output "kind=json,path=$OUT/guidellm-$STAMP.json" \
  --output "kind=console" \
  --disable-progress 2>&1 | tee "$OUT/guidellm-$STAMP.txt"
echo "report: $OUT/guidellm-$STAMP.json and .txt"
