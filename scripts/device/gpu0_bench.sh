#!/usr/bin/env bash
# GPU 0 job (started by callA.sh): time the chunk-over-cache prefill attention candidates at 256K, then one
# `hybridize bench` run of the 8B presets with the fastest candidate, ending before the hold does.
export CUDA_VISIBLE_DEVICES=0
cd "$(dirname "$0")/../.."
RES=${RES:-/root/res}
timeout 150 python3 benchmarks/prefill_attention.py --out $RES/prefill_attention_h200.json > $RES/prefill_attention.log 2>&1
PA=$(python3 - $RES/prefill_attention_h200.json <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["results"]
    ok = {k[len("chunked_"):]: v["seconds"] for k, v in r.items() if k.startswith("chunked_") and "seconds" in v}
    print(min(ok, key=ok.get) if ok else "sdpa")
except Exception:
    print("sdpa")
PY
)
echo "prefill attention for the bench: $PA"
BUDGET_S=$(( $(cat /root/end_at) - $(date +%s) - 60 ))
python3 -m hybridize bench --presets ${BENCH_PRESETS:-qwen3-8b hypenet-8b sala-8b qwen3-8b-hf} --prefill-attention $PA \
    --time-budget 600 --total-budget $BUDGET_S --profile --fresh --commit "$HYBRIDIZE_GIT_COMMIT" --out $RES/bench \
    > $RES/bench.log 2>&1
echo "bench rc $?" >> $RES/bench.log
touch $RES/gpu0.done
