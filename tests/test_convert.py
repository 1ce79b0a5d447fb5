"""Conversion pipeline: stages, manifests, resume, layer selection, chunked losses, CLI errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hybridize.cli import main
from hybridize.convert.losses import chunked_cross_entropy, chunked_kl
from hybridize.convert.pipeline import ConvertOptions, run_convert
from hybridize.convert.select import halo_scores, select_layers
from hybridize.convert.stage import StageDir
from hybridize.models import HybridForCausalLM

WORDS = (
    "the a river city king music science history war water light old new north south early late year people "
    "government language book school church field island mountain village road train ship art theory law"
).split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved like a user's local checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "."] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0, bos_token_id=None, tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("teacher")
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": _text(rng, 300)}) for _ in range(20)))
    return path


def _opts(teacher, data, out, **kw):
    base = dict(
        teacher=str(teacher), data=[str(data)], out=str(out), seq_len=32, stage1_tokens=32 * 4 * 8, stage1_batch=4,
        stage2_tokens=32 * 4 * 6, stage2_batch=4, selection="even", eval=False, checkpoint_every=3,
    )
    base.update(kw)
    return ConvertOptions(**base)


def test_pipeline_writes_complete_stages(tiny_teacher_dir, data_file, tmp_path):
    summary = run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))
    for name in ("stage0", "stage1", "selection", "stage2"):
        m = StageDir(tmp_path / "run", name).manifest()
        assert m is not None, name
        for key in ("stage", "inputs", "tokens_seen", "final_loss", "wall_time_s", "git_commit"):
            assert key in m
    assert summary["stage1"]["tokens_seen"] == 32 * 4 * 8
    assert summary["stage2"]["tokens_seen"] == 32 * 4 * 6
    assert len(summary["stage2"]["loss_curve"]) == 6
    model = HybridForCausalLM.from_pretrained(tmp_path / "run" / "stage2" / "model")
    assert model.config.layer_types == summary["selection"]["layer_types"]
    assert model.config.layer_types.count("attention") == 1  # floor(4 / 4)
    assert not (tmp_path / "run" / "stage1" / "checkpoint").exists()
    assert (tmp_path / "run" / "stage1" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "stage2" / "loss.png").stat().st_size > 1000


def test_cli_generate_streams_from_run_dir(tiny_teacher_dir, data_file, tmp_path, capsys):
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))
    code = main(["generate", "--model", str(tmp_path / "run"), "--prompt", "the river", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("the river") and len(out.strip()) > len("the river")
    # the teacher directory works too
    assert main(["generate", "--model", str(tiny_teacher_dir), "--prompt", "the city", "--max-new-tokens", "3"]) == 0


def test_converted_model_without_tokenizer_files_says_so(tiny_teacher_dir, data_file, tmp_path, capsys):
    from hybridize.convert.teachers import TOKENIZER_FILES

    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", layer_types="LLAL"))
    model_dir = tmp_path / "run" / "stage2" / "model"
    for name in TOKENIZER_FILES:
        (model_dir / name).unlink(missing_ok=True)
    code = main(["generate", "--model", str(tmp_path / "run"), "--prompt", "the river"])
    err = capsys.readouterr().err
    assert code == 2 and f"no tokenizer files in {model_dir}" in err and "copy the tokenizer" in err


def test_killed_stage_resumes_from_checkpoint(tiny_teacher_dir, data_file, tmp_path, monkeypatch):
    import hybridize.convert.align as align

    real = align.alignment_losses
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(align, "alignment_losses", dying)
    opts = _opts(tiny_teacher_dir, data_file, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_convert(opts)
    stage1 = StageDir(tmp_path / "run", "stage1")
    assert StageDir(tmp_path / "run", "stage0").is_complete()
    assert not stage1.is_complete()
    meta = json.loads((stage1.checkpoint_path / "meta.json").read_text())
    assert meta["step"] == 6
    first_losses = meta["losses"]

    monkeypatch.setattr(align, "alignment_losses", real)
    summary = run_convert(opts)
    curve = summary["stage1"]["loss_curve"]
    assert len(curve) == 8 and curve[:6] == first_losses
    # an uninterrupted run gives the same curve: the resume restored weights, optimizer and data order
    fresh = run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "fresh"))
    assert fresh["stage1"]["loss_curve"] == pytest.approx(curve, rel=1e-4)


def test_halo_scores_and_selection():
    recall = [0.9, 0.5, 0.85, 0.2]
    general = [0.6, 0.55, 0.58, 0.59]
    scores = halo_scores(recall, general)
    assert scores[1] == pytest.approx((0.9 - 0.5) / (0.6 - 0.55 + 1e-10))
    assert scores[0] == 0.0
    assert scores[3] == 50.0  # clipped
    assert select_layers(4, 2, "halo", recall, general) == [1, 3]
    assert select_layers(4, 1, "recall-drop", recall, general) == [3]
    assert select_layers(8, 2, "even") == [2, 6]
    assert all(i >= 4 for i in select_layers(8, 2, "even-latter"))
    assert scores[2] == pytest.approx(0.05 / 0.02)
    assert set(select_layers(8, 2, "even", always_attention=(0, 7))) == {0, 7}
    with pytest.raises(ValueError, match="out of range"):
        select_layers(4, 1, "even", always_attention=(9,))
    with pytest.raises(ValueError, match="unknown selection"):
        select_layers(4, 1, "best")
    with pytest.raises(ValueError, match="needs the per-layer scores"):
        select_layers(4, 1, "halo")


def _kl_reference(s_hidden, t_hidden, head_s, head_t, mask=None):
    ls = torch.log_softmax(head_s(s_hidden).float(), -1)
    lt = torch.log_softmax(head_t(t_hidden).float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_kl_equals_unchunked(chunk):
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
    s = torch.randn(3, 21, 16, requires_grad=True)
    t = torch.randn(3, 21, 16)
    got = chunked_kl(s, t, head_s, head_t, chunk_size=chunk)
    ref = _kl_reference(s, t, head_s, head_t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    g1 = torch.autograd.grad(got, s)[0]
    g2 = torch.autograd.grad(ref, s)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_chunked_kl_ignores_masked_positions():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    t = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10)
    mask[0, :4] = 0
    s = t.clone()
    s[0, :4] = torch.randn(4, 16) * 100  # garbage at masked positions
    loss = chunked_kl(s, t, head, head, mask=mask, chunk_size=3)
    assert loss.item() == 0.0
    s2 = s.clone()
    s2[0, :4] = torch.randn(4, 16)
    assert chunked_kl(s2, t, head, head, mask=mask).item() == 0.0


def test_chunked_cross_entropy_matches_full():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30)
    h = torch.randn(2, 13, 8)
    y = torch.randint(0, 30, (2, 13))
    full = torch.nn.functional.cross_entropy(head(h)[:, :-1].reshape(-1, 30), y[:, 1:].reshape(-1))
    assert chunked_cross_entropy(h, y, head, chunk_size=5).item() == pytest.approx(full.item(), rel=1e-5)


# ---- bad input: a clear error, exit 2, nothing that looks complete -----------------------------------


def _run_cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_cli_missing_teacher(capsys, tmp_path):
    code, err = _run_cli(capsys, "convert", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert code == 2 and "error:" in err and "nope" in err
    assert not (tmp_path / "run").exists()


def test_cli_unsupported_architecture(capsys, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = _run_cli(capsys, "convert", "--teacher", str(d), "--out", str(tmp_path / "run"))
    assert code == 2 and "gpt2" in err and "llama" in err
    assert not (tmp_path / "run").exists()


def test_cli_empty_data_file(capsys, tmp_path, tiny_teacher_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = _run_cli(capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(empty), "--out", str(tmp_path / "run"))
    assert code == 2 and "empty.txt" in err
    assert not (tmp_path / "run").exists()


def test_cli_budget_smaller_than_one_batch(capsys, tmp_path, tiny_teacher_dir, data_file):
    code, err = _run_cli(
        capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(data_file), "--out", str(tmp_path / "run"),
        "--stage2-tokens", "100",
    )
    assert code == 2 and "smaller than one batch" in err and "stage2" in err
    assert "--stage2-tokens" in err and "--stage2-batch" in err and "--seq-len" in err and "--batch-size" not in err
    assert not (tmp_path / "run").exists()


def test_budget_errors_name_each_stages_flags():
    from hybridize.convert.trainer import TrainSettings, plan_steps
    from hybridize.errors import BudgetError

    with pytest.raises(BudgetError, match="raise --stage3-tokens or lower --stage3-batch / --stage3-seq-len"):
        plan_steps(TrainSettings(100, 64, 2, 1e-5, 1e-5), None, "stage3")
    with pytest.raises(BudgetError, match="lower --seq-len / --stage1-batch"):
        plan_steps(TrainSettings(10_000, 64, 8, 1e-3, 1e-5), 3, "stage1")


def _accum_run(tmp_path, name, grad_accum, did_backward):
    from hybridize.convert.trainer import TrainSettings, train

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    data = torch.randint(0, 50, (24, 6))

    def loss_fn(batch):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), batch[:, 1:].reshape(-1))
        if did_backward:
            loss.backward()
            return loss.detach()
        return loss

    loss_fn.did_backward = did_backward
    settings = TrainSettings(6 * 8 * 5, 6, 8, 1e-2, 1e-3, warmup=1, grad_clip=0.3, grad_accum=grad_accum)
    result = train(StageDir(tmp_path, name), dict(model.named_parameters()), loss_fn, data, settings)
    return result, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("did_backward", [False, True])
def test_gradient_accumulation_equals_the_whole_batch(tmp_path, did_backward):
    """--grad-accum K: K micro-batches per step give the whole batch's losses, gradient norms (clipping
    included) and weights, for loss functions that return the loss and for those that call backward."""
    whole, w1 = _accum_run(tmp_path, "one", 1, did_backward)
    for k in (2, 4):
        acc, wk = _accum_run(tmp_path, f"acc{k}", k, did_backward)
        assert acc.losses == pytest.approx(whole.losses, rel=1e-5)
        assert acc.grad_norms == pytest.approx(whole.grad_norms, rel=1e-5) and max(whole.grad_norms) > 0.3  # clipped
        for a, b in zip(w1, wk):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_resume_records_changed_settings_and_uses_this_runs_optimizer(tmp_path):
    """A stage resumed with other settings (e.g. --fsdp-param-dtype, which changes the arithmetic) says so in its
    result (and so in the stage manifest), also after a later resume with the new settings; the resumed optimizer
    is this run's implementation (fused), also from a checkpoint written by another one (torch's default AdamW)."""
    import hybridize.convert.trainer as trainer_mod
    from hybridize.convert.trainer import TrainSettings, train

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    data = torch.randint(0, 50, (24, 6))
    params = dict(model.named_parameters())

    def loss_fn(batch):
        return torch.nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, 50), batch[:, 1:].reshape(-1))

    stage = StageDir(tmp_path, "stage2")
    first = TrainSettings(6 * 4 * 6, 6, 4, 1e-2, 1e-3, warmup=1, checkpoint_every=2, fsdp_param_dtype="bf16")
    real_step, real_make = torch.optim.AdamW.step, trainer_mod.make_optimizer
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    try:  # the first run: torch's default AdamW, killed in step 4 (checkpoint after step 2)
        trainer_mod.make_optimizer = lambda ps, lr: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        torch.optim.AdamW.step = dying_step
        with pytest.raises(KeyboardInterrupt):
            train(stage, params, loss_fn, data, first)
    finally:
        torch.optim.AdamW.step, trainer_mod.make_optimizer = real_step, real_make
    assert json.loads((stage.checkpoint_path / "meta.json").read_text())["settings"]["fsdp_param_dtype"] == "bf16"
    second = TrainSettings(6 * 4 * 6, 6, 4, 1e-2, 1e-3, warmup=1, checkpoint_every=2)
    calls["n"] = 1  # the second run (fp32): killed in its third step, after the checkpoint of step 4
    try:
        torch.optim.AdamW.step = dying_step
        with pytest.raises(KeyboardInterrupt):
            train(stage, params, loss_fn, data, second)
    finally:
        torch.optim.AdamW.step = real_step
    assert json.loads((stage.checkpoint_path / "meta.json").read_text())["step"] == 4
    used = []
    trainer_mod.make_optimizer = lambda ps, lr: used.append(real_make(ps, lr)) or used[-1]
    try:  # the third run: the change happened two checkpoints ago and is still recorded
        result = train(stage, params, loss_fn, data, second)
    finally:
        trainer_mod.make_optimizer = real_make
    assert result.settings_changed_on_resume == {"fsdp_param_dtype": ["bf16", "fp32"]}
    assert result.metrics()["settings_changed_on_resume"] == {"fsdp_param_dtype": ["bf16", "fp32"]}
    assert len(result.losses) == 6 and all(g["fused"] for g in used[0].param_groups)
    unchanged = train(StageDir(tmp_path, "fresh"), params, loss_fn, data, first)
    assert unchanged.settings_changed_on_resume == {} and "settings_changed_on_resume" not in unchanged.metrics()


def test_profile_window_skips_warm_up_steps_and_fits_the_stage():
    from hybridize.convert.trainer import profile_window

    assert profile_window(0, 0, 40) is None and profile_window(3, 0, 1) is None
    assert profile_window(3, 0, 40) == (3, 6)  # after the first 3 steps (autotuning, allocator warm-up)
    assert profile_window(3, 10, 40) == (13, 16)  # counted from where a resumed run starts
    assert profile_window(5, 0, 6) == (1, 6)  # short stage: from the second step, never past the last
    assert profile_window(10, 0, 4) == (1, 4)


def test_profile_steps_writes_the_profile_and_leaves_training_unchanged(tmp_path):
    """--profile-steps 2: the profiled steps change no figure of the run; the profile's table, trace and
    per-step summary are written (on CPU: CPU op times)."""
    from hybridize.convert.trainer import TrainSettings, train

    def run(name, profile_steps):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
        data = torch.randint(0, 50, (24, 6), generator=torch.Generator().manual_seed(1))

        def loss_fn(batch):
            logits = model(batch[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 50), batch[:, 1:].reshape(-1))

        settings = TrainSettings(6 * 8 * 6, 6, 8, 1e-2, 1e-3, warmup=1, profile_steps=profile_steps)
        return train(StageDir(tmp_path, name), dict(model.named_parameters()), loss_fn, data, settings)

    plain, profiled = run("plain", 0), run("profiled", 2)
    assert plain.profile is None and "profile" not in plain.metrics()
    assert profiled.losses == plain.losses and profiled.grad_norms == plain.grad_norms
    p = profiled.metrics()["profile"]
    assert p["steps"] == [4, 5] and p["busy_kind"] == "CPU ops" and p["wall_s_per_step"] > 0 and p["busy_s_per_step"] > 0
    assert p["top_ops"] and all(o["s_per_step"] >= 0 for o in p["top_ops"])
    table = (tmp_path / "profiled" / "profile_rank0.txt").read_text()
    assert "aten::" in table
    assert json.loads((tmp_path / "profiled" / "profile_rank0.json").read_text())["traceEvents"]


def test_profile_counts_each_kernel_once_and_stops_when_a_step_raises(tmp_path):
    """profile_summary sums the kernel rows only (the CPU op that launched a kernel carries its time too), NCCL
    kernels apart; a step that raises inside the window leaves no profiler running."""
    from pathlib import Path
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from hybridize.convert.trainer import TrainSettings, profile_summary, train

    def row(key, device, us, annotation=False):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=us, self_cpu_time_total=5,
                               is_user_annotation=annotation)

    class Events(list):
        def table(self, **kw):
            return "table"

    events = Events([row("aten::mm", DeviceType.CPU, 1000), row("sm90_gemm", DeviceType.CUDA, 1000),
                     row("nccl:all_gather", DeviceType.CPU, 400), row("ncclDevKernel_AllGather", DeviceType.CUDA, 400),
                     row("FSDP::all_gather", DeviceType.CUDA, 400, annotation=True)])
    prof = SimpleNamespace(key_averages=lambda: events, export_chrome_trace=lambda path: Path(path).write_text("{}"))
    s = profile_summary(prof, (3, 5), 0.01, tmp_path / "p")
    assert s["busy_kind"] == "device kernels" and s["busy_s_per_step"] == pytest.approx(1400e-6 / 2)
    assert s["nccl_s_per_step"] == pytest.approx(400e-6 / 2) and [o["op"] for o in s["top_ops"]] == ["sm90_gemm", "ncclDevKernel_AllGather"]
    assert (tmp_path / "p.txt").read_text() == "table" and (tmp_path / "p.json").is_file()

    model = torch.nn.Linear(4, 4)
    calls = []

    def loss_fn(batch):
        calls.append(1)
        if len(calls) == 5:  # inside the window (steps 4-6)
            raise RuntimeError("boom")
        return model(batch.float()).pow(2).mean()

    settings = TrainSettings(4 * 8 * 8, 4, 8, 1e-2, 1e-3, warmup=1, profile_steps=3)
    with pytest.raises(RuntimeError, match="boom"):
        train(StageDir(tmp_path, "raise"), dict(model.named_parameters()), loss_fn, torch.randint(0, 9, (16, 4)), settings)
    assert not torch.autograd.profiler._is_profiler_enabled


def test_profile_steps_flag_is_checked(capsys):
    from hybridize.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["convert", "--profile-steps", "-1", "--out", "x"])
    assert exc.value.code == 2 and "--profile-steps" in capsys.readouterr().err


def test_stage1_per_layer_mse_is_the_last_steps_mean_over_micro_batches(tiny_teacher_dir, data_file, tmp_path):
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", grad_accum=2))
    m = json.loads((tmp_path / "run" / "stage1" / "manifest.json").read_text())
    per_layer = m["per_layer_mse"]
    assert len(per_layer) == 4 and m["settings"]["grad_accum"] == 2
    assert sum(per_layer) / len(per_layer) == pytest.approx(m["loss_curve"][-1], rel=1e-5)


def test_grad_accum_and_world_size_of_the_wrong_type_are_refused(monkeypatch, capsys, data_file, tmp_path):
    from hybridize.convert.trainer import TrainSettings, check_batch_split
    from hybridize.errors import BudgetError

    for accum in (2.0, True, "2", None, 0):
        with pytest.raises(BudgetError, match="--grad-accum must be an integer"):
            check_batch_split(TrainSettings(1, 2, 8, 1.0, 1.0, grad_accum=accum), 1, "stage1")
    for world in (0, -2, 1.0):
        with pytest.raises(BudgetError, match="number of processes"):
            check_batch_split(TrainSettings(1, 2, 8, 1.0, 1.0), world, "stage1")
    monkeypatch.setenv("WORLD_SIZE", "abc")
    code, err = _run_cli(capsys, "convert", "--data", str(data_file), "--out", str(tmp_path / "run"))
    assert code == 2 and "WORLD_SIZE='abc' is not an integer" in err
    monkeypatch.setenv("WORLD_SIZE", "0")
    code, err = _run_cli(capsys, "convert", "--data", str(data_file), "--out", str(tmp_path / "run"))
    assert code == 2 and "WORLD_SIZE='0' is not an integer >= 1" in err
    assert not (tmp_path / "run").exists()


def test_grad_accum_that_does_not_split_the_batch_is_named(capsys, tmp_path, tiny_teacher_dir, data_file):
    from hybridize.convert.trainer import TrainSettings, check_batch_split
    from hybridize.errors import BudgetError

    with pytest.raises(BudgetError, match="--stage2-batch to a multiple of 6"):
        check_batch_split(TrainSettings(1, 2, 8, 1.0, 1.0, grad_accum=3), 2, "stage2")
    code, err = _run_cli(capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(data_file),
                         "--out", str(tmp_path / "run"), "--stage1-batch", "6", "--grad-accum", "4")
    assert code == 2 and "--grad-accum 4" in err and "--stage1-batch" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--data", str(data_file), "--grad-accum", "0"])
    assert exc.value.code == 2 and "--grad-accum: must be a positive integer" in capsys.readouterr().err


def test_cli_data_smaller_than_one_batch(capsys, tmp_path, tiny_teacher_dir):
    small = tmp_path / "small.txt"
    small.write_text("the river city king music.")
    code, err = _run_cli(capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(small), "--out", str(tmp_path / "run"))
    assert code == 2 and "training text" in err and "--seq-len 256" in err
    assert not (tmp_path / "run").exists()
    few = tmp_path / "few.txt"  # packs into fewer sequences than one batch: stage 1 never starts
    few.write_text(_text(random.Random(1), 200))
    code, err = _run_cli(capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(few), "--out", str(tmp_path / "run"),
                         "--seq-len", "32", "--stage1-batch", "64", "--stage1-tokens", "4096")
    assert code == 2 and "fewer than one batch of 64" in err and "--stage1-batch" in err
    assert not (tmp_path / "run").exists()


def test_cli_heldout_too_short_is_named_before_any_output(capsys, tmp_path, tiny_teacher_dir):
    rng = random.Random(2)
    data = tmp_path / "docs.jsonl"  # 3 documents: the last (4 words) is the held-out text
    data.write_text("\n".join(json.dumps({"text": t}) for t in (_text(rng, 300), _text(rng, 300), "the river city king")))
    code, err = _run_cli(capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                         "--seq-len", "32", "--stage1-tokens", "256", "--stage1-batch", "2", "--stage2-tokens", "256",
                         "--stage2-batch", "2")
    assert code == 2 and "held-out text" in err and "--seq-len 32" in err and "--data" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--layer-types", "LLA"], "--layer-types 'LLA' has 3 letters but the teacher has 4 layers"),
    (["--layer-types", "LXLA"], r"--layer-types: .*\['X'\]"),
    (["--layer-types", ""], "--layer-types is empty"),
    (["--num-attention", "5"], r"--num-attention must be in \[0, 4\]"),
    (["--num-attention", "-1"], r"--num-attention must be in \[0, 4\]"),
    (["--seq-len", "1"], "--seq-len must be an integer >= 2"),
    (["--stage3", "--stage3-seq-len", "1"], "--stage3-seq-len must be an integer >= 2"),
    (["--layer-types", "ALLA", "--num-attention", "1"],
     "--num-attention 1 disagrees with --layer-types 'ALLA', which keeps 2 attention layers"),
    (["--recipe", "sala", "--layer-types", "SLLA", "--num-attention", "3"], "which keeps 2 attention layers"),
])
def test_cli_convert_checks_schedule_before_loading_the_teacher(capsys, tmp_path, tiny_teacher_dir, data_file, monkeypatch,
                                                                extra, message):
    import re

    import hybridize.convert.teachers as teachers

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded before the options were checked")

    monkeypatch.setattr(teachers, "load_teacher", no_load)
    code, err = _run_cli(capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(data_file),
                         "--out", str(tmp_path / "run"), *extra)
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_convert_checks_schedule_after_a_teacher_of_unknown_size_loads(tiny_teacher_dir, data_file, tmp_path, monkeypatch):
    import hybridize.convert.teachers as teachers

    monkeypatch.setattr(teachers, "teacher_num_layers", lambda name: None)  # e.g. a hub id
    with pytest.raises(ValueError, match=r"--num-attention must be in \[0, 4\]"):
        run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", num_attention=9))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("stage1_lr", 0.0), ("stage2_lr", float("nan")), ("stage3_lr", -1e-5),
                                        ("stage2_lr", float("inf"))])
def test_convert_rejects_bad_learning_rates_up_front(tiny_teacher_dir, data_file, tmp_path, key, value):
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} must be a finite number > 0"):
        run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", **{key: value}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--stage1-lr", "0"), ("--stage2-lr", "-0.001"), ("--stage3-lr", "nan"),
                                         ("--stage1-lr", "inf")])
def test_cli_rejects_bad_learning_rates(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["convert", flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "must be a finite number >= 0"),
    ("--temperature", "nan", "must be a finite number"),
    ("--top-p", "2", r"must be in \(0, 1\]"),
    ("--top-p", "0", r"must be in \(0, 1\]"),
    ("--max-new-tokens", "0", "must be a positive integer"),
])
def test_cli_generate_rejects_bad_sampling_flags(capsys, flag, value, message):
    import re

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "unused", "--prompt", "x", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(f"argument {flag}: {message}", err), err


def test_run_with_only_stage1_says_it_has_no_model_yet(tiny_teacher_dir, data_file, tmp_path, capsys, monkeypatch):
    import hybridize.convert.pipeline as pipeline

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_selection", stop)
    with pytest.raises(KeyboardInterrupt):
        run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))
    assert StageDir(tmp_path / "run", "stage1").is_complete()
    run = str(tmp_path / "run")
    for argv in (["generate", "--model", run, "--prompt", "the"],
                 ["eval", "--model", run, "--device", "cpu", "--no-progress"],
                 ["tune-hype", "--model", run]):
        code, err = _run_cli(capsys, *argv)
        assert code == 2, argv
        assert "no finished model yet" in err and "stage0, stage1" in err and f"hybridize convert --out {run}" in err, err
        assert "config.json" not in err


# ---- the real teacher on real text -------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_setup():
    from hybridize.convert.teachers import load_teacher
    from hybridize.data import document_separator_id, load_default_corpus, pack_sequences, tokenize_documents

    teacher, tok = load_teacher()
    teacher.requires_grad_(False).eval()
    docs = load_default_corpus().train[:40]
    seqs = pack_sequences(tokenize_documents(docs, tok), 128, document_separator_id(tok))
    return teacher, tok, seqs


@pytest.mark.teacher
def test_stage1_mse_falls_on_real_text(real_setup, tmp_path):
    from hybridize.convert.align import run_stage1
    from hybridize.convert.trainer import TrainSettings

    teacher, _, seqs = real_setup
    settings = TrainSettings(tokens=128 * 2 * 30, seq_len=128, batch_size=2, lr=1e-3, lr_final=1e-4, warmup=3)
    m = run_stage1(teacher, seqs, tmp_path, settings, {"teacher": "smollm2"})
    curve = m["loss_curve"]
    assert len(curve) == 30
    first, last = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert last < 0.7 * first, (first, last)


@pytest.mark.teacher
def test_stage2_kl_falls_on_real_text(real_setup, tmp_path):
    from hybridize.convert.distill import build_hybrid, trainable_parameters
    from hybridize.convert.losses import chunked_kl
    from hybridize.convert.stage import StageDir
    from hybridize.convert.trainer import TrainSettings, train

    teacher, _, seqs = real_setup
    n = teacher.config.num_hidden_layers
    layer_types = ["attention" if i % 4 == 3 else "lightning" for i in range(n)]
    student = build_hybrid(teacher, layer_types, None)  # stage-0 Lightning init: a high KL to bring down
    student.train()
    params = trainable_parameters(student)

    def loss_fn(batch):
        with torch.no_grad():
            t = teacher.model(input_ids=batch, use_cache=False).last_hidden_state
        s = student.model(input_ids=batch, use_cache=False).last_hidden_state
        return chunked_kl(s, t, student.lm_head, teacher.lm_head)

    settings = TrainSettings(tokens=64 * 2 * 16, seq_len=64, batch_size=2, lr=3e-4, lr_final=1e-4, warmup=2)
    result = train(StageDir(tmp_path, "stage2"), params, loss_fn, seqs[:, :64].contiguous(), settings)
    curve = result.losses
    assert sum(curve[-4:]) / 4 < 0.8 * sum(curve[:2]) / 2, curve


def test_cli_select_recomputes_and_prints(tiny_teacher_dir, data_file, tmp_path, capsys):
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))
    assert main(["select", "--run", str(tmp_path / "run"), "--selection", "even-latter", "--num-attention", "2"]) == 0
    out = capsys.readouterr().out
    assert "attention layers [2, 3]" in out
    m = StageDir(tmp_path / "run", "selection").manifest()
    assert m["layer_types"] == ["lightning", "lightning", "attention", "attention"]
    code = main(["select", "--run", str(tmp_path / "nothing")])
    assert code == 2 and "no complete stage 1" in capsys.readouterr().err


def test_cli_select_shows_a_saved_selection_unless_recompute(tiny_teacher_dir, data_file, tmp_path, capsys, monkeypatch):
    import hybridize.convert.pipeline as pipeline

    run = str(tmp_path / "run")
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", selection="halo"))
    saved = StageDir(tmp_path / "run", "selection").manifest()
    real, calls = pipeline.reselect, []

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "reselect", counting)
    for argv in (["--run", run], ["--run", run, "--selection", "halo", "--num-attention", "1"]):
        assert main(["select", *argv]) == 0
        out = capsys.readouterr().out
        assert "saved selection" in out and "--recompute" in out
        assert f"halo: attention layers {saved['attention_layers']}" in out
        assert f"{saved['R'][0]:8.4f}" in out  # the saved per-layer scores
    assert calls == [] and StageDir(tmp_path / "run", "selection").manifest() == saved
    assert main(["select", "--run", run, "--recompute"]) == 0
    assert "saved selection" not in capsys.readouterr().out and len(calls) == 1
    assert main(["select", "--run", run, "--num-attention", "2"]) == 0  # changed option: recomputed
    assert "saved selection" not in capsys.readouterr().out and len(calls) == 2
    assert len(StageDir(tmp_path / "run", "selection").manifest()["attention_layers"]) == 2


def test_layer_sweep_equals_full_forward_of_each_replaced_model(tiny_teacher_dir):
    """The sweep reuses the teacher's hidden states up to layer i; check it against a full M(i) forward."""
    import torch.nn.functional as F

    from hybridize.convert.align import build_lightning_students
    from hybridize.convert.select import ScoringData, layer_sweep
    from hybridize.convert.transfer import build_student

    torch.manual_seed(0)
    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    mixers, _ = build_lightning_students(teacher)
    for m in mixers:  # perturb so that every M(i) differs from the teacher
        for p in m.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    exact, _ = build_student(teacher, ["attention"] * 4, attention_rope=True)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 20))
    mask = torch.zeros_like(ids)
    mask[:, 12:] = 1
    general = torch.randint(0, teacher.config.vocab_size, (2, 24))
    sweep = layer_sweep(exact, mixers, ScoringData(ids, mask, general), batch_size=2, progress=False)

    def gold_prob(logits, x, m):
        p = F.softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        return ((p * m[:, 1:]).sum(-1) / m[:, 1:].sum(-1)).mean().item()

    for i in range(4):
        types = ["attention"] * 4
        types[i] = "lightning"
        m_i, _ = build_student(teacher, types, attention_rope=True)
        m_i.model.layers[i].self_attn.load_state_dict(mixers[i].state_dict())
        with torch.no_grad():
            r = gold_prob(m_i(ids).logits, ids, mask.float())
            c = gold_prob(m_i(general).logits, general, torch.ones_like(general).float())
            t_logp = F.log_softmax(teacher(general).logits, -1)
            kl = (t_logp.exp() * (t_logp - F.log_softmax(m_i(general).logits, -1))).sum(-1).mean().item()
        assert sweep["R"][i] == pytest.approx(r, rel=1e-4)
        assert sweep["C"][i] == pytest.approx(c, rel=1e-4)
        assert sweep["KL"][i] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert sweep["KL"][i] > 0


