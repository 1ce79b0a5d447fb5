"""FSDP2 under torchrun (2 CPU processes, gloo) gives the same losses and weights as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import benchmark_script
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
    """1 process, 2 FSDP2 processes, 1 process with 2 accumulated micro-batches, 2 processes with 2 each
    (FSDP2 gradient reduction only after the last one), 2 processes keeping the gathered weights from
    forward to backward (--no-fsdp-reshard), 2 processes prefetching two layers ahead (--fsdp-prefetch 2) and 2
    processes with one FSDP2 unit for all trained weights (--fsdp-unit model; stage 1 keeps one per mixer): the
    same losses, gradient norms and weights."""
    single = tmp_path / "single"
    _run([sys.executable, str(WORKER), str(tiny_teacher_dir), str(data_file), str(single)])
    variants = {  # name -> (processes, ConvertOptions fields)
        "sharded": (2, []),
        "accum": (1, ["grad_accum=2"]),
        "sharded_accum": (2, ["grad_accum=2"]),
        "sharded_keep": (2, ["fsdp_reshard_after_forward=false"]),
        "sharded_prefetch": (2, ["fsdp_prefetch=2"]),
        "sharded_model_unit": (2, ["fsdp_unit=model"]),
    }
    others = {}
    for port, (name, (nproc, fields)) in enumerate(variants.items(), start=29517):
        args = [str(WORKER), str(tiny_teacher_dir), str(data_file), str(tmp_path / name), *fields]
        others[name] = _torchrun(*args, port=port) if nproc == 2 else [sys.executable, *args]
    wa = load_file(str(single / "stage2" / "model" / "model.safetensors"))
    for name, cmd in others.items():
        _run(cmd)
        fields = variants[name][1]
        other = tmp_path / name
        for stage in ("stage1", "stage2"):
            a = json.loads((single / stage / "manifest.json").read_text())
            b = json.loads((other / stage / "manifest.json").read_text())
            assert a["tokens_seen"] == b["tokens_seen"]
            assert b["loss_curve"] == pytest.approx(a["loss_curve"], rel=1e-4, abs=1e-6), (name, stage)
            assert len(a["grad_norm_curve"]) == len(a["loss_curve"]) and min(a["grad_norm_curve"]) > 0
            assert b["grad_norm_curve"] == pytest.approx(a["grad_norm_curve"], rel=1e-4), (name, stage)  # global norm
            for field in fields:  # the option reached the stage's settings
                key, value = field.split("=")
                if key in ("fsdp_prefetch", "fsdp_unit"):
                    assert str(b["settings"][key]) == value, (name, stage, key)
            if stage == "stage1":  # the last step's per-layer losses, over micro-batches and processes
                assert b["per_layer_mse"] == pytest.approx(a["per_layer_mse"], rel=1e-4), name
        wb = load_file(str(other / "stage2" / "model" / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


@pytest.mark.slow
def test_shard_modules_bf16_all_gathers_and_prefetch(tmp_path):
    """``shard_modules`` on 2 gloo processes: with ``param_dtype="bf16"`` every layer's forward sees bf16 weights
    (FSDP2 gathered them in bf16) while the sharded master weights and their gradients stay fp32, and training
    under bf16 autocast stays within bf16 rounding of one fp32 process; with fp32 and explicit prefetch (2 layers
    ahead) the run equals one process."""
    shard_worker = Path(__file__).with_name("dist_shard_worker.py")
    _run([sys.executable, str(shard_worker), str(tmp_path / "single.json"), "fp32", "0"])
    for name, dtype, prefetch, port in (("bf16", "bf16", "1", 29531), ("prefetch", "fp32", "2", 29532)):
        _run(_torchrun(str(shard_worker), str(tmp_path / f"{name}.json"), dtype, prefetch, port=port))
    single, bf16, prefetch = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("single", "bf16", "prefetch"))
    assert {tuple(s) for s in single["seen"]} == {("torch.float32", "torch.float32")}
    assert len(bf16["seen"]) == 12 and {tuple(s) for s in bf16["seen"]} == {("torch.bfloat16", "torch.bfloat16")}
    assert bf16["param_dtypes"] == bf16["grad_dtypes"] == ["torch.float32"]
    assert bf16["losses"] == pytest.approx(single["losses"], rel=1e-3)  # measured 2e-4
    assert {tuple(s) for s in prefetch["seen"]} == {("torch.float32", "torch.float32")}
    assert prefetch["losses"] == pytest.approx(single["losses"], rel=1e-4)
    for k, w in single["weights"].items():
        torch.testing.assert_close(torch.tensor(prefetch["weights"][k]), torch.tensor(w), rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(torch.tensor(bf16["weights"][k]), torch.tensor(w), rtol=0, atol=1e-3, msg=k)  # measured 6e-5


def test_prefetch_plan_and_shard_options_are_checked():
    from hybridize.convert.distributed import prefetch_plan, shard_modules

    assert prefetch_plan(4, 1) == [([1], []), ([2], [0]), ([3], [1]), ([], [2])]
    assert prefetch_plan(4, 2) == [([1, 2], []), ([2, 3], [0]), ([3], [1, 0]), ([], [2, 1])]
    assert prefetch_plan(1, 3) == [([], [])]
    with pytest.raises(ValueError, match="--fsdp-param-dtype"):
        shard_modules([], param_dtype="fp16")
    with pytest.raises(ValueError, match="--fsdp-prefetch"):
        shard_modules([], prefetch=-1)
    with pytest.raises(ValueError, match="--fsdp-unit"):
        shard_modules([], unit="block")
    with pytest.raises(ValueError, match="needs the root module"):
        shard_modules([], unit="model")
    with pytest.raises(ValueError, match="needs --fsdp-unit layer"):
        shard_modules([], torch.nn.Linear(2, 2), unit="model", prefetch=1)
    with pytest.raises(ValueError, match="prefetch needs the root module"):
        shard_modules([torch.nn.Linear(2, 2)], prefetch=1)
    stack = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"units \[1\] are not submodules of the root"):
        shard_modules([stack[0], torch.nn.Linear(2, 2)], stack, unit="model")
    shard_modules((m for m in stack), stack, ignored=[stack[0].weight], prefetch=1)  # any iterable; no-op in one process
    for n, k in ((3, 0), (3, -1), (-1, 1)):
        with pytest.raises(ValueError, match="prefetch_plan needs"):
            prefetch_plan(n, k)


def test_model_unit_keeps_its_weights_gathered_from_forward_to_backward():
    """--fsdp-unit model: one all-gather per step. Between forward and backward the weights stay gathered (plain
    tensors, not DTensor shards) even when reshard-after-forward is asked for (it would only add a second,
    unoverlapped all-gather: the backward needs every weight at once); per layer they are freed (the default)."""
    code = """
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
from hybridize.convert.distributed import shard_modules
for unit in ("model", "layer"):
    m = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    shard_modules(list(m), m, reshard_after_forward=True, unit=unit)
    out = m(torch.randn(2, 8)).sum()
    print(unit, isinstance(m[1].weight, DTensor))
    out.backward()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["model", "False", "layer", "True"]


