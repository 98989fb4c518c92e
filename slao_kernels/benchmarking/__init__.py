"""The benchmark harness: what ``slao bench``, ``slao info`` and ``benchmarks/`` time and report.

It sits beside the continual engine, above the kernel layer: it may use the ops,
``nn`` and ``patching`` but nothing of ``continual`` or ``cli``, and nothing below
imports it (``tests/test_layering.py``). ``import slao_kernels`` does not load it.

  cases.py        the ``lora_linear`` problems (providers × modes × shapes) and SLAO's
                  per-task ops, each a ``(setup, run)`` case
  references.py   the stock-torch baselines: PEFT-style eager, the composed forward
                  with the reference backward, ``linalg.qr`` with the sign fix
  timing.py       the interleaved timer (ratios robust to a drifting machine)
  compare.py      the ``slao bench`` comparisons and their text tables
  environment.py  the machine and versions, for results files and ``slao info``
"""

from slao_kernels.benchmarking.cases import (
    CPU_SHAPES,
    GPU_SHAPES,
    MODES,
    PROVIDERS,
    TASK_SWITCH_SET,
    Shape,
    default_shapes,
    make_case,
    make_inputs,
    merge_cases,
    orthonormalize_cases,
)
from slao_kernels.benchmarking.compare import (
    compare,
    compare_task_switch_ops,
    format_table,
    format_task_switch_table,
)
from slao_kernels.benchmarking.environment import environment
from slao_kernels.benchmarking.timing import synchronized, time_interleaved

__all__ = ["CPU_SHAPES", "GPU_SHAPES", "MODES", "PROVIDERS", "TASK_SWITCH_SET", "Shape", "compare",
           "compare_task_switch_ops", "default_shapes", "environment", "format_table", "format_task_switch_table",
           "make_case", "make_inputs", "merge_cases", "orthonormalize_cases", "synchronized", "time_interleaved"]
