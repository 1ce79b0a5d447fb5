#!/usr/bin/env bash
# H200 call 1 of 3 (2-GPU machine; stashes the first half of the teacher GGUF for call 2).
# GPU 0: the tiny-teacher conversion on CUDA first (catches a broken training path before call 2 needs it),
#        then tests/test_gpu.py (issue 3).  GPU 1: the sparse and CUDA-graph GPU tests (issues 5, 6).
# Measured 2026-11-29: fla autotunes per new shape (~100 s before the first training step, ~4 s per test),
# so the GPU tests are split over both GPUs and each half gets the whole call.
source scripts/device/common.sh
W=/root/w1; mkdir -p $W
cp .gpu1/gguf.partaa /root/stash/ && tar xJf .gpu1/assets.tar.xz -C "$HYBRIDIZE_CACHE"
PYTEST="python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout $(( $(left) - 10 )) $PYTEST tests/test_convert.py tests/test_gpu.py --junitxml=$W/tests_gpu0.xml > $W/tests_gpu0.log 2>&1
  echo "rc $?" >> $W/tests_gpu0.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout $(( $(left) - 10 )) $PYTEST tests/test_sparse_gpu.py tests/test_triton_select.py tests/test_prefill_attention_gpu.py tests/test_graph_decode_gpu.py --junitxml=$W/tests_gpu1.xml > $W/tests_gpu1.log 2>&1
  echo "rc $?" >> $W/tests_gpu1.log
) &
wait
tail -n 15 $W/tests_gpu0.log $W/tests_gpu1.log
pack call1 $W