def test_collapse_guard_keeps_layers_that_break_the_model():
    from hybridize.convert.select import collapsed_layers

    general = [0.07, 0.28, 0.12, 0.29]
    assert collapsed_layers(general, 0.29, 0.5) == [0, 2]
    assert collapsed_layers(general, 0.29, 0.0) == []
    recall = [0.05, 0.3, 0.1, 0.2]
    # pure HALO ranking would convert layer 0 (ratio ~1); the guard keeps it first
    assert 0 not in select_layers(4, 1, "halo", recall, general)
    assert select_layers(4, 1, "halo", recall, general, always_attention=collapsed_layers(general, 0.29)[:1]) == [0]


def test_stage3_long_context_finetune_runs_and_resumes_model(tiny_teacher_dir, data_file, tmp_path):
    summary = run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", stage3=True, stage3_seq_len=96,
                                stage3_tokens=96 * 3, stage3_batch=1))
    m = summary["stage3"]
    assert m["loss"] == "lm" and m["tokens_seen"] == 96 * 3 and len(m["loss_curve"]) == 3
    assert m["inputs"]["init"].endswith("stage2/model")
    from hybridize.convert.pipeline import final_model_dir

    assert final_model_dir(tmp_path / "run") == tmp_path / "run" / "stage3" / "model"
    model = HybridForCausalLM.from_pretrained(final_model_dir(tmp_path / "run"))
    assert model.config.layer_types == summary["selection"]["layer_types"]


