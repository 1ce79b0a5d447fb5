#!/usr/bin/env bash
# H200 call C of 3: waits for both jobs (or the end of the hold in /root/end_at) and returns the final results.
source scripts/device/common.sh
snapshot_when_done callC final
