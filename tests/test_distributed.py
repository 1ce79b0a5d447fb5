"""FSDP2 under torchrun (2 CPU processes, gloo) gives the same losses and weights as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_convert import data_file, tiny_teacher_dir  # noqa: F401  (fixtures)

WORKER = Path(__file__).with_name("dist_convert_worker.py")


def _run(cmd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _torchrun(*args, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(tiny_teacher_dir, data_file, tmp_path):  # noqa: F811
    """1 process, 2 FSDP2 processes, 1 process with 2 accumulated micro-batches and 2 processes with 2 each
    (FSDP2 gradient reduction only after the last one): the same losses, gradient norms and weights."""
    single = tmp_path / "single"
    _run([sys.executable, str(WORKER), str(tiny_teacher_dir), str(data_file), str(single)])
    others = {
        "sharded": _torchrun(str(WORKER), str(tiny_teacher_dir), str(data_file), str(tmp_path / "sharded"), port=29517),
        "accum": [sys.executable, str(WORKER), str(tiny_teacher_dir), str(data_file), str(tmp_path / "accum"), "2"],
        "sharded_accum": _torchrun(str(WORKER), str(tiny_teacher_dir), str(data_file), str(tmp_path / "sharded_accum"), "2",
                                   port=29518),
    }
    wa = load_file(str(single / "stage2" / "model" / "model.safetensors"))
    for name, cmd in others.items():
        _run(cmd)
        other = tmp_path / name
        for stage in ("stage1", "stage2"):
            a = json.loads((single / stage / "manifest.json").read_text())
            b = json.loads((other / stage / "manifest.json").read_text())
            assert a["tokens_seen"] == b["tokens_seen"]
            assert b["loss_curve"] == pytest.approx(a["loss_curve"], rel=1e-4, abs=1e-6), (name, stage)
            assert len(a["grad_norm_curve"]) == len(a["loss_curve"]) and min(a["grad_norm_curve"]) > 0
            assert b["grad_norm_curve"] == pytest.approx(a["grad_norm_curve"], rel=1e-4), (name, stage)  # global norm
        wb = load_file(str(other / "stage2" / "model" / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


def test_fsdp_scaling_script_refuses_bad_arguments(tmp_path):
    """benchmarks/fsdp_scaling.py: convert flags only after `--`, none of them --out, --out a directory."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fsdp_scaling", Path(__file__).parents[1] / "benchmarks" / "fsdp_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["--gpus", "2", "--out", str(tmp_path / "o")],  # no --
                 ["--gpus", "2", "--out", str(tmp_path / "o"), "--"],  # nothing after --
                 ["--gpus", "2", "--out", str(tmp_path / "o"), "--", "--out=/x"],
                 ["--gpus", "1", "--", "--no-eval"],
                 ["--gpus", "2", "--accum-check", "--out", str(tmp_path / "o"), "--", "--grad-accum", "2"],
                 ["--gpus", "2", "--out", str(afile), "--", "--no-eval"]):
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2, argv
    assert not (tmp_path / "o").exists()


def test_fsdp_scaling_timeout_kills_the_launcher_and_its_workers(tmp_path):
    """A run past --timeout is killed with its whole process group (a torchrun worker left alive kept the GPU
    and the run directory's lock), and recorded as a timeout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_scaling", Path(__file__).parents[1] / "benchmarks" / "fsdp_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log = tmp_path / "run.log"
    run = mod._launch(1, ["--help"], tmp_path / "run", log, timeout=0.5)
    assert run["returncode"] == "timeout" and run["wall_s"] < 30
    assert "killed after the --timeout" in log.read_text()
