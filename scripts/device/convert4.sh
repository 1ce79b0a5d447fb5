#!/usr/bin/env bash
# The issue-4 conversion on one H200: the embedded SmolLM2-135M teacher, HALO stages 0-2 at the paper's length
# (512) and batches (32 / 96), on the bundled training split + HotpotQA paragraphs (benchmarks/h200_corpus.py).
# Rerunning it resumes from the last checkpoint.
exec python3 -m hybridize convert --data /root/h200_train.jsonl --out /root/run4 --device cuda --no-eval \
    --seq-len 512 --stage1-tokens 8192000 --stage1-batch 32 --stage2-tokens 24576000 --stage2-batch 96 \
    --checkpoint-every 50 "$@"