def test_fsdp_options_are_checked_before_any_work(monkeypatch, tmp_path):
    from hybridize.convert.pipeline import ConvertOptions, check_convert_options

    opts = ConvertOptions(out=str(tmp_path / "run"), device="cpu", fsdp_param_dtype="bf16")
    check_convert_options(opts)  # one process: no FSDP2, nothing to refuse
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--fsdp-param-dtype bf16 needs CUDA"):
        check_convert_options(opts)
    with pytest.raises(ValueError, match="--fsdp-prefetch"):
        check_convert_options(ConvertOptions(out=str(tmp_path / "run"), device="cpu", fsdp_prefetch=-2))
    with pytest.raises(ValueError, match="--fsdp-param-dtype must be one of"):
        check_convert_options(ConvertOptions(out=str(tmp_path / "run"), device="cpu", fsdp_param_dtype="float16"))
    with pytest.raises(ValueError, match="--fsdp-unit must be one of"):
        check_convert_options(ConvertOptions(out=str(tmp_path / "run"), device="cpu", fsdp_unit="block"))
    with pytest.raises(ValueError, match="needs --fsdp-unit layer"):
        check_convert_options(ConvertOptions(out=str(tmp_path / "run"), device="cpu", fsdp_unit="model", fsdp_prefetch=1))