def test_stage1_trains_only_the_student_mixers(tiny_teacher_dir, data_file, tmp_path):
    from safetensors.torch import load_file

    from hybridize.convert.align import MIXERS_FILE, run_stage1
    from hybridize.convert.trainer import TrainSettings

    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = torch.randint(0, teacher.config.vocab_size, (16, 32))
    run_stage1(teacher, data, tmp_path, TrainSettings(32 * 4 * 3, 32, 4, 1e-3, 1e-4, warmup=1), {"teacher": "tiny"})
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher is frozen
    init = load_file(str(tmp_path / "stage0" / MIXERS_FILE))
    trained = load_file(str(tmp_path / "stage1" / MIXERS_FILE))
    assert init.keys() == trained.keys() and all(k.startswith("layers.") for k in trained)
    assert all(".self_attn." not in k for k in trained)  # mixer parameters only, no MLP/norm/embedding
    assert any(not torch.equal(init[k], trained[k]) for k in trained)


def test_sala_recipe_keeps_first_and_last_as_sparse(tiny_teacher_dir, data_file, tmp_path):
    summary = run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", recipe="sala"))
    assert summary["selection"]["layer_types"] == ["sparse", "lightning", "lightning", "sparse"]
    model = HybridForCausalLM.from_pretrained(tmp_path / "run" / "stage2" / "model")
    assert model.config.layer_types == ["sparse", "lightning", "lightning", "sparse"]
    assert model.config.sparse_config["dense_len"] == 8192  # SALA defaults: dense below 8K, sparse above
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    assert torch.isfinite(model(ids).logits).all()
    for k in (0, 1):  # the recipe keeps two layers: fewer is refused, never silently raised
        with pytest.raises(ValueError, match="--recipe sala keeps the first and the last"):
            run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / f"r{k}", recipe="sala", num_attention=k))
        assert not (tmp_path / f"r{k}").exists()


