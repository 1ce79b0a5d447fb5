"""Worker for tests/test_distributed.py: run the conversion pipeline (stages 1, selection, 2) on a tiny
teacher. Launched under `torchrun --nproc_per_node 2` (FSDP2, gloo) and in one process for comparison; further
arguments ``name=value`` set ConvertOptions fields (grad_accum, fsdp_reshard_after_forward, fsdp_prefetch,
fsdp_unit; values are read as JSON when they parse, else taken as strings)."""

import json
import sys

from hybridize.convert.pipeline import ConvertOptions, run_convert


def _value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


teacher, data, out = sys.argv[1:4]
extra = {k: _value(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
run_convert(
    ConvertOptions(
        teacher=teacher, data=[data], out=out, seq_len=32, stage1_tokens=32 * 4 * 4, stage1_batch=4,
        stage2_tokens=32 * 4 * 4, stage2_batch=4, selection="even", eval=False, checkpoint_every=2, device="cpu",
        **extra,
    )
)
