#!/usr/bin/env bash
# Device run for issue 7's throughput question, two calls on one held 2-GPU machine:
#   STEP=stash   (carry .whl .gpu1): keeps the first half of the teacher GGUF and the text assets; returns at once.
#   STEP=profile (carry .whl .gpu2): joins the GGUF, builds the training text, then runs stages 1-2 of the
#   embedded teacher's conversion on 1 GPU and on 2 GPUs (FSDP2) with --profile-steps 3 (same settings as
#   benchmarks/results/fsdp2_h200x2_74d9855) and returns each run's manifests, logs and per-rank profile tables
#   (the traces only gzipped and when small). Needs about 5 minutes warm.
source scripts/device/common.sh
mkdir -p $RES/logs
if [ "${STEP:?set STEP=stash or STEP=profile}" = stash ]; then
  stash_gpu1 && echo stashed
  exit $?
fi
join_gpu2 || exit 1
LT=$H200_LT
FLAGS="--data /root/h200_train.jsonl --layer-types $LT --seq-len 512 --stage1-tokens 983040 --stage1-batch 64
  --stage2-tokens 2621440 --stage2-batch 128 --no-eval --device cuda --checkpoint-every 1000 --profile-steps 3 ${EXTRA:-}"
for n in 1 2; do
  rm -rf /root/prof_runs/${n}gpu
  timeout ${PER_RUN:-240} python3 -m torch.distributed.run --standalone --nproc_per_node=$n -m hybridize convert $FLAGS \
    --out /root/prof_runs/${n}gpu > $RES/${n}gpu.log 2>&1
  echo "${n}gpu rc $?"
  copy_run /root/prof_runs/${n}gpu $RES/${n}gpu
  (cd /root/prof_runs/${n}gpu && find . -name 'profile_rank*.txt' -exec cp --parents {} $RES/${n}gpu \;)
  for t in /root/prof_runs/${n}gpu/stage2/profile_rank*.json; do
    [ -f "$t" ] && [ $(stat -c %s "$t") -lt 80000000 ] && gzip -c "$t" > $RES/${n}gpu/stage2/$(basename $t).gz
  done
  grep -h "profiled steps" $RES/${n}gpu.log
done
tar czf "$OUT/profile.tgz" -C $RES . && ls -la "$OUT"