def test_sala_recipe_maps_given_attention_letters_to_sparse(tiny_teacher_dir, data_file, tmp_path, caplog):
    import logging

    from hybridize.convert.pipeline import final_model_dir, given_layer_types

    assert given_layer_types(ConvertOptions(layer_types="ALSL", recipe="hypenet")) == [
        "attention", "lightning", "sparse", "lightning"]
    assert given_layer_types(ConvertOptions(layer_types="ALSL", recipe="sala")) == [
        "sparse", "lightning", "sparse", "lightning"]
    with caplog.at_level(logging.INFO, logger="hybridize"):
        summary = run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", recipe="sala", layer_types="ALLA",
                                    num_attention=2))
    assert summary["selection"]["layer_types"] == ["sparse", "lightning", "lightning", "sparse"]
    assert "A layers of --layer-types ALLA become InfLLM-V2 sparse attention (schedule SLLS)" in caplog.text
    model = HybridForCausalLM.from_pretrained(final_model_dir(tmp_path / "run"))
    assert model.config.layer_types == ["sparse", "lightning", "lightning", "sparse"]


def test_cli_rejects_bad_numbers_and_out_paths(capsys, tmp_path, tiny_teacher_dir, data_file):
    for flag in ("--seq-len", "--stage1-batch", "--stage2-batch", "--stage1-tokens"):
        with pytest.raises(SystemExit) as e:
            main(["convert", flag, "0"])
        assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    code, err = _run_cli(capsys, "convert", "--teacher", str(tiny_teacher_dir), "--data", str(data_file), "--out", str(a_file))
    assert code == 2 and "is a file" in err


