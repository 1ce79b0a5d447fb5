"""Long-context speed and memory benchmark (``hybridize bench``): presets, measurements, reports.

See :mod:`hybridize.bench.runner` for what one run does, :mod:`hybridize.bench.measure` for the definitions
of every number, and :mod:`hybridize.bench.presets` for the model shapes.
"""

from .presets import DEFAULT_LENGTHS, DEFAULT_OUT, PRESETS, Preset, build_model, preset_names

_RUNNER = ("BenchOptions", "command_line", "run_bench", "run_bench_parallel", "measure")


def __getattr__(name: str):
    """The runner (torch, the kernels) loads on first use (PEP 562): the command line lists the presets without it."""
    if name in _RUNNER:
        import importlib

        if name == "measure":
            return importlib.import_module(f"{__name__}.measure")
        return getattr(importlib.import_module(f"{__name__}.runner"), name)
    raise AttributeError(f"module 'hybridize.bench' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "Preset",
    "build_model",
    "preset_names",
    "BenchOptions",
    "run_bench",
    "run_bench_parallel",
    "command_line",
    "DEFAULT_LENGTHS",
    "DEFAULT_OUT",
]
