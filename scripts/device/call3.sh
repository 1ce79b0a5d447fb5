#!/usr/bin/env bash
# H200 call 3 of 3. Both GPUs: stages 1-2 on 1 GPU and on 2 GPUs with FSDP2 (benchmarks/fsdp_scaling.py).
# Then GPU 0: finish the issue-4 conversion / evaluation if call 2 could not; GPU 1: the 1.7B bench presets.
source scripts/device/common.sh
W=/root/w3; mkdir -p $W/run4 $W/eval4
TYPES=$(python3 -c 'import json; print("".join("A" if t == "attention" else "L" for t in json.load(open("/root/run4/selection/manifest.json"))["layer_types"]))' 2>/dev/null)
TYPES=${TYPES:-ALLLLLLLALLLLLLLLLLLLLLLAAALAA}
timeout 250 python3 benchmarks/fsdp_scaling.py --gpus 2 --out $W/fsdp2 --runs /root/fsdp_runs --timeout 120 -- \
    --data /root/h200_train.jsonl --layer-types $TYPES --seq-len 512 --stage1-tokens 983040 --stage1-batch 64 \
    --stage2-tokens 2621440 --stage2-batch 128 --no-eval --device cuda --checkpoint-every 1000 > $W/fsdp2.log 2>&1
echo "fsdp_scaling rc $?" >> $W/fsdp2.log
(
  export CUDA_VISIBLE_DEVICES=0
  if [ ! -f /root/eval4/report.json ]; then
    timeout $(( $(left) - 15 )) bash scripts/device/convert4.sh > $W/convert4_resume.log 2>&1
    [ -f /root/run4/stage2/manifest.json ] && timeout $(( $(left) - 10 )) bash scripts/device/eval4.sh > $W/eval4.log 2>&1
    echo "eval rc $?" >> $W/eval4.log
  fi
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout $(( $(left) - 10 )) python3 -m hybridize bench --presets hypenet-1.7b sala-1.7b qwen3-1.7b qwen3-1.7b-hf \
      --lengths 32768 131072 262144 524288 --total-budget $(( $(left) - 40 )) --profile --commit "$HYBRIDIZE_GIT_COMMIT" \
      --out /root/bench > $W/bench_call3.log 2>&1
  echo "bench rc $?" >> $W/bench_call3.log
) &
wait
cp -r /root/bench $W/bench; copy_run /root/run4 $W/run4; copy_run /root/eval4 $W/eval4
tail -n 6 $W/fsdp2.log; tail -n 3 $W/eval4.log $W/bench_call3.log 2>/dev/null
pack call3 $W
