#!/usr/bin/env bash
# Verification run, call 1 of 3 (2-GPU machine; carry .whl .gpu1): every GPU test file, split over both GPUs
# (tests/test_gpu.py alone on GPU 0, the other files on GPU 1), in jobs that outlive the call (setsid); then,
# if time is left before call 2 needs the GPUs, decode_speed.py on GPU 0 and sparse_attention.py on GPU 1.
# Stashes the first half of the teacher GGUF for call 2. HOLD_LEFT = the lease's budget_left_s when sent.
# GPU0_TESTS / GPU1_TESTS (space-separated test files) replace the default split.
source scripts/device/common.sh
mkdir -p $RES/logs
cp .gpu1/gguf.partaa /root/stash/ && tar xJf .gpu1/assets.tar.xz -C "$HYBRIDIZE_CACHE" || exit 1
echo $(( $(date +%s) + ${HOLD_LEFT:?set HOLD_LEFT to the lease budget left} - 60 )) > /root/end_at
TESTS_END=$(( $(date +%s) + BUDGET - 30 ))   # the tests stop before this call returns
POST_END=$(( TESTS_END + 100 ))              # call 2 takes both GPUs for the FSDP runs about then
export TESTS_END POST_END
setsid nohup bash -c 'export CUDA_VISIBLE_DEVICES=0
  bash scripts/device/tests_job.sh 0 $TESTS_END ${GPU0_TESTS:-tests/test_gpu.py}
  if [ $(( POST_END - $(date +%s) )) -gt 120 ]; then
    timeout $(( POST_END - $(date +%s) )) python3 benchmarks/decode_speed.py --repeats 2 --commit $HYBRIDIZE_GIT_COMMIT \
      --out $RES/decode_speed_h200.json > $RES/decode_speed.log 2>&1 && touch $RES/decode_speed.done
  fi
  touch $RES/gpu0.free' > $RES/logs/gpu0.log 2>&1 < /dev/null &
setsid nohup bash -c 'export CUDA_VISIBLE_DEVICES=1
  bash scripts/device/tests_job.sh 1 $TESTS_END ${GPU1_TESTS:-tests/test_sparse_gpu.py tests/test_graph_decode_gpu.py \
    tests/test_prefill_attention_gpu.py tests/test_triton_select.py tests/test_convert.py}
  if [ $(( POST_END - $(date +%s) )) -gt 150 ]; then
    timeout $(( POST_END - $(date +%s) )) python3 benchmarks/sparse_attention.py --time-budget 60 \
      --out $RES/sparse_attention_h200.json > $RES/sparse_attention.log 2>&1 && touch $RES/sparse_attention.done
  fi
  touch $RES/gpu1.free' > $RES/logs/gpu1.log 2>&1 < /dev/null &
sleep 30
WAIT_FOR="gpu0.free gpu1.free" snapshot_when_done call1
