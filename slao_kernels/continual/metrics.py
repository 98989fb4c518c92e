r"""Continual-learning metrics over an accuracy matrix (docs/design.md §1.6).

``R[i][j]`` is the accuracy on task j after training task i (0-based here,
T tasks); ``R0[j]`` the accuracy of the untrained model on task j.

* AA (average accuracy) = mean_j R[T−1][j]
* BWT (backward transfer) = mean_{j<T−1} (R[T−1][j] − R[j][j])
* FWT (forward transfer) = mean_{j≥1} (R[j−1][j] − R0[j])
* forgetting = mean_{j<T−1} (max_{i<T−1} R[i][j] − R[T−1][j])
* AP = mean_j R[j][j], FP = mean_j R[T−1][j] (= AA), and SLICE's
  forgetting AP − FP.

With a single task BWT, FWT and forgetting have no terms and are reported as None.
"""

from __future__ import annotations

from collections.abc import Sequence


def _validate(R: Sequence[Sequence[float]], R0: Sequence[float] | None) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"the accuracy matrix must be T×T with T ≥ 1, got row lengths {[len(r) for r in R]}")
    if R0 is not None and len(R0) != T:
        raise ValueError(f"R0 must have one accuracy per task ({T}), got {len(R0)}")
    return T


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cl_metrics(R: Sequence[Sequence[float]], R0: Sequence[float] | None = None) -> dict:
    """AA, BWT, FWT (None without ``R0``), forgetting, AP, FP and AP − FP of an accuracy matrix."""
    T = _validate(R, R0)
    last = R[T - 1]
    aa = _mean(list(last))
    ap = _mean([R[j][j] for j in range(T)])
    return {
        "aa": aa,
        "bwt": _mean([last[j] - R[j][j] for j in range(T - 1)]),
        "fwt": None if R0 is None else _mean([R[j - 1][j] - R0[j] for j in range(1, T)]),
        "forgetting": _mean([max(R[i][j] for i in range(T - 1)) - last[j] for j in range(T - 1)]),
        "ap": ap,
        "fp": aa,
        "ap_minus_fp": ap - aa,
    }