def test_fsdp_scaling_script_refuses_bad_arguments(tmp_path):
    """benchmarks/fsdp_scaling.py: convert flags only after `--`, none of them --out, --out a directory."""
    mod = _fsdp_scaling_module()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["--gpus", "2", "--out", str(tmp_path / "o")],  # no --
                 ["--gpus", "2", "--out", str(tmp_path / "o"), "--"],  # nothing after --
                 ["--gpus", "2", "--out", str(tmp_path / "o"), "--", "--out=/x"],
                 ["--gpus", "1", "--", "--no-eval"],
                 ["--gpus", "2", "--accum-check", "--out", str(tmp_path / "o"), "--", "--grad-accum", "2"],
                 ["--gpus", "2", "--out", str(tmp_path / "o"), "--", "--help"],
                 ["--gpus", "2", "--out", str(afile), "--", "--no-eval"]):
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2, argv
    assert not (tmp_path / "o").exists()
    assert mod.main(["--help"]) == 0  # help without the `--` part


def _fsdp_scaling_module():
    return benchmark_script("fsdp_scaling")


@pytest.mark.parametrize("launcher_kind", ["plain", "ignores_sigterm_spawns_from_a_thread"])
def test_fsdp_scaling_timeout_stops_the_launcher_and_its_workers(tmp_path, launcher_kind):
    """Past --timeout the launcher and every process it started are stopped, also a worker in a session of its
    own (as torchrun starts them: killing the launcher's group alone left one training and holding the lock),
    started from another thread, under a launcher that ignores SIGTERM."""
    mod = _fsdp_scaling_module()
    pid_file = tmp_path / "worker.pid"
    start = (
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        f"    open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
    )
    if launcher_kind == "plain":
        launcher = "import subprocess, sys, time\nif True:\n    " + start + "time.sleep(120)\n"
    else:
        launcher = ("import signal, subprocess, sys, threading, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "def spawn():\n    " + start + "    time.sleep(120)\n"  # the thread lives on: its child stays its own
                    "threading.Thread(target=spawn, daemon=True).start()\ntime.sleep(120)\n")
    log = tmp_path / "run.log"
    with log.open("w") as fh:
        assert mod.run_with_timeout([sys.executable, "-c", launcher], dict(os.environ), fh, timeout=3, grace=2) == "timeout"
    worker = int(pid_file.read_text())

    def alive(pid):  # a killed child of an exited parent may linger as a zombie until init reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 5
    while alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the launcher's worker outlived the timeout"
    assert "stopped after the --timeout" in log.read_text()


