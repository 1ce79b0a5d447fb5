# Sourced by the callN.sh scripts: the set-up every H200 call needs (see README.md "GPU runs").
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
mkdir -p "$HYBRIDIZE_CACHE" /root/stash
END=$((SECONDS + ${BUDGET:-540}))
left() { local l=$((END - SECONDS)); [ $l -gt 5 ] && echo $l || echo 5; }
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "[device] $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1) x$GPUS; torch $(python3 -c 'import torch; print(torch.__version__)'); commit $HYBRIDIZE_GIT_COMMIT"
# where results are collected before they are packed into $OUT (<= 8 files come back)
pack() { tar czf "$OUT/$1.tgz" -C "$2" . && ls -la "$OUT"; }
# copy a run directory's small files (manifests, logs, plots, reports), never weights or checkpoints
copy_run() { (cd "$1" 2>/dev/null && find . -type f \( -name '*.json' -o -name '*.log' -o -name '*.png' -o -name '*.md' \) \
    ! -path '*/model/*' -exec cp --parents {} "$2" \;); }
