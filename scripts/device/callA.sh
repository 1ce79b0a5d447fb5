#!/usr/bin/env bash
# H200 call A of 3 (2-GPU machine). Starts the two long jobs of this session in their own process sessions
# (setsid: they run on between calls while the machine is held) and returns a snapshot of their results:
#   GPU 0: scripts/device/gpu0_bench.sh (prefill-attention candidates, then one `hybridize bench` run)
#   GPU 1: scripts/device/gpu1_chain.sh (GPU tests, sparse-layer benchmark, then the issue-4 conversion and
#          evaluation once call B has brought the second half of the teacher GGUF)
# Carry: .whl .gpu1 (README "Reproducing the H200 runs").
source scripts/device/common.sh
mkdir -p $RES/logs
cp .gpu1/gguf.partaa /root/stash/ && tar xJf .gpu1/assets.tar.xz -C "$HYBRIDIZE_CACHE" || exit 1
# the end of the machine's hold as far as call A can tell; call B rewrites it from the lease it is told
[ -f /root/end_at ] || echo $(( $(date +%s) + ${HOLD_LEFT:-1650} )) > /root/end_at
setsid nohup bash scripts/device/gpu0_bench.sh > $RES/logs/gpu0.log 2>&1 < /dev/null &
setsid nohup bash scripts/device/gpu1_chain.sh > $RES/logs/gpu1.log 2>&1 < /dev/null &
snapshot_when_done callA
