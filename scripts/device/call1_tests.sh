#!/usr/bin/env bash
# Device run, call 1 of 3 (2-GPU machine; carry .whl .gpu1). GPU 1: the GPU test files, one pytest process each
# (GPU1_TESTS); GPU 0: benchmarks/sparse_attention.py; both stop by TESTS_S seconds. Once both are done,
# `hybridize bench --gpus 2` (BENCH_PRESETS, BENCH_LENGTHS) starts in its own process session, so it outlives this
# call, with a total budget that ends it BENCH_RESERVE seconds before the hold does (call 2's FSDP runs need the
# GPUs then). Returns when the tests and the sparse benchmark are done. Stashes the first half of the teacher
# GGUF for call 2. HOLD_LEFT = the lease's budget_left_s when sent. RUN_BENCH=0 skips the bench (call 2's FSDP
# runs then start as soon as the GPUs are free); RUN_SPARSE=0 skips the sparse benchmark; GPU0_TESTS (test files)
# run on GPU 0 before it.
source scripts/device/common.sh
mkdir -p $RES/logs
stash_gpu1 || exit 1
echo $(( $(date +%s) + ${HOLD_LEFT:?set HOLD_LEFT to the lease budget left} - 60 )) > /root/end_at
TESTS_END=$(( $(date +%s) + ${TESTS_S:-300} ))
BENCH_END=$(( $(cat /root/end_at) - ${BENCH_RESERVE:-480} ))
BENCH_PRESETS=${BENCH_PRESETS:-qwen3-8b qwen3-8b-hf hypenet-8b sala-8b qwen3-1.7b qwen3-1.7b-hf hypenet-1.7b sala-1.7b}
BENCH_LENGTHS=${BENCH_LENGTHS:-32768 131072 262144 524288 1048576}
export TESTS_END BENCH_END BENCH_PRESETS BENCH_LENGTHS
setsid nohup bash -c 'bash scripts/device/tests_job.sh 1 $TESTS_END ${GPU1_TESTS:-tests/test_train_gpu.py tests/test_sparse_gpu.py \
    tests/test_graph_decode_gpu.py tests/test_prefill_attention_gpu.py}
  touch $RES/gpu1.free' > $RES/logs/gpu1.log 2>&1 < /dev/null &
export RUN_SPARSE=${RUN_SPARSE:-1} GPU0_TESTS=${GPU0_TESTS:-}
setsid nohup bash -c 'export CUDA_VISIBLE_DEVICES=0
  [ -z "$GPU0_TESTS" ] || bash scripts/device/tests_job.sh 0 $TESTS_END $GPU0_TESTS
  [ "$RUN_SPARSE" = 0 ] || timeout $(( TESTS_END - $(date +%s) )) python3 benchmarks/sparse_attention.py \
    --no-compiled-selection --time-budget $(( TESTS_END - $(date +%s) - 60 )) --out $RES/sparse_attention_h200.json \
    > $RES/sparse_attention.log 2>&1
  touch $RES/gpu0.free' > $RES/logs/gpu0.log 2>&1 < /dev/null &
export RUN_BENCH=${RUN_BENCH:-1}
setsid nohup bash -c 'while ! { [ -f $RES/gpu0.free ] && [ -f $RES/gpu1.free ]; }; do sleep 2; done
  if [ "$RUN_BENCH" = 0 ]; then touch $RES/bench.done; exit 0; fi
  echo "bench starts $(date -u +%FT%TZ), must end by $(date -u -d @$BENCH_END +%FT%TZ)"
  python3 -m hybridize bench --gpus 2 --presets $BENCH_PRESETS --lengths $BENCH_LENGTHS --time-budget 300 \
    --total-budget $(( BENCH_END - $(date +%s) - 20 )) --profile --fresh --commit $HYBRIDIZE_GIT_COMMIT \
    --out $RES/bench > $RES/bench.log 2>&1
  echo "bench rc $?" >> $RES/bench.log
  touch $RES/bench.done' > $RES/logs/bench_job.log 2>&1 < /dev/null &
sleep 20
WAIT_FOR="gpu0.free gpu1.free" snapshot_when_done call1
