#!/usr/bin/env bash
# H200 call 3 of 3. Both GPUs: stages 1-2 on 1 GPU and on 2 GPUs with FSDP2 (benchmarks/fsdp_scaling.py,
# issue 7). The first training step of a fresh shape waits ~100 s for fla's autotuning (measured), so each
# run gets 200 s. Then GPU 0 finishes the issue-4 conversion / evaluation if call 2 could not.
source scripts/device/common.sh
W=/root/w3; mkdir -p $W/run4 $W/eval4
TYPES=$(python3 -c 'import json; print("".join("A" if t == "attention" else "L" for t in json.load(open("/root/run4/selection/manifest.json"))["layer_types"]))' 2>/dev/null)
TYPES=${TYPES:-ALLLLLLLALLLLLLLLLLLLLLLAAALAA}
timeout 430 python3 benchmarks/fsdp_scaling.py --gpus 2 --out $W/fsdp2 --runs /root/fsdp_runs --timeout 200 -- \
    --data /root/h200_train.jsonl --layer-types $TYPES --seq-len 512 --stage1-tokens 983040 --stage1-batch 64 \
    --stage2-tokens 2621440 --stage2-batch 128 --no-eval --device cuda --checkpoint-every 1000 > $W/fsdp2.log 2>&1
echo "fsdp_scaling rc $?" >> $W/fsdp2.log
if [ ! -f /root/eval4/report.json ]; then
  export CUDA_VISIBLE_DEVICES=0
  timeout $(( $(left) - 15 )) bash scripts/device/convert4.sh > $W/convert4_resume.log 2>&1
  [ -f /root/run4/stage2/manifest.json ] && timeout $(( $(left) - 10 )) bash scripts/device/eval4.sh > $W/eval4.log 2>&1
fi
copy_run /root/run4 $W/run4; copy_run /root/eval4 $W/eval4
tail -n 6 $W/fsdp2.log; tail -n 3 $W/eval4.log 2>/dev/null
pack call3 $W
