"""Runtime selection among the candidates of an op: never slower than the torch composition.

On CUDA each op keeps several implementations of the same product: the fused
Triton kernel at a few tile configurations, cuBLAS plus a Triton epilogue, and
the plain torch composition (what PEFT-style code costs). Which one is fastest
depends on the device and the shape, and the Triton kernels have never been
measured on most devices, so the choice is made by timing every candidate once
on the user's device, per problem key, and remembering it:

* the key: op, device name, dtypes, N, K, R and M bucketed to the next power of
  two (so a changing number of tokens does not retune at every step);
* the choice is kept in memory and in one JSON file per device under the cache
  directory (``$SLAO_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/slao_kernels/tuning``,
  else ``~/.cache/slao_kernels/tuning``), written atomically, so tuning is paid
  once per shape and machine;
* a candidate that fails to compile or launch is dropped with one warning, and
  the others still compete: the torch composition is always among them.

``SLAO_KERNELS_TUNE`` sets the mode: ``on`` (default) as above; ``off``, the
static heuristic (the first candidate) with no timing and no file; ``cached``,
only choices already on disk (else the heuristic), never timing: the same
kernel every run, for reproducible runs.

Bit-reproducibility: candidates sum in different orders, so two runs that choose
differently differ by rounding; ``off`` or ``cached`` fixes the choice. In a
distributed run each rank chooses for itself and ranks may differ; gradients are
all-reduced, so replicas stay identical, and with ``cached`` (a file copied to
every node) every rank runs the same kernels.
"""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MODES = ("on", "off", "cached")
ENV_MODE = "SLAO_KERNELS_TUNE"
ENV_CACHE_DIR = "SLAO_KERNELS_CACHE_DIR"
FILE_FORMAT = "slao_kernels.tuning/1"


@dataclass(frozen=True)
class Candidate:
    """One implementation of an op: ``run()`` computes the op's result (into the
    op's output) for the problem being tuned. ``name`` is what the cache stores."""

    name: str
    run: Callable[[], object]


def mode() -> str:
    """The tuning mode from ``$SLAO_KERNELS_TUNE`` (default ``on``)."""
    value = os.environ.get(ENV_MODE, "on").strip().lower()
    if value not in MODES:
        raise ValueError(f"{ENV_MODE} must be one of {MODES}, got {os.environ.get(ENV_MODE)!r}")
    return value


def cache_dir() -> str:
    """Where the per-device choice files live (see the module docstring)."""
    if os.environ.get(ENV_CACHE_DIR):
        return os.environ[ENV_CACHE_DIR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "slao_kernels", "tuning")


def m_bucket(m: int) -> int:
    """The next power of two ≥ ``m`` (1 for m ≤ 1): problems in one bucket share a choice."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


def problem_key(op: str, dtypes: Sequence[torch.dtype], n: int, k: int, r: int, m: int) -> str:
    """The cache key of one problem of ``op`` (the device is the file's, see :class:`Tuner`)."""
    names = ",".join(str(d).replace("torch.", "") for d in dtypes)
    return f"{op}|{names}|N={n}|K={k}|R={r}|M<={m_bucket(m)}"


def device_name(device: torch.device) -> str:
    """The name the cache file of ``device`` is called by (the CUDA device's product name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def cuda_timer(run: Callable[[], object], reps: int = 5) -> float:
    """Median seconds of ``run()`` on the current CUDA stream, after one warm-up call
    (which also compiles a Triton candidate)."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


class Tuner:
    """The choices of one device: in memory, backed by its JSON file.

    Args:
        name: the device's name (:func:`device_name`); the file is ``cache_dir()/<name>.json``.
        timer: ``timer(run) -> seconds``; :func:`cuda_timer` by default (tests inject their own).
        directory: the cache directory (default :func:`cache_dir`).
    """

    def __init__(self, name: str, timer: Callable[[Callable[[], object]], float] = cuda_timer,
                 directory: str | None = None):
        self.name = name
        self.timer = timer
        self.path = os.path.join(directory or cache_dir(), re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".json")
        self._choices: dict[str, str] | None = None  # read from disk on first use
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _disk(self) -> dict[str, str]:
        """The choices in the file; an unreadable or foreign file counts as empty (and is rewritten)."""
        import json

        try:
            with open(self.path) as f:
                payload = json.load(f)
        except (OSError, ValueError):
            return {}
        choices = payload.get("choices") if isinstance(payload, dict) and payload.get("format") == FILE_FORMAT \
            else None
        if not isinstance(choices, dict):
            return {}
        return {k: v for k, v in choices.items() if isinstance(k, str) and isinstance(v, str)}

    def choices(self) -> dict[str, str]:
        """Every choice known for this device (key → candidate name)."""
        if self._choices is None:
            self._choices = self._disk()
        return dict(self._choices)

    def _store(self, key: str, name: str) -> None:
        from slao_kernels._files import write_json_atomic

        self._choices[key] = name
        merged = {**self._disk(), key: name}  # keep what another process wrote meanwhile
        try:
            write_json_atomic(self.path, {"format": FILE_FORMAT, "device": self.name, "choices": merged})
        except OSError as exc:  # a read-only cache directory costs re-tuning next run, never the op
            self._warn_once(("store", self.path), f"slao_kernels: could not write the tuning cache {self.path} "
                                                 f"({exc}); choices are kept for this process only")

    def _warn_once(self, tag: tuple[str, str], message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def needs_timing(self, key: str) -> bool:
        """Whether :meth:`choose` would time the candidates of ``key`` now (mode ``on``, no choice yet):
        callers whose candidates write in place then tune on scratch tensors first."""
        return mode() == "on" and key not in self.choices()

    def choose(self, key: str, candidates: Sequence[Candidate], allow_timing: bool = True) -> Candidate:
        """The candidate to run for ``key``: see the module docstring for the modes.
        ``allow_timing=False`` (e.g. during CUDA-graph capture) acts as ``cached``.

        ``candidates[0]`` is the static heuristic's choice; the last one must be the
        torch composition (it is what remains if every Triton candidate fails).
        Timing runs every candidate, so their outputs must be scratch or the op's own.
        """
        if not candidates:
            raise ValueError("Tuner.choose: no candidates")
        how = mode()
        if how == "off":
            return candidates[0]
        by_name = {c.name: c for c in candidates}
        with self._lock:
            known = self.choices().get(key)
            if known in by_name:
                return by_name[known]
            if how == "cached" or not allow_timing:
                return candidates[0]
            timings: dict[str, float] = {}
            for c in candidates:
                try:
                    timings[c.name] = float(self.timer(c.run))
                except Exception as exc:  # noqa: BLE001 - a candidate that cannot compile or launch is dropped
                    self._warn_once((key.split("|")[0], c.name),
                                    f"slao_kernels: candidate {c.name!r} of {key.split('|')[0]} failed on "
                                    f"{self.name} and is skipped ({type(exc).__name__}: {exc})")
            timings = {n: t for n, t in timings.items() if math.isfinite(t)}
            if not timings:
                raise RuntimeError(f"slao_kernels: every candidate of {key} failed on {self.name}")
            best = min(timings, key=timings.__getitem__)
            self._store(key, best)
            return by_name[best]


@functools.cache
def multiprocessor_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (queried once; never at import)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


_TUNERS: dict[str, Tuner] = {}


def tuner(device: torch.device) -> Tuner:
    """The process-wide :class:`Tuner` of ``device`` (created on first use)."""
    name = device_name(device)
    if name not in _TUNERS:
        _TUNERS[name] = Tuner(name)
    return _TUNERS[name]
