#!/usr/bin/env bash
# The issue-4 conversion on one H200: the embedded SmolLM2-135M teacher, HALO stages 1-2 at the paper's length
# (512; batches 32 / 96) and a short stage 3 at 16K (batch 4), on the bundled training split + HotpotQA
# paragraphs (benchmarks/h200_corpus.py). Token counts sized to the device session (~9 minutes).
# Rerunning it resumes from the last checkpoint.
exec python3 -m hybridize convert --data /root/h200_train.jsonl --out /root/run4 --device cuda --no-eval \
    --seq-len 512 --stage1-tokens 4096000 --stage1-batch 32 --stage2-tokens 12288000 --stage2-batch 96 \
    --stage3 --stage3-tokens 1048576 --stage3-seq-len 16384 --stage3-batch 4 \
    --checkpoint-every 50 "$@"
