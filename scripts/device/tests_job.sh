#!/usr/bin/env bash
# GPU test files on one GPU, one pytest process per file (a CUDA error such as an illegal address is sticky for
# its process: on 2026-11-30 one in test_graph_decode_gpu.py turned every later test of a shared process into a
# set-up error), each stopped at a deadline. One line per file goes to $RES/tests_gpu.log.
# usage: tests_job.sh GPU DEADLINE_EPOCH FILE...   (TAG=name: a suffix for the logs of a re-run)
gpu=$1
export CUDA_VISIBLE_DEVICES=$gpu
deadline=$2
shift 2
cd "$(dirname "$0")/../.."
RES=${RES:-/root/res}
for f in "$@"; do
  n=$(basename "$f" .py)${TAG:+_$TAG}
  left=$(( deadline - $(date +%s) ))
  if [ $left -lt 20 ]; then echo "$f gpu$gpu${TAG:+ $TAG}: not run (time)" >> $RES/tests_gpu.log; continue; fi
  timeout $left python3 -m pytest -m gpu -v -rfEs -p no:cacheprovider --junitxml=$RES/$n.xml "$f" > $RES/$n.log 2>&1
  echo "$f gpu$gpu${TAG:+ $TAG} rc $?: $(tail -n 1 $RES/$n.log)" >> $RES/tests_gpu.log
done
