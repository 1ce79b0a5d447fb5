#!/usr/bin/env bash
# Device run, call 1 of the seventh session (2-GPU machine; carry .whl .gpu1). GPU 1: tests/test_train_gpu.py,
# then benchmarks/stage2_gradient.py on the tiny model (issue 7: where the stage-2 gradient's run-to-run
# differences come from), then the sparse benchmark at the Qwen3-8B shape (--heads 32 --kv-heads 8: fla NSA with
# a padded query group against FlexAttention; issue 5). GPU 0: GPU0_TESTS (default the sparse and graph-decode
# test files). Returns when both GPUs are done or at BUDGET; marks bench.done so call2_fsdp.sh can start.
# HOLD_LEFT = the lease's budget_left_s when sent.
source scripts/device/common.sh
mkdir -p $RES/logs
stash_gpu1 || exit 1
echo $(( $(date +%s) + ${HOLD_LEFT:?set HOLD_LEFT to the lease budget left} - 60 )) > /root/end_at
TESTS_END=$(( $(date +%s) + ${TESTS_S:-420} ))
export TESTS_END GPU0_TESTS=${GPU0_TESTS:-tests/test_sparse_gpu.py tests/test_graph_decode_gpu.py}
setsid nohup bash -c 'bash scripts/device/tests_job.sh 1 $TESTS_END tests/test_train_gpu.py
  CUDA_VISIBLE_DEVICES=1 timeout 120 python3 benchmarks/stage2_gradient.py --teacher tiny \
    --out $RES/stage2_gradient_tiny.json > $RES/stage2_gradient_tiny.log 2>&1
  left=$(( TESTS_END - $(date +%s) ))
  [ $left -lt 90 ] || CUDA_VISIBLE_DEVICES=1 timeout $left python3 benchmarks/sparse_attention.py --heads 32 \
    --kv-heads 8 --sizes 32768,131072,262144,524288 --no-compiled-selection --chunk 0 --time-budget $(( left - 45 )) \
    --out $RES/sparse_attention_kv8_h200.json > $RES/sparse_attention_kv8.log 2>&1
  touch $RES/gpu1.free' > $RES/logs/gpu1.log 2>&1 < /dev/null &
setsid nohup bash -c 'bash scripts/device/tests_job.sh 0 $TESTS_END $GPU0_TESTS
  touch $RES/gpu0.free' > $RES/logs/gpu0.log 2>&1 < /dev/null &
setsid nohup bash -c 'while ! { [ -f $RES/gpu0.free ] && [ -f $RES/gpu1.free ]; }; do sleep 2; done
  touch $RES/bench.done' > /dev/null 2>&1 < /dev/null &
sleep 20
WAIT_FOR="gpu0.free gpu1.free" snapshot_when_done call1
tail -n 40 $RES/stage2_gradient_tiny.log 2>/dev/null | head -5