def test_resume_with_another_teacher_is_refused(tiny_teacher_dir, data_file, tmp_path, capsys):
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))
    code, err = _run_cli(capsys, "convert", "--teacher", "smollm2", "--data", str(data_file), "--out", str(tmp_path / "run"))
    assert code == 2 and "--teacher" in err and "another --out" in err


def test_rerun_with_other_settings_for_a_finished_stage_is_refused(tiny_teacher_dir, data_file, tmp_path):
    """A finished stage would be reused as it is: a rerun that changes what it depends on (the schedule, a
    budget) is refused with the flag, the two values and the ways out; the run is left untouched."""
    run = tmp_path / "run"
    run_convert(_opts(tiny_teacher_dir, data_file, run))
    before = StageDir(run, "stage2").manifest()
    for change, flag in (({"layer_types": "ALLL"}, "--layer-types"), ({"stage2_tokens": 32 * 4 * 9}, "--stage2-tokens"),
                         ({"stage1_batch": 2}, "--stage1-batch")):
        with pytest.raises(ValueError, match=flag) as info:
            run_convert(_opts(tiny_teacher_dir, data_file, run, **change))
        assert "another --out" in str(info.value) and "remove" in str(info.value)
    assert StageDir(run, "stage2").manifest() == before
    run_convert(_opts(tiny_teacher_dir, data_file, run))  # the same settings resume (reuse) fine