def test_fsdp_scaling_refuses_bad_timeouts_and_old_runs(tmp_path):
    mod = _fsdp_scaling_module()
    for t in ("0", "-5", "nan", "inf"):
        with pytest.raises(SystemExit):
            mod.main(["--gpus", "2", "--timeout", t, "--out", str(tmp_path / "o"), "--", "--no-eval"])
    (tmp_path / "runs" / "1gpu" / "stage1").mkdir(parents=True)
    with pytest.raises(SystemExit):  # would resume the old run and report its figures
        mod.main(["--gpus", "2", "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "runs"), "--", "--no-eval"])
    assert (tmp_path / "runs" / "1gpu" / "stage1").is_dir() and not (tmp_path / "o").exists()


def _stage2_gradient_module():
    return benchmark_script("stage2_gradient")


def test_stage2_gradient_script_on_cpu(tmp_path):
    """benchmarks/stage2_gradient.py (issue 7's diagnosis) on the tiny model on CPU, where every op is
    deterministic: repeats are bitwise equal, the split and the reference path agree to fp32 rounding, and the
    comparison itself notices a changed gradient."""
    mod = _stage2_gradient_module()
    out = tmp_path / "g.json"
    assert mod.main(["--device", "cpu", "--rows", "2", "--seq-len", "64", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batch"] == [2, 64] and len(r["loss"]) == 3 and r["fast_backends"]["lightning"] == "reference"
    assert all(x["bitwise_equal"] for x in r["repeat"])
    assert r["split"]["rel_diff"] < 1e-5 and r["reference"]["rel_diff"] < 1e-5 and r["fp32"]["rel_diff"] < 1e-5
    assert [x["eps"] for x in r["perturb"]] == [1e-5, 1e-4, 1e-3]
    assert 0 < r["perturb"][0]["rel_diff"] < r["perturb"][-1]["rel_diff"]  # a larger perturbation moves it more
    assert all(k["bitwise_equal"] for k in r["kernels"].values()) and set(r["kernels"]) == {
        "lightning_attention", "sdpa_causal_gqa", "chunked_kl"}
    a = {"w": torch.ones(4), "b": torch.ones(2)}
    changed = mod.compare({"w": torch.ones(4), "b": torch.tensor([1.0, 2.0])}, a)
    assert not changed["bitwise_equal"] and changed["worst"][0]["param"] == "b" and changed["rel_diff"] == pytest.approx(1 / 6**0.5)


@pytest.mark.parametrize("argv, message", [
    (["--rows", "3"], "--rows must be an even number"),
    (["--repeats", "1"], "--repeats must be >= 2"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--layer-types", "LXA"], "letters L (Lightning) and A"),
    (["--teacher", "{tmp}/none"], "does not exist"),
    (["--data", "x.jsonl"], "--data needs a real --teacher"),
    (["--stage1", "{tmp}"], "no mixers.safetensors"),
])
def test_stage2_gradient_script_names_bad_arguments(tmp_path, capsys, argv, message):
    mod = _stage2_gradient_module()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        mod.main(["--device", "cpu", "--rows", "2", "--seq-len", "8", *argv])
    assert exc.value.code != 0
    assert message in (str(exc.value.code) + capsys.readouterr().err)


def _runs_summary_module():
    return benchmark_script("fsdp_runs_summary")


RESULTS_74 = Path(__file__).parents[1] / "benchmarks" / "results" / "fsdp2_h200x2_74d9855"


def test_fsdp_runs_summary_groups_runs_and_compares_with_the_run_to_run_spread(tmp_path):
    """benchmarks/fsdp_runs_summary.py on the committed H200 runs: groups by process count and --grad-accum,
    means, spreads and throughput ratios as recomputed here from the manifests."""
    mod = _runs_summary_module()
    out = tmp_path / "s"
    assert mod.main(["--scaling", str(RESULTS_74 / "results.json"), "--run", f"r1={RESULTS_74 / 'runs' / '1gpu_repeat'}",
                     "--run", f"r2={RESULTS_74 / 'runs' / '2gpu_repeat'}", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (out / "loss_curves.png").stat().st_size > 0
    assert sorted(s["groups"]["1proc_accum1"]["runs"]) == ["1gpu", "r1"] and sorted(s["groups"]["2proc_accum1"]["runs"]) == ["2gpu", "r2"]
    finals = [json.loads((RESULTS_74 / "runs" / r / "stage2" / "manifest.json").read_text())["final_loss"] for r in ("1gpu_repeat", "2gpu_repeat")]
    scaling = json.loads((RESULTS_74 / "results.json").read_text())["runs"]
    one = [scaling["1gpu"]["stages"]["stage2"]["final_loss"], finals[0]]
    two = [scaling["2gpu"]["stages"]["stage2"]["final_loss"], finals[1]]
    g2 = s["groups"]["2proc_accum1"]["stage2"]
    assert g2["final_loss_spread"] == pytest.approx(max(two) - min(two))
    d = s["group_differences"]["2proc_accum1_vs_1proc_accum1"]["stage2"]
    assert d["final_loss_mean_diff"] == pytest.approx(sum(two) / 2 - sum(one) / 2)
    assert d["within_noise"] == (abs(d["final_loss_mean_diff"]) <= max(g2["final_loss_spread"], s["groups"]["1proc_accum1"]["stage2"]["final_loss_spread"]))


def test_fsdp_runs_summary_names_bad_runs_and_writes_nothing(tmp_path, capsys):
    import shutil

    mod = _runs_summary_module()
    bad = tmp_path / "bad"
    shutil.copytree(RESULTS_74 / "runs" / "1gpu_repeat", bad)
    manifest = bad / "stage2" / "manifest.json"
    m = json.loads(manifest.read_text())
    good = RESULTS_74 / "runs" / "2gpu_repeat"
    out = tmp_path / "out"
    for change, message in (({"final_loss": None}, "final_loss is None"), ({"status": "failed"}, "not complete"),
                            ({"world_size": "2"}, "world_size is '2'"), ({"loss_curve": []}, "loss_curve")):
        manifest.write_text(json.dumps({**m, **change}))
        assert mod.main(["--run", f"a={bad}", "--run", f"b={good}", "--out", str(out)]) == 1
        assert message in capsys.readouterr().err and not out.exists()
    manifest.write_text("{not json")
    assert mod.main(["--run", f"a={bad}", "--run", f"b={good}", "--out", str(out)]) == 1
    assert "cannot be read as JSON" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        mod.main(["--run", f"a={good}", "--run", f"b={good}", "--out", str(out)])
    assert "counts once" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        mod.main(["--run", f"a={good}", "--run", f"b={bad}", "--out", str(tmp_path / "f")])
    assert "is a file" in capsys.readouterr().err


def test_stage2_mixers_that_do_not_fit_are_named(tmp_path):
    """build_hybrid with a damaged or foreign stage-1 mixers file: CheckpointFormatError naming the key."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.convert.align import build_lightning_students, mixers_state
    from hybridize.convert.distill import build_hybrid
    from hybridize.errors import CheckpointFormatError

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    teacher = LlamaForCausalLM(cfg)
    mixers, _ = build_lightning_students(teacher)
    tensors = {k: v.contiguous() for k, v in mixers_state(mixers).items()}
    path = tmp_path / "mixers.safetensors"
    save_file(tensors, str(path))
    build_hybrid(teacher, ["lightning", "attention"], path)  # the right file loads
    key = next(k for k in tensors if k.startswith("layers.0."))
    cases = [({k: v for k, v in tensors.items() if k != key}, "is missing"),
             ({**tensors, key: torch.zeros(3)}, "has shape (3,)"),
             ({**tensors, "layers.7.q_proj.weight": torch.zeros(3)}, "do not belong to this teacher (2 layers)"),
             ({**tensors, key: torch.full_like(tensors[key], float("nan"))}, "NaN")]
    for content, message in cases:
        save_file(content, str(path))
        with pytest.raises(CheckpointFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_hybrid(teacher, ["lightning", "attention"], path)
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointFormatError, match="cannot read the stage-1 mixers"):
        build_hybrid(teacher, ["lightning", "attention"], path)


def test_fsdp_cpu_overhead_script(tmp_path, capsys, monkeypatch):
    """The CPU-overhead benchmark runs the library's stage-2 step with and without FSDP2 (fake process group) and
    records ms per step per variant, rewriting its JSON after each (a failed variant leaves the finished ones,
    marked incomplete); bad arguments are named before any work."""
    mod = benchmark_script("fsdp_cpu_overhead")
    out = tmp_path / "r" / "overhead.json"
    variants = ["one process", "FSDP2 per layer", "FSDP2 --fsdp-unit model", "stage 1: one process", "stage 1: FSDP2 per mixer"]
    assert mod.main(["--layer-types", "LALL", "--repeats", "1", "--out", str(out), "--variants", *variants]) == 0
    record = json.loads(out.read_text())
    assert list(record["results"]) == variants and record["torch"] == torch.__version__ and record["git_commit"]
    assert record["complete"] is True and "error" not in record
    for r in record["results"].values():
        assert r["ms_per_step"] > 0 and r["runs_ms_per_step"] == [r["ms_per_step"]] == [r["best_ms_per_step"]]
    assert record["results"]["one process"]["extra_ms_vs_one_process"] == 0
    stage1 = record["results"]["stage 1: FSDP2 per mixer"]  # counted from stage 1's own one-process step
    assert stage1["extra_ms_vs_one_process"] == stage1["ms_per_step"] - record["results"]["stage 1: one process"]["ms_per_step"]
    real_run = mod.subprocess.run

    def second_fails(cmd, **kw):
        if cmd[-1] == "FSDP2 per layer":
            return subprocess.CompletedProcess(cmd, 1, "", "boom")
        return real_run(cmd, **kw)

    monkeypatch.setattr(mod.subprocess, "run", second_fails)
    assert mod.main(["--layer-types", "LALL", "--repeats", "1", "--out", str(out), "--variants", *variants]) == 1
    record = json.loads(out.read_text())
    assert record["complete"] is False and list(record["results"]) == ["one process"]
    assert record["error"].startswith("FSDP2 per layer: failed (rc 1)")
    monkeypatch.setattr(mod.subprocess, "run", real_run)
    capsys.readouterr()
    (tmp_path / "f").write_text("a file")
    for argv, message in ((["--variants", "two processes"], "unknown variant"), (["--layer-types", "LAX"], "letters A and L"),
                          (["--steps", "11"], "--steps must be >= 12"), (["--heads", "9", "--kv-heads", "2"], "multiple"),
                          (["--head-dim", "3"], "must be even"), (["--variants", "one process", "one process"], "twice"),
                          (["--out", str(tmp_path / "f" / "x.json")], "--out"), (["--out", str(tmp_path)], "is a directory"),
                          (["--out", str(tmp_path / "new") + "/"], "is a directory")):
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "new").exists()
