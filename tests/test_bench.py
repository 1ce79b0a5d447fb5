"""``hybridize bench`` end to end on CPU with the tiny presets (issue 6): JSON + PNG + table, OOM recording,
merging, the presets' shapes and the roofline arithmetic."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hybridize.bench import PRESETS, build_model, measure
from hybridize.bench.measure import decode_bytes_per_token, predict_seconds, weight_bytes
from hybridize.bench.presets import layer_schedule
from hybridize.cli import main

ARGS = ["bench", "--device", "cpu", "--lengths", "64", "160", "--decode-tokens", "2", "--chunk-size", "64"]
ROW_FIELDS = ("ttft_s", "decode_ms_per_token", "peak_memory_bytes")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


def _load(out):
    return json.loads((out / "results.json").read_text())


def test_bench_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main([*ARGS, "--presets", "tiny", "tiny-full", "tiny-hf", "--out", str(out), "--profile"]) == 0
    data = _load(out)
    assert data["device"] == "cpu" and data["torch"] == torch.__version__
    assert data["git"]["commit"] and data["command"].startswith("hybridize bench --device cpu")
    assert "--out" in data["command"] and data["copy_bandwidth"]["bytes_per_s"] > 0
    rows = {(r["preset"], r["context"]): r for r in data["results"]}
    assert set(rows) == {(p, c) for p in ("tiny", "tiny-full", "tiny-hf") for c in (64, 160)}
    for row in rows.values():
        assert row["status"] == "ok", row
        for key in ROW_FIELDS:
            assert isinstance(row[key], (int, float)) and row[key] > 0, (key, row)
        roof = row["roofline"]
        assert roof["bytes_per_token"] == sum(roof["components"].values()) > 0
        assert 0 < roof["achieved_fraction"] and roof["ms_per_token"] > 0
    hybrid = rows[("tiny", 160)]
    assert set(hybrid["prefill_breakdown_s"]) >= {"attention", "lightning", "sparse", "mlp", "other"}
    assert hybrid["graph"] is False and hybrid["decode_attention"] == "split"
    assert hybrid["prefill_attention"] == "sdpa" and hybrid["prefill_attention_error"] is None
    prof = hybrid["decode_profile"]
    assert prof["steps"] == 3 and prof["kernels_per_step"] > 10 and prof["top"][0]["ms_per_step"] > 0
    assert data["presets"]["tiny"]["schedule"] == "SLAL" and data["presets"]["tiny"]["warmup"]["status"] == "ok"
    for name in ("ttft.png", "decode.png", "memory.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    table = (out / "results.md").read_text()
    assert "| tiny | 160 |" in table and "x /" in table  # speed-ups against tiny-full / tiny-hf
    assert "| preset | context |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
        lambda: RuntimeError("CUDA error: out of memory"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_oom_at_one_length_is_recorded_and_the_run_continues(tmp_path, monkeypatch, error):
    real = measure.measure_hybrid

    def flaky(model, context, *args, state=None, **kwargs):
        if context == 160:
            state["stage"] = "prefill"
            raise error()
        return real(model, context, *args, state=state, **kwargs)

    monkeypatch.setattr(measure, "measure_hybrid", flaky)
    out = tmp_path / "b"
    assert main([*ARGS, "--lengths", "64", "160", "200", "--presets", "tiny", "--out", str(out), "--no-warmup"]) == 0
    rows = {r["context"]: r for r in _load(out)["results"]}
    assert rows[64]["status"] == "ok" and rows[200]["status"] == "ok"
    oom = rows[160]
    assert oom["status"] == "oom" and oom["stage"] == "prefill" and "out of memory" in oom["error"].lower()
    assert all(oom[k] == "oom" for k in ROW_FIELDS)
    assert "OOM" in (out / "results.md").read_text()


def test_other_errors_are_recorded_and_runs_merge(tmp_path, monkeypatch):
    out = tmp_path / "m"
    assert main([*ARGS, "--lengths", "64", "--presets", "tiny-hf", "--out", str(out), "--no-warmup"]) == 0

    def broken(*args, **kwargs):
        raise ValueError("kernel exploded")

    monkeypatch.setattr(measure, "measure_hybrid", broken)
    assert main([*ARGS, "--lengths", "64", "--presets", "tiny", "--out", str(out), "--no-warmup"]) == 0
    data = _load(out)
    rows = {(r["preset"], r["context"]): r for r in data["results"]}
    assert rows[("tiny-hf", 64)]["status"] == "ok"  # kept from the first run
    assert rows[("tiny", 64)]["status"] == "error" and "kernel exploded" in rows[("tiny", 64)]["error"]
    assert len(data["runs"]) == 2 and all(r["command"].startswith("hybridize bench") for r in data["runs"])
    assert main([*ARGS, "--lengths", "64", "--presets", "tiny", "--out", str(out), "--no-warmup", "--fresh"]) == 0
    assert [r["preset"] for r in _load(out)["results"]] == ["tiny"]  # --fresh: the earlier rows are gone


def test_time_budget_skips_predicted_overruns(tmp_path, monkeypatch):
    real = measure.measure_hybrid

    def slow(model, context, *args, **kwargs):
        row = real(model, context, *args, **kwargs)
        row["ttft_s"] = 10.0  # pretend: 10 s at 64 tokens -> 160 tokens predicted at 62 s
        return row

    monkeypatch.setattr(measure, "measure_hybrid", slow)
    out = tmp_path / "t"
    assert main([*ARGS, "--presets", "tiny", "--out", str(out), "--no-warmup", "--time-budget", "30"]) == 0
    rows = {r["context"]: r for r in _load(out)["results"]}
    assert rows[64]["status"] == "ok" and rows[160]["status"] == "skipped" and "time budget" in rows[160]["reason"]


@pytest.mark.parametrize("impl", ["split", "flex"])
def test_bench_prefill_attention_is_applied_and_recorded(tmp_path, monkeypatch, impl):
    from hybridize.ops import attention as attention_ops

    name = {"split": "_split_prefill", "flex": "_flex_prefill"}[impl]
    real, calls = getattr(attention_ops, name), []
    monkeypatch.setattr(attention_ops, name, lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(attention_ops, "_prefill_errors", {})
    out = tmp_path / impl
    assert main([*ARGS, "--presets", "tiny", "--no-warmup", "--prefill-attention", impl, "--out", str(out)]) == 0
    rows = _load(out)["results"]
    assert [(r["status"], r["prefill_attention"], r["prefill_attention_error"]) for r in rows] == [("ok", impl, None)] * 2
    assert calls  # 160 tokens in 64-token chunks: chunks over the cache reached the candidate
    assert attention_ops.prefill_attention() == "sdpa"  # applied for the prefill only


def test_bench_rejects_a_bad_prefill_attention_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDIZE_PREFILL_ATTENTION", "fast")
    assert main([*ARGS, "--presets", "tiny", "--out", str(tmp_path)]) == 2
    assert "HYBRIDIZE_PREFILL_ATTENTION" in capsys.readouterr().err


def test_bench_prefill_attention_flag_wins_over_a_bad_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_PREFILL_ATTENTION", "fast")
    assert main([*ARGS, "--presets", "tiny", "--no-warmup", "--prefill-attention", "sdpa", "--out", str(tmp_path)]) == 0


def test_bench_rejects_bad_arguments(capsys):
    assert main([*ARGS, "--presets", "tiny", "--lengths", "0"]) == 2
    assert "lengths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*ARGS, "--presets", "nope"])
    for flag in ("--decode-tokens", "--chunk-size"):
        assert main([*ARGS, "--presets", "tiny", flag, "0"]) == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err
    for flag, value in (("--time-budget", "-1"), ("--total-budget", "0"), ("--total-budget", "-5")):
        with pytest.raises(SystemExit) as info:
            main([*ARGS, "--presets", "tiny", flag, value])
        assert info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_bench_checks_out_and_budgets_before_building_a_model(tmp_path, monkeypatch, capsys):
    import hybridize.bench.runner as runner
    from hybridize.bench import BenchOptions, run_bench

    def no_build(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(runner, "build_model", no_build)
    monkeypatch.setattr(measure, "copy_bandwidth", no_build)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert main([*ARGS, "--presets", "tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is not a writable directory" in err and "Traceback" not in err, err
    for key, value in (("time_budget", 0), ("total_budget", -1.0), ("time_budget", float("nan"))):
        with pytest.raises(ValueError, match="budget must be a number of seconds > 0"):
            run_bench(BenchOptions(presets=["tiny"], device="cpu", out=str(tmp_path / "b"), **{key: value}))
    assert not (tmp_path / "b").exists()


def test_bench_measures_a_repeated_length_once(tmp_path):
    out = tmp_path / "d"
    assert main([*ARGS, "--presets", "tiny", "tiny", "--lengths", "64", "64", "--no-warmup", "--out", str(out)]) == 0
    data = _load(out)
    assert [(r["preset"], r["context"]) for r in data["results"]] == [("tiny", 64)]
    assert data["runs"][-1]["lengths"] == [64] and data["runs"][-1]["presets"] == ["tiny"]


def test_predict_seconds():
    assert predict_seconds([], 10) is None
    assert predict_seconds([(10, 1.0)], 20) == pytest.approx(4.0)  # one point: quadratic
    assert predict_seconds([(10, 1.0), (20, 2.0)], 40) == pytest.approx(4.0)  # linear fit
    assert predict_seconds([(10, 1.0), (20, 16.0)], 40) == pytest.approx(64.0)  # exponent clamped to 2


def test_preset_shapes_and_roofline_bytes():
    """The 8B presets have Qwen3-8B's 8,190,735,360 parameters (ours and transformers' alike); the decode
    roofline counts the weights once (not the untied input embedding) and the right KV per layer type."""
    ours, peer = build_model(PRESETS["qwen3-8b"], "meta", torch.bfloat16), build_model(PRESETS["qwen3-8b-hf"], "meta", torch.bfloat16)
    assert weight_bytes(ours)["parameters"] == weight_bytes(peer)["parameters"] == 8_190_735_360
    small = build_model(PRESETS["qwen3-1.7b"], "meta", torch.bfloat16)
    assert weight_bytes(small)["tied"] and weight_bytes(small)["parameters"] == 1_720_574_976
    ctx = 262144
    kv_layer = ctx * 2 * 8 * 128 * 2
    full = decode_bytes_per_token(ours, ctx)
    assert full["attention_kv"] == 36 * kv_layer
    assert full["weights"] == 2 * (8_190_735_360 - 151936 * 4096 + 4096)
    assert decode_bytes_per_token(peer, ctx)["total"] == full["total"]
    hyp = decode_bytes_per_token(build_model(PRESETS["hypenet-8b"], "meta", torch.bfloat16), ctx)
    assert hyp["attention_kv"] == 9 * kv_layer and hyp["lightning_state"] == 27 * 2 * 32 * 128 * 128 * 4
    sala = decode_bytes_per_token(build_model(PRESETS["sala-8b"], "meta", torch.bfloat16), ctx)
    assert sala["sparse_selected_kv"] == 9 * (1 + 32 + 64) * 64 * 2 * 8 * 128 * 2
    assert layer_schedule("sala", 36).count("sparse") == 9 and layer_schedule("sala", 36)[0] == "sparse"
    assert layer_schedule("hypenet", 28).count("attention") == 7


def test_report_with_oom_skipped_and_error_rows(tmp_path):
    """Table and plots from a synthetic H200-like results file: ratios only where both sides ran."""
    from hybridize.bench.report import markdown_table, write_markdown, write_plots

    def ok(preset, ctx, ttft, dec, mem):
        return {"preset": preset, "context": ctx, "status": "ok", "ttft_s": ttft, "decode_ms_per_token": dec,
                "peak_memory_bytes": mem, "roofline": {"ms_per_token": dec / 2, "achieved_fraction": 0.5}}

    oom = {"status": "oom", "stage": "cache", "ttft_s": "oom", "decode_ms_per_token": "oom", "peak_memory_bytes": "oom"}
    data = {
        "device": "NVIDIA H200", "dtype": "bfloat16", "device_memory_bytes": 150e9,
        "presets": {"qwen3-8b": {"baseline": None, "peer": "qwen3-8b-hf"}, "qwen3-8b-hf": {},
                    "hypenet-8b": {"baseline": "qwen3-8b", "peer": "qwen3-8b-hf"}},
        "results": [
            ok("qwen3-8b", 262144, 40.0, 14.0, 60e9), {"preset": "qwen3-8b", "context": 1048576, **oom},
            ok("qwen3-8b-hf", 262144, 46.0, 76.0, 95e9),
            {"preset": "qwen3-8b-hf", "context": 1048576, "status": "skipped", "stage": "not run", "reason": "budget",
             "ttft_s": None, "decode_ms_per_token": None, "peak_memory_bytes": None},
            ok("hypenet-8b", 262144, 10.0, 7.0, 40e9), ok("hypenet-8b", 1048576, 60.0, 12.0, 70e9),
            {"preset": "sala-8b", "context": 262144, "status": "error", "stage": "prefill", "error": "boom",
             "ttft_s": None, "decode_ms_per_token": None, "peak_memory_bytes": None},
        ],
        "runs": [{"command": "hybridize bench --presets ..."}],
    }
    table = markdown_table(data)
    assert "| hypenet-8b | 256K | 10 | 7 | 3.5 | 50% | 37.3 | 4x / 4.6x | 2x / 11x |" in table
    assert "| hypenet-8b | 1M | 60 | 12 | 6 | 50% | 65.2 | ref. OOM / - | ref. OOM / - |" in table
    assert "| qwen3-8b | 1M | OOM | OOM | - | - | OOM |" in table and "| sala-8b | 256K | error |" in table
    assert "skipped" in table
    write_markdown(tmp_path, data)
    assert all(p.stat().st_size > 1000 for p in write_plots(tmp_path, data))


def test_results_of_another_kind_are_never_overwritten(tmp_path, capsys):
    """A results.json from another device/dtype, one that does not parse, or one of another shape is left as it
    is: the run stops before building a model and names --fresh / --out; --fresh replaces it."""
    base = [*ARGS, "--lengths", "64", "--presets", "tiny", "--no-warmup"]
    cases = {
        "gpu": json.dumps({"device": "NVIDIA H200", "dtype": "bfloat16", "results": [{"preset": "x", "context": 1}]}),
        "broken": '{"results": [1,2',
        "list": "[1, 2, 3]",
    }
    for name, text in cases.items():
        out = tmp_path / name
        out.mkdir()
        (out / "results.json").write_text(text)
        assert main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--fresh" in err and "--out" in err and "Traceback" not in err
        assert (out / "results.json").read_text() == text and sorted(p.name for p in out.iterdir()) == ["results.json"]
    out = tmp_path / "gpu"
    assert main([*base, "--out", str(out), "--fresh"]) == 0 and _load(out)["device"] == "cpu"


def test_a_skipped_measurement_does_not_replace_a_measured_one(tmp_path):
    out = tmp_path / "s"
    assert main([*ARGS, "--presets", "tiny", "--out", str(out), "--no-warmup"]) == 0
    before = {(r["preset"], r["context"]): r for r in _load(out)["results"]}
    assert before[("tiny", 160)]["status"] == "ok"
    assert main([*ARGS, "--presets", "tiny", "--out", str(out), "--no-warmup", "--total-budget", "0.001"]) == 0
    after = {(r["preset"], r["context"]): r for r in _load(out)["results"]}
    assert after[("tiny", 160)] == before[("tiny", 160)]


def test_presets_spread_over_processes_merge_into_one_run(tmp_path, monkeypatch):
    """run_bench_parallel (``--gpus N``): presets dealt over N processes, one results.json with every row, the
    table and the plots; per-process results and logs under parts/. CPU workers here (gpus=False)."""
    from hybridize.bench import BenchOptions, run_bench_parallel

    out = tmp_path / "par"
    opts = BenchOptions(presets=["tiny", "tiny-full", "tiny-hf"], lengths=[64], decode_tokens=2, chunk_size=64,
                        device="cpu", out=str(out), warmup=False, command="hybridize bench --gpus 2 ...")
    lines = []
    summary = run_bench_parallel(opts, 2, log=lines.append, gpus=False)
    data = _load(out)
    assert sorted(r["preset"] for r in data["results"]) == ["tiny", "tiny-full", "tiny-hf"]
    assert all(r["status"] == "ok" for r in data["results"])
    assert data["parallel"]["presets"] == [["tiny", "tiny-hf"], ["tiny-full"]] and data["command"] == opts.command
    assert set(data["presets"]) == {"tiny", "tiny-full", "tiny-hf"} and len(lines) == 2
    assert (out / "results.md").is_file() and (out / "ttft.png").is_file() and "tiny-full" in summary["markdown"]
    assert (out / "parts" / "part0.log").read_text() and (out / "parts" / "part1" / "results.json").is_file()
    with pytest.raises(ValueError, match="must be >= 2"):
        run_bench_parallel(opts, 1, gpus=False)
    with pytest.raises(ValueError, match="needs --device cuda"):
        run_bench_parallel(opts, 2)  # CPU workers pinned to GPUs: refused


def test_bench_gpus_flag_needs_the_gpus(tmp_path, capsys):
    assert main([*ARGS, "--presets", "tiny", "tiny-full", "--gpus", "2", "--out", str(tmp_path / "g")]) == 2
    assert "needs --device cuda" in capsys.readouterr().err
    assert main(["bench", "--presets", "tiny", "tiny-full", "--gpus", "2", "--out", str(tmp_path / "h")]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