def test_out_into_a_foreign_folder_is_refused(tiny_teacher_dir, data_file, tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a `hybridize convert` run \(results.json\)"):
        run_convert(_opts(tiny_teacher_dir, data_file, folder))
    assert sorted(p.name for p in folder.iterdir()) == ["results.json"]
    (tmp_path / "empty").mkdir()
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "empty", layer_types="ALLL"))  # an empty folder is fine


def test_two_converts_never_share_a_run_dir(tiny_teacher_dir, data_file, tmp_path):
    from hybridize.convert.pipeline import _run_lock

    with _run_lock(tmp_path / "run", True):
        with pytest.raises(ValueError, match="another `hybridize convert`"):
            run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))


def test_failed_reselect_keeps_previous_selection(tiny_teacher_dir, data_file, tmp_path, capsys):
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))
    before = StageDir(tmp_path / "run", "selection").manifest()
    code = main(["select", "--run", str(tmp_path / "run"), "--num-attention", "-1"])
    assert code == 2 and "--num-attention" in capsys.readouterr().err
    assert StageDir(tmp_path / "run", "selection").manifest() == before


def test_reselect_of_a_gpu_run_on_a_cpu_machine(tiny_teacher_dir, data_file, tmp_path, capsys):
    run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run"))
    manifest = StageDir(tmp_path / "run", "stage1").manifest_path
    m = json.loads(manifest.read_text())
    m["inputs"]["options"]["device"] = "cuda"  # as if trained on a GPU
    manifest.write_text(json.dumps(m))
    assert main(["select", "--run", str(tmp_path / "run"), "--selection", "even-latter"]) == 0


