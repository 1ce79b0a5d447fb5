#!/usr/bin/env bash
# Device run, call 2 of 3 (carry .whl .gpu2): joins the teacher GGUF and builds the training text while call 1's
# bench runs; a job in its own process session waits for the bench to finish, then runs
# benchmarks/fsdp_scaling.py --accum-check: stages 1-2 of the embedded teacher's conversion under torchrun with
# 1 process, 1 process accumulating 2 micro-batches, and 2 processes (FSDP2, NCCL, multicast off), same global
# batch. Returns when the bench is done (or at BUDGET) with its results.
source scripts/device/common.sh
mkdir -p $RES/logs
join_gpu2 || exit 1
LT=$H200_LT  # no selection here
export LT STAGE2_TOKENS=${STAGE2_TOKENS:-5242880}
# FSDP_ENV: extra environment for every run, e.g. HYBRIDIZE_FORCE_REFERENCE=1 (pure-torch kernels)
export FSDP_ENV=${FSDP_ENV:-}
# FSDP_EXTRA: more convert flags for every run, e.g. --no-fsdp-reshard
export FSDP_EXTRA=${FSDP_EXTRA:-}
setsid nohup bash -c 'while [ ! -f $RES/bench.done ]; do sleep 2; done
  PER_RUN=$(( ($(cat /root/end_at) - $(date +%s) - 30) / 3 ))
  echo "fsdp starts $(date -u +%FT%TZ), $PER_RUN s per run"
  ${FSDP_ENV:+env $FSDP_ENV} python3 benchmarks/fsdp_scaling.py --gpus 2 --accum-check --fresh --timeout $PER_RUN \
    --out $RES/fsdp2_h200x2 --runs /root/fsdp_runs --commit $HYBRIDIZE_GIT_COMMIT -- --data /root/h200_train.jsonl \
    --layer-types $LT --seq-len 512 --stage1-tokens 983040 --stage1-batch 64 --stage2-tokens $STAGE2_TOKENS \
    --stage2-batch 128 --no-eval --device cuda --checkpoint-every 1000 $FSDP_EXTRA
  touch $RES/fsdp.done' > $RES/logs/fsdp.log 2>&1 < /dev/null &
# GRAD_CHECK=1: on GPU 1, while the 1-GPU runs use GPU 0, benchmarks/stage2_gradient.py on the real teacher with
# the stage-1 mixers of the first run (issue 7), done before the 2-GPU run starts
if [ "${GRAD_CHECK:-0}" = 1 ]; then
  setsid nohup bash -c 'for i in $(seq 400); do [ -f /root/fsdp_runs/1gpu/stage1/manifest.json ] && break; sleep 2; done
    CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/stage2_gradient.py --teacher default --layer-types $LT \
      --stage1 /root/fsdp_runs/1gpu --data /root/h200_train.jsonl --rows 16 --seq-len 512 \
      --out $RES/stage2_gradient_real.json > $RES/stage2_gradient_real.log 2>&1' > /dev/null 2>&1 < /dev/null &
fi
WAIT_FOR=bench.done snapshot_when_done call2
