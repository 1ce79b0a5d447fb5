"""Long-context speed and memory benchmark (``hybridize bench``): presets, measurements, reports.

See :mod:`hybridize.bench.runner` for what one run does, :mod:`hybridize.bench.measure` for the definitions
of every number, and :mod:`hybridize.bench.presets` for the model shapes.
"""

from .presets import PRESETS, Preset, build_model, preset_names
from .runner import DEFAULT_LENGTHS, DEFAULT_OUT, BenchOptions, command_line, run_bench, run_bench_parallel

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