def test_flops_counts_linear_weights_and_cores():
    """forward_flops_per_token = 2 x Linear weights + the causal mixing cores; MFU is None on the CPU."""
    from torch import nn

    from hybridize.convert.flops import forward_flops_per_token, linear_flops_per_token, mfu, mixing_flops_per_token

    lin = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    assert linear_flops_per_token(lin) == 2 * (12 + 6)
    # attention at T=7, 2 heads of dim 8: 4 * 2 * 8 * (7 + 1) / 2; lightning at chunk 4: 2 * (4*64 + 2*8*5)
    assert mixing_flops_per_token(["attention"], 2, 8, 7) == 4 * 2 * 8 * 4
    assert mixing_flops_per_token(["lightning"], 2, 8, 7, chunk_size=4) == 2 * (4 * 64 + 2 * 8 * 5)
    with pytest.raises(ValueError, match="unknown layer type"):
        mixing_flops_per_token(["conv"], 2, 8, 7)
    from conftest import tiny_teacher

    teacher = tiny_teacher("llama")
    cfg = teacher.config
    expect = linear_flops_per_token(teacher.model) + linear_flops_per_token(teacher.lm_head) + mixing_flops_per_token(
        ["attention"] * cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, 32)
    assert forward_flops_per_token(teacher, 32) == expect
    assert mfu(1e9, 1e3, "cpu") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_convert_stages_on_gpu(tiny_teacher_dir, data_file, tmp_path):
    """Stages 1, selection (HALO sweep) and 2 run on CUDA under bf16 autocast with the GPU kernels; losses
    finite, throughput and MFU fields recorded."""
    summary = run_convert(_opts(tiny_teacher_dir, data_file, tmp_path / "run", selection="halo", device="cuda"))
    for name in ("stage1", "stage2"):
        m = summary[name]
        assert m["final_loss"] == m["final_loss"] and m["final_loss"] < float("inf")
        assert m["steady_tokens_per_s"] > 0 and m["flops_per_token"] > 0
        assert "mfu" in m


