#!/usr/bin/env bash
# The end-to-end demo on the real model (SmolLM2-135M-Instruct), all on this machine:
#   1. serve it over gRPC (+ /metrics),
#   2. generate an answer,
#   3. run a short LoRA zeroth-order fine-tune through the FineTuning API (events followed),
#   4. generate with the resulting adapter, and show the held-out accuracy before/after.
# Usage: bash bench/demo.sh MODEL_DIR   (make demo passes the fetched model)
set -euo pipefail
MODEL="${1:?usage: demo.sh MODEL_DIR}"
WORK="${ZOSTREAM_DEMO_DIR:-$(mktemp -d -t zostream-demo.XXXXXX)}"
PORT="${ZOSTREAM_DEMO_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
STEPS="${ZOSTREAM_DEMO_STEPS:-300}"
SERVER="127.0.0.1:$PORT"
echo "== work dir $WORK, server $SERVER"

zostream serve --model "$MODEL" --port "$PORT" --metrics-port -1 --data-dir "$WORK/data" \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill -TERM $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
    if python3 - "$SERVER" <<'PY' 2>/dev/null; then break; fi
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
ch = grpc.insecure_channel(sys.argv[1])
r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
sys.exit(0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
    kill -0 $SERVER_PID 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
    sleep 0.5
done

echo "== 1. generate (base model)"
zostream generate --server "$SERVER" --chat --temperature 0 --max-new-tokens 32 "What is the capital of France?"
echo

echo "== 2. fine-tune: LoRA, zeroth-order (grzo: one +/- pair of forwards per step), $STEPS steps on a sentiment task (labels A/B), its default hyperparameters"
python3 bench/sentiment_task.py "$WORK/task" --train 128 --eval 64 >/dev/null
JOB=$(zostream jobs create --server "$SERVER" --method lora --data "$WORK/task/train.jsonl" \
      --eval "$WORK/task/eval.jsonl" --steps "$STEPS" --batch-size 16 --estimator grzo \
      --eval-every "$STEPS" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB (eval events show held-out loss/accuracy before training and after)"
zostream jobs events --server "$SERVER" "$JOB" --follow
zostream jobs get --server "$SERVER" "$JOB" --json | python3 -c '
import json, sys
j = json.load(sys.stdin); m = j.get("metrics", {})
print("status", j["status"], "| steps", j["progress"]["steps_done"],
      "| held-out accuracy %.3f (loss %.4f)" % (m.get("eval_accuracy", float("nan")), m.get("eval_loss", float("nan"))))'

echo "== 3. generate with the adapter (adapter_id = job id)"
PROMPT="$(head -n 1 "$WORK/task/eval.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prompt"])')"
echo "prompt: $PROMPT"
for who in base adapter; do
    extra=(); [ "$who" = adapter ] && extra=(--adapter-id "$JOB")
    zostream generate --server "$SERVER" "${extra[@]}" --temperature 0 --max-new-tokens 2 --json "$PROMPT" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("'"$who"': ", repr(r["text"]), r["token_ids"])'
done
echo "== update log: $(stat -c %s "$WORK/data/jobs/$JOB/update.log") bytes for $STEPS steps"
