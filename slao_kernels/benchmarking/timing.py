"""An interleaved timer: ratios measured in one run on a machine whose speed drifts.

:func:`time_interleaved` runs the cases round-robin, so that shared CPUs or
changing GPU clocks slow every provider alike and the ratios stay meaningful
even when the absolute times do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync_device(device: str) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def synchronized(run: Callable, device: str) -> Callable:
    """``run`` followed by a device synchronization, so a timer measures the work, not its launch."""

    def timed(*args):
        run(*args)
        sync_device(device)

    return timed


def time_interleaved(cases: dict, device: str, rounds: int = 50, warmup: int = 5,
                     min_round_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each ``name -> (setup, run)`` case, timed round-robin.

    Each round times every case once; a case that is fast is repeated within
    its round until ``min_round_s`` has passed, for timer resolution.
    """
    names = list(cases)
    reps = {}
    for name in names:  # warm up and size the repetitions
        setup, run = cases[name]
        for _ in range(warmup):
            run(*setup())
        sync_device(device)
        t = time.perf_counter()
        run(*setup())
        sync_device(device)
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - t, 1e-7)))
    samples = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            setup, run = cases[name]
            total = 0.0
            for _ in range(reps[name]):
                args = setup()
                sync_device(device)
                t = time.perf_counter()
                run(*args)
                sync_device(device)
                total += time.perf_counter() - t
            samples[name].append(total / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}