@pytest.mark.parametrize("broken", ["weights.safetensors", "meta.json", "optimizer.rank0.pt"])
def test_a_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path, broken):
    stage = StageDir(tmp_path, "stage1")
    w = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(w.parameters())
    w(torch.randn(4, 3)).sum().backward()
    opt.step()
    stage.save_checkpoint(dict(w.state_dict()), opt, {"step": 1})
    weights, meta = stage.load_checkpoint(torch.optim.AdamW(w.parameters()))
    assert meta["step"] == 1 and set(weights) == {"weight", "bias"}
    path = stage.checkpoint_path / broken
    path.write_bytes(path.read_bytes()[:9])
    with pytest.raises(ValueError, match="cannot read the checkpoint file") as info:
        stage.load_checkpoint(torch.optim.AdamW(w.parameters()))
    assert broken in str(info.value) and f"delete {stage.checkpoint_path}" in str(info.value)


def test_git_commit_prefers_the_environment(monkeypatch):
    """A tree copied to a GPU node may carry another commit's .git: HYBRIDIZE_GIT_COMMIT names the real one."""
    from hybridize.convert.stage import git_commit

    monkeypatch.setenv("HYBRIDIZE_GIT_COMMIT", "74d9855")
    assert git_commit() == "74d9855"
    monkeypatch.setenv("HYBRIDIZE_GIT_COMMIT", "unknown")  # what the device scripts set when no commit is given
    assert git_commit() != "unknown"


def test_git_state_says_when_uncommitted_changes_are_unknown(monkeypatch):
    """One provenance record for every benchmark: the commit, and whether tracked files differ from it; unknown
    (None) when the commit was given rather than read (a copied tree's .git may be another commit's)."""
    from hybridize.convert.stage import git_state

    monkeypatch.delenv("HYBRIDIZE_GIT_COMMIT", raising=False)
    here = git_state()
    assert len(here["commit"]) == 40 and isinstance(here["uncommitted_changes"], bool)  # the tests run in a checkout
    assert git_state("74d9855") == {"commit": "74d9855", "uncommitted_changes": None}
    assert git_state("unknown") == here  # the device scripts' value when no commit was given
    monkeypatch.setenv("HYBRIDIZE_GIT_COMMIT", "74d9855")
    assert git_state() == {"commit": "74d9855", "uncommitted_changes": None}


def test_stage0_students_do_not_depend_on_earlier_random_draws(tiny_teacher_dir, tmp_path):
    """The stage-0 Lightning students (their random output gates) come from the seed alone: on the H200 the first
    conversion of a fresh machine built the default teacher from its GGUF (a model initialisation: random draws)
    after seeding and started stage 1 from other gates than every later run (first loss 14.578 vs 14.654)."""
    from safetensors.torch import load_file

    from hybridize.convert.align import MIXERS_FILE, run_stage1
    from hybridize.convert.trainer import TrainSettings

    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir)
    data = torch.randint(0, teacher.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(32 * 4, 32, 4, 1e-3, 1e-4, warmup=1)
    stage0 = []
    for run, draws in (("a", 0), ("b", 1000)):
        torch.manual_seed(0)
        torch.randn(draws)  # what loading a teacher may draw from the global generator
        run_stage1(teacher, data, tmp_path / run, settings, {"teacher": "tiny"}, seed=0)
        stage0.append(load_file(str(tmp_path / run / "stage0" / MIXERS_FILE)))
    assert any("output_gate" in k for k in stage0[0])
    assert all(torch.equal(stage0[0][k], stage0[1][k]) for k in stage0[0])


@pytest.mark.parametrize("bad, message", [("missing.jsonl", "no such file or directory"), ("notes.md", "unsupported file type '.md'")])
def test_bad_data_is_named_before_the_teacher_loads(tiny_teacher_dir, tmp_path, monkeypatch, bad, message):
    """A wrong --data path is refused before the teacher is loaded (seconds for a local checkpoint, minutes for
    a hub download or the first build of the default teacher), and no run directory is left."""
    import hybridize.convert.teachers as teachers
    from hybridize.errors import DataError

    (tmp_path / "notes.md").write_text("text")

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded before --data was checked")

    monkeypatch.setattr(teachers, "load_teacher", no_teacher)
    with pytest.raises(DataError, match=message):
        run_convert(_opts(tiny_teacher_dir, tmp_path / bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_command_line_help_does_not_import_torch():
    """`hybridize --help` and every subcommand's help answer without importing torch or transformers (the model
    code loads on first use: hybridize and hybridize.bench export it lazily)."""
    import subprocess
    import sys

    code = ("import sys; from hybridize.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    for command in ("convert", "select", "generate", "eval", "tune-hype", "bench"):
        r = subprocess.run([sys.executable, "-m", "hybridize", command, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and f"usage: hybridize {command}" in r.stdout
    import hybridize

    assert hybridize.HybridForCausalLM.__name__ == "HybridForCausalLM"  # still exported
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hybridize.nope
