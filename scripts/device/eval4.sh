#!/usr/bin/env bash
# The issue-4 evaluation of the H200 conversion: teacher vs hybrid, held-out essay perplexity 512..64K with
# per-position buckets, pass-key (needle) accuracy 1K..64K in two forms, 50 trials each, fixed seed.
exec python3 -m hybridize eval --model /root/run4 --teacher smollm2 --out /root/eval4 \
    --ppl-text essay --ppl-lengths 512 2048 8192 16384 32768 65536 --ppl-sequences 4 \
    --buckets 0 2048 8192 16384 32768 \
    --passkey-lengths 1024 2048 4096 8192 16384 32768 65536 --passkey-trials 50 --seed 0 \
    --passkey-forms repeated essay --device cuda --dtype bfloat16 --no-progress "$@"
