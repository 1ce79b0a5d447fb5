#!/usr/bin/env bash
# Device run, call 3 of 3 (carry .whl): waits for the FSDP runs that call 2 started, at most BUDGET seconds (a
# call may last 10 minutes; send it again while the runs go on), and returns everything.
source scripts/device/common.sh
WAIT_FOR=fsdp.done snapshot_when_done call3
