#!/usr/bin/env bash
# Re-test after the verification run's fixes (one GPU; carry .whl): the GPU test files that failed, each in its
# own process, in parallel with scripts/device/graph_decode_variants.py (which GraphDecoder configuration
# makes the illegal memory access of test_graph_greedy_generate_matches_eager). LIMIT = seconds per process.
source scripts/device/common.sh
export CUDA_VISIBLE_DEVICES=0
L=${LIMIT:-240}
timeout $L python3 scripts/device/graph_decode_variants.py > $RES/graph_decode_variants.log 2>&1 &
t() { local n=$1; shift; timeout $L python3 -m pytest -m gpu -v -rfEs -p no:cacheprovider --junitxml=$RES/$n.xml "$@" > $RES/$n.log 2>&1
      echo "$n rc $?: $(tail -n 1 $RES/$n.log)" >> $RES/tests_gpu.log; }
t test_sparse_gpu_retest tests/test_sparse_gpu.py &
t test_graph_decode_gpu_retest tests/test_graph_decode_gpu.py --deselect tests/test_graph_decode_gpu.py::test_graph_greedy_generate_matches_eager &
t test_prefill_attention_gpu_retest tests/test_prefill_attention_gpu.py -k flex &
wait
cat $RES/tests_gpu.log $RES/graph_decode_variants.log
tar czf $OUT/call4.tgz -C $RES .
