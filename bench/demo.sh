#!/usr/bin/env bash
# The end-to-end demo on the real model (SmolLM2-135M-Instruct), all on this machine:
#   1. serve it over gRPC (+ /metrics),
#   2. generate an answer,
#   3. run a short LoRA zeroth-order fine-tune through the FineTuning API (events followed),
#   4. score held-out reviews with the base and the resulting adapter (held-out accuracy before/after).
# Usage: bash bench/demo.sh MODEL_DIR   (make demo passes the fetched model)
set -euo pipefail
MODEL="${1:?usage: demo.sh MODEL_DIR}"
WORK="${ZOSTREAM_DEMO_DIR:-$(mktemp -d -t zostream-demo.XXXXXX)}"
mkdir -p "$WORK"  # a ZOSTREAM_DEMO_DIR that does not exist yet is made
PORT="${ZOSTREAM_DEMO_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
STEPS="${ZOSTREAM_DEMO_STEPS:-600}"
EVAL_EVERY=$(( STEPS >= 6 ? STEPS / 6 : STEPS ))  # held-out accuracy six times along the run
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
# The setting bench/RESULTS.md measured for the defaults (512 reviews, 600 steps = 1,200 forwards, seed 0 of
# its three): 128 reviews or 300 steps moved held-out accuracy one run and not the next.
python3 bench/sentiment_task.py "$WORK/task" --train 512 --eval 64 >/dev/null
JOB=$(zostream jobs create --server "$SERVER" --method lora --data "$WORK/task/train.jsonl" \
      --eval "$WORK/task/eval.jsonl" --steps "$STEPS" --batch-size 16 --estimator grzo --seed 0 \
      --eval-every "$EVAL_EVERY" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB (eval events: held-out loss/accuracy before training and every $EVAL_EVERY steps)"
zostream jobs events --server "$SERVER" "$JOB" --follow
zostream jobs get --server "$SERVER" "$JOB" --json | python3 -c '
import json, sys
j = json.load(sys.stdin); m = j.get("metrics", {})
print("status", j["status"], "| steps", j["progress"]["steps_done"],
      "| held-out accuracy %.3f (loss %.4f)" % (m.get("eval_accuracy", float("nan")), m.get("eval_loss", float("nan"))))'

echo "== 3. the adapter (adapter_id = job id) vs the base on held-out reviews: which answer each scores higher"
python3 - "$SERVER" "$JOB" "$WORK/task/eval.jsonl" <<'PY'
import json, sys
from zostream.clients.client import ZostreamClient

server, job, path = sys.argv[1:]
records = [json.loads(line) for line in open(path)]
shown = [r for r in records if r["answer"] == 1][:3] + [r for r in records if r["answer"] == 0][:3]
with ZostreamClient(server) as c:
    def pick(rec, adapter):  # the candidate with the higher log-likelihood after the prompt (as eval scores)
        prompt = c.tokenize(rec["prompt"])
        scores = []
        for cand in rec["candidates"]:
            ids = c.tokenize(rec["prompt"] + cand)
            r = c.generate(token_ids=ids, max_new_tokens=1, prompt_logprobs=True, **adapter)
            scores.append(sum(x.logprob for x in r.prompt_logprobs[len(prompt) - 1 :]))
        return rec["candidates"][max(range(len(scores)), key=scores.__getitem__)]
    for rec in shown:
        review = rec["prompt"].split("\n")[0]
        truth = rec["candidates"][rec["answer"]]
        base, tuned = pick(rec, {}), pick(rec, {"adapter_id": job})
        print(f"{review[:60]:60s} truth{truth} | base{base} {'ok' if base == truth else '--'}"
              f" | adapter{tuned} {'ok' if tuned == truth else '--'}")
PY
echo "== update log: $(stat -c %s "$WORK/data/jobs/$JOB/update.log") bytes for $STEPS steps"
