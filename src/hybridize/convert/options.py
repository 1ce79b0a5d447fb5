"""The options of ``hybridize convert`` (:class:`ConvertOptions`) and the names they choose from, without importing
torch: the command line builds its parser (and answers ``--help``) from these alone."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConvertOptions", "RECIPES", "SELECTION_METHODS", "PPL_TEXTS", "PASSKEY_FORMS", "FSDP_PARAM_DTYPES", "FSDP_UNITS",
           "check_fsdp_options"]

#: ``--ppl-text`` choices: the whole held-out split, or only its essays concatenated in order
PPL_TEXTS = ("heldout", "essay")
#: ``--passkey-forms`` choices: classic repeated filler sentences, or held-out Paul Graham essay text
PASSKEY_FORMS = ("repeated", "essay")

#: Layer selection methods of ``--selection`` (:func:`hybridize.convert.select.select_layers`).
SELECTION_METHODS = ("halo", "even", "even-latter", "recall-drop", "kl-guided")

#: ``hypenet``: kept layers are NoPE+HyPE softmax attention (SPEC 1b); ``sala``: kept layers are InfLLM-V2
#: sparse attention (SPEC 1c), first and last layers always kept (MiniCPM-SALA recipe).
RECIPES = ("hypenet", "sala")

#: ``--fsdp-param-dtype`` choices: the dtype FSDP2 all-gathers the weights in (:func:`hybridize.convert.distributed.shard_modules`)
FSDP_PARAM_DTYPES = ("fp32", "bf16")
#: ``--fsdp-unit`` choices: one FSDP2 unit per decoder layer, or one for the whole trained model
FSDP_UNITS = ("layer", "model")


def check_fsdp_options(param_dtype: str, prefetch: int, unit: str) -> None:
    """The rules of ``--fsdp-param-dtype`` / ``--fsdp-prefetch`` / ``--fsdp-unit`` (checked by ``hybridize convert``
    before any work, and by :func:`hybridize.convert.distributed.shard_modules`).

    Raises:
        ValueError: an unknown dtype or unit, a prefetch that is not an integer >= 0, prefetch with the model unit.
    """
    if param_dtype not in FSDP_PARAM_DTYPES:
        raise ValueError(f"--fsdp-param-dtype must be one of {FSDP_PARAM_DTYPES}, got {param_dtype!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"--fsdp-prefetch must be an integer >= 0 (decoder layers to prefetch), got {prefetch!r}")
    if unit not in FSDP_UNITS:
        raise ValueError(f"--fsdp-unit must be one of {FSDP_UNITS}, got {unit!r}")
    if prefetch and unit != "layer":
        raise ValueError("--fsdp-prefetch prefetches the next layers' all-gathers: it needs --fsdp-unit layer (with "
                         "--fsdp-unit model every weight is gathered at once); drop one of the two")


@dataclass
class ConvertOptions:
    """Every knob of ``hybridize convert``; defaults are sized for the CPU demo on the embedded teacher
    (about 20-30 minutes on 2 cores). Token budgets are totals per stage; see SPEC 2 for the paper's.
    """

    teacher: str | None = None
    data: list[str] | None = None
    out: str = "runs/smollm2-hypenet"
    seq_len: int = 256
    stage1_tokens: int = 96_000
    stage1_batch: int = 8
    stage1_lr: float = 1e-3
    stage1_lr_final: float = 1e-5
    stage2_tokens: int = 48_000
    stage2_batch: int = 4
    stage2_lr: float = 2e-4
    stage2_lr_final: float = 1e-5
    stage3: bool = False
    stage3_tokens: int = 32_768
    stage3_seq_len: int = 4096
    stage3_batch: int = 1
    stage3_lr: float = 1e-5
    num_attention: int | None = None
    selection: str = "halo"
    layer_types: str | None = None
    recall_examples: int = 16
    recall_tasks: list[str] | None = None
    general_tasks: list[str] | None = None
    lm_eval_limit: int | None = None
    collapse_threshold: float = 0.5
    recipe: str = "hypenet"
    eval: bool = True
    eval_ppl_lengths: tuple[int, ...] = (512, 2048)
    eval_ppl_sequences: int = 4
    eval_passkey_lengths: tuple[int, ...] = (1024, 2048)
    eval_passkey_trials: int = 10
    checkpoint_every: int = 20
    grad_accum: int = 1
    fsdp_reshard_after_forward: bool = True
    fsdp_param_dtype: str = "fp32"
    fsdp_prefetch: int = 0
    fsdp_unit: str = "layer"
    profile_steps: int = 0
    device: str | None = None
    seed: int = 0
    threads: int | None = None
    extra: dict = field(default_factory=dict)
