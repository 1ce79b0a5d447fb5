#!/usr/bin/env bash
# Verification run, call 3 of 3 (carry .whl): GPU 1 re-runs the GPU test files that did not pass in call 1 (on
# this call's tree), then whatever of sparse_attention.py / decode_speed.py call 1 had no time for; GPU 0 runs
# `hybridize bench` of the 8B presets on the verified paths (split prefill only if its GPU test passed), both
# ending before the hold does.
source scripts/device/common.sh
while [ $SECONDS -lt $((END - 400)) ] && [ ! -f $RES/fsdp.done ]; do sleep 3; done
STOP=$(( $(cat /root/end_at) - 15 ))
export STOP
RERUN=$(grep -v ' rc 0:' $RES/tests_gpu.log 2>/dev/null | grep -v ' rerun' | awk '{print $1}' | sort -u | tr '\n' ' ')
export RERUN
setsid nohup bash -c 'export CUDA_VISIBLE_DEVICES=1
  TAG=rerun bash scripts/device/tests_job.sh 1 $STOP $RERUN
  [ -f $RES/sparse_attention.done ] || timeout $(( STOP - $(date +%s) )) python3 benchmarks/sparse_attention.py \
      --time-budget $(( (STOP - $(date +%s)) / 3 )) --out $RES/sparse_attention_h200.json > $RES/sparse_attention.log 2>&1
  [ -f $RES/decode_speed.done ] || timeout $(( STOP - $(date +%s) )) python3 benchmarks/decode_speed.py \
      --repeats 2 --commit $HYBRIDIZE_GIT_COMMIT --out $RES/decode_speed_h200.json > $RES/decode_speed.log 2>&1
  touch $RES/gpu1.done3' > $RES/logs/gpu1_call3.log 2>&1 < /dev/null &
PA=sdpa
# split once its own GPU tests passed (a failure of the flex candidate in the same file does not count)
L1=$RES/test_prefill_attention_gpu.log
[ -f $L1 ] && grep -q 'split.* PASSED' $L1 && ! grep -Eq 'split.* (FAILED|ERROR)' $L1 && PA=split
export PA
# BENCH_GPUS=2: the presets spread over both GPUs (hybridize bench --gpus 2; then GPU 1's re-tests share GPU 1)
setsid nohup bash -c '[ "${BENCH_GPUS:-1}" -gt 1 ] || export CUDA_VISIBLE_DEVICES=0
  python3 -m hybridize bench --gpus ${BENCH_GPUS:-1} --presets ${BENCH_PRESETS:-qwen3-8b hypenet-8b sala-8b} --lengths ${BENCH_LENGTHS:-32768 131072 262144} \
    --prefill-attention $PA --time-budget 300 --total-budget $(( STOP - $(date +%s) - 20 )) --profile --fresh \
    --commit $HYBRIDIZE_GIT_COMMIT --out $RES/bench > $RES/bench.log 2>&1
  echo "bench rc $?" >> $RES/bench.log
  touch $RES/gpu0.done3' > $RES/logs/gpu0_call3.log 2>&1 < /dev/null &
WAIT_FOR="gpu0.done3 gpu1.done3" snapshot_when_done call3 final
