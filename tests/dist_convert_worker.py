"""Worker for tests/test_distributed.py: run the conversion pipeline (stages 1, selection, 2) on a tiny
teacher. Launched under `torchrun --nproc_per_node 2` (FSDP2, gloo) and in one process for comparison; an optional
fourth argument sets the gradient accumulation (micro-batches per step and process), a fifth ("keep") turns
FSDP2's reshard-after-forward off."""

import sys

from hybridize.convert.pipeline import ConvertOptions, run_convert

teacher, data, out = sys.argv[1:4]
grad_accum = int(sys.argv[4]) if len(sys.argv) > 4 else 1
reshard = sys.argv[5] != "keep" if len(sys.argv) > 5 else True
run_convert(
    ConvertOptions(
        teacher=teacher, data=[data], out=out, seq_len=32, stage1_tokens=32 * 4 * 4, stage1_batch=4,
        stage2_tokens=32 * 4 * 4, stage2_batch=4, selection="even", eval=False, checkpoint_every=2, device="cpu",
        grad_accum=grad_accum, fsdp_reshard_after_forward=reshard,
    )
)
