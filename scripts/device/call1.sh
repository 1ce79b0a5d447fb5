#!/usr/bin/env bash
# H200 call 1 of 3 (2-GPU machine). GPU 0: every GPU-marked test, then the sparse-attention benchmark (issue 5).
# GPU 1: `hybridize bench` of the 8B-shaped hybrids (issue 6). Also stashes the first half of the teacher GGUF.
source scripts/device/common.sh
W=/root/w1; mkdir -p $W /root/bench
cp .gpu1/gguf.partaa /root/stash/ && tar xJf .gpu1/assets.tar.xz -C "$HYBRIDIZE_CACHE"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 330 python3 -m pytest -m gpu tests/test_gpu.py tests/test_sparse_gpu.py tests/test_graph_decode_gpu.py tests/test_convert.py -q -rfEs -p no:cacheprovider --junitxml=$W/gpu_tests.xml > $W/gpu_tests.log 2>&1
  echo "gpu tests rc $?" >> $W/gpu_tests.log
  timeout $(left) python3 benchmarks/sparse_attention.py --time-budget 120 --out $W/sparse_attention_h200.json > $W/sparse_attention.log 2>&1
  echo "sparse bench rc $?" >> $W/sparse_attention.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout $(( $(left) - 10 )) python3 -m hybridize bench --presets hypenet-8b sala-8b --total-budget $(( $(left) - 60 )) \
      --profile --commit "$HYBRIDIZE_GIT_COMMIT" --out /root/bench > $W/bench_call1.log 2>&1
  echo "bench rc $?" >> $W/bench_call1.log
) &
wait
cp -r /root/bench $W/bench
tail -n 5 $W/gpu_tests.log $W/sparse_attention.log $W/bench_call1.log
pack call1 $W
