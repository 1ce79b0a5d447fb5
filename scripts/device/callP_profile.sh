#!/usr/bin/env bash
# Device run for issue 7's throughput question, calls on one held 2-GPU machine:
#   STEP=stash    (carry .whl .gpu1): keeps the first half of the teacher GGUF and the text assets; returns at once.
#   STEP=profile  (carry .whl .gpu2): joins the GGUF, builds the training text, then runs stages 1-2 of the
#     embedded teacher's conversion on 1 GPU and on 2 GPUs (FSDP2) with --profile-steps 3 (same settings as
#     benchmarks/results/fsdp2_h200x2_74d9855) and returns each run's manifests, logs and per-rank profile tables
#     (profile.tgz) and each rank's stage-2 trace gzipped as a file of its own when under 16 MB. About 5 minutes warm.
#   STEP=variants (carry .whl; after STEP=profile on the same held machine): stage 2 again, on the stage 1 of the
#     profile runs, once per entry of VARIANTS ("gpus:label:convert flags", entries separated by ';'; default: the
#     FSDP2 options --fsdp-unit model (with and without --no-fsdp-reshard), --fsdp-prefetch 1,
#     --fsdp-param-dtype bf16, and a second 1-GPU run for the run-to-run spread); about a minute each.
source scripts/device/common.sh
mkdir -p $RES/logs
LT=$H200_LT
FLAGS="--data /root/h200_train.jsonl --layer-types $LT --seq-len 512 --stage1-tokens 983040 --stage1-batch 64
  --stage2-tokens 2621440 --stage2-batch 128 --no-eval --device cuda --checkpoint-every 1000"
convert() {  # convert <gpus> <run dir> <log> <extra flags...>; never past this call's budget (END, common.sh)
  local n=$1 dir=$2 log=$3 rc limit; shift 3
  limit=$(( END - SECONDS - 20 )); [ $limit -gt ${PER_RUN:-240} ] && limit=${PER_RUN:-240}
  [ $limit -ge 30 ] || { echo "$(basename "$dir"): skipped, call budget spent"; return 1; }
  timeout -k 15 $limit python3 -m torch.distributed.run --standalone --nproc_per_node=$n -m hybridize convert $FLAGS "$@" \
    --out "$dir" > "$log" 2>&1
  rc=$?
  echo "$(basename "$dir") rc $rc $(grep -ho 'stage2 step [0-9/]* loss [0-9.]*.*tok/s' "$log" | tail -1)"
  return $rc
}
case "${STEP:?set STEP=stash, profile or variants}" in
stash)
  stash_gpu1 && echo stashed
  exit $? ;;
profile)
  join_gpu2 || exit 1
  for n in 1 2; do
    rm -rf /root/prof_runs/${n}gpu
    convert $n /root/prof_runs/${n}gpu $RES/${n}gpu.log --profile-steps 3 ${EXTRA:-}
    copy_run /root/prof_runs/${n}gpu $RES/${n}gpu
    (cd /root/prof_runs/${n}gpu && find . -name 'profile_rank*.txt' -exec cp --parents {} $RES/${n}gpu \;)
    # the traces come back as files of their own ($OUT takes 8 files of at most 16 MiB each)
    for t in /root/prof_runs/${n}gpu/stage2/profile_rank*.json; do
      [ -f "$t" ] || continue
      r=$(basename $t .json); gzip -c "$t" > $OUT/trace_${n}gpu_${r#profile_}.json.gz
      [ $(stat -c %s $OUT/trace_${n}gpu_${r#profile_}.json.gz) -lt 16000000 ] || rm -f $OUT/trace_${n}gpu_${r#profile_}.json.gz
    done
    grep -h "profiled steps" $RES/${n}gpu.log
  done
  tar czf "$OUT/profile.tgz" -C $RES . && ls -la "$OUT" ;;
variants)
  [ -f /root/h200_train.jsonl ] || { echo "run STEP=profile first on this held machine"; exit 1; }
  DEFAULT="2:unit_model:--fsdp-unit model;2:prefetch1:--fsdp-prefetch 1;2:bf16:--fsdp-param-dtype bf16;2:unit_model_bf16:--fsdp-unit model --fsdp-param-dtype bf16;1:1gpu_again:"
  worst=0
  IFS=';' read -ra ENTRIES <<< "$(printf '%s' "${VARIANTS:-$DEFAULT}" | tr '\n' ';')"
  for entry in "${ENTRIES[@]}"; do
    [ -n "${entry// /}" ] || continue
    IFS=':' read -r n label flags <<< "$entry"
    if [[ ! "$n" =~ ^[12]$ || ! "$label" =~ ^[A-Za-z0-9_.-]+$ ]]; then
      echo "skipped: '$entry' (want gpus:label:flags, gpus 1 or 2, label of letters, digits, _ . -)"; continue
    fi
    [ -f /root/prof_runs/${n}gpu/stage1/manifest.json ] || { echo "$label: skipped, no finished ${n}-GPU stage 1 to start from"; worst=1; continue; }
    dir="/root/var_runs/$label"
    rm -rf "$dir" && mkdir -p "$dir" && cp -r /root/prof_runs/${n}gpu/stage0 /root/prof_runs/${n}gpu/stage1 "$dir/" || continue
    convert $n "$dir" "$RES/var_$label.log" $flags || worst=1
    copy_run "$dir" "$RES/var_$label"
    # after each run, so whatever finished comes back even if a later one is cut off
    (cd $RES && tar czf "$OUT/variants.tgz" var_* logs)
  done
  ls -la "$OUT"
  exit $worst ;;
*) echo "unknown STEP=$STEP"; exit 2 ;;
esac
