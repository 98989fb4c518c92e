"""Reading a run's report: a terminal table and two plots; the comparison figure of several runs.

* :func:`format_report` — the accuracy matrix (rows: after training task i;
  columns: evaluated on task j; the diagonal marked), the zero-shot row and
  the metrics, as plain text.
* :func:`plot_report` — ``accuracy_matrix.png`` (heatmap of R) and
  ``accuracy_over_time.png`` (each task's accuracy after every training
  stage, zero-shot first). Needs matplotlib; without it the plots are skipped
  with a message, the run itself does not depend on them.
* :func:`plot_comparison` — ``comparison.png`` of ``slao demo``: the strategies'
  accuracy matrices side by side, and their accuracy over the stream.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_report(report: dict) -> str:
    """The accuracy matrix and the metrics of a report, as a text table."""
    names = report["tasks"]
    width = max(8, *(len(n) for n in names)) + 1
    label_width = max(len("zero-shot"), *(len(f"after {n}") for n in names)) + 2
    lines = ["accuracy (rows: after training; columns: evaluated on; * the task just trained)",
             " " * label_width + "".join(f"{n:>{width}}" for n in names)]
    if report.get("zero_shot") is not None:
        lines.append(f"{'zero-shot':<{label_width}}" + "".join(f"{a:>{width}.3f} " for a in report["zero_shot"]))
    for i, row in enumerate(report["accuracy_matrix"]):
        cells = "".join(f"{a:>{width}.3f}" + ("*" if j == i else " ") for j, a in enumerate(row))
        lines.append(f"{'after ' + names[i]:<{label_width}}" + cells)
    lines.append("")
    lines.append(f"AA {_fmt(report.get('aa'))}   BWT {_fmt(report.get('bwt'), True)}   "
                 f"FWT {_fmt(report.get('fwt'), True)}   forgetting {_fmt(report.get('forgetting'))}")
    return "\n".join(lines)


def plot_report(report: dict, out: str, log: Callable[[str], None] = print) -> list[str]:
    """Write the two PNG plots of a complete report into ``out``; returns their paths
    (empty when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    from slao_kernels._files import write_atomic

    names, R = report["tasks"], report["accuracy_matrix"]
    paths = []

    def save(fig, name: str) -> None:
        path = os.path.join(out, name)
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        paths.append(path)

    T = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * T, 1.0 + 0.8 * T))
    image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(len(R)):
        for j in range(T):
            ax.text(j, i, f"{R[i][j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if R[i][j] > 0.6 else "white", fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(len(R)), [f"after {n}" for n in names[:len(R)]])
    ax.set_xlabel("evaluated on")
    strategy = report.get("config", {}).get("strategy", "")
    ax.set_title(f"{strategy}: AA {_fmt(report.get('aa'))}, BWT {_fmt(report.get('bwt'), True)}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    save(fig, "accuracy_matrix.png")

    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.8 * T), 3.5))
    stages = ["zero-shot"] + [f"after {n}" for n in names[:len(R)]]
    for j, name in enumerate(names):
        series = [report["zero_shot"][j]] + [row[j] for row in R]
        ax.plot(range(len(series)), series, marker="o", label=name)
    ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("accuracy of every task over the stream", fontsize=10)
    save(fig, "accuracy_over_time.png")
    return paths


def plot_comparison(record: dict, out: str, log: Callable[[str], None] = print) -> str | None:
    """``comparison.png`` of a side-by-side record (:func:`~slao_kernels.continual.compare.side_by_side`):
    top row, every strategy's accuracy matrix as a heatmap on one colour scale; bottom row, every
    strategy's accuracy on each task over the stream, with the average over the tasks trained so
    far as a thick line. Returns the path (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no comparison figure (pip install matplotlib)")
        return None
    from slao_kernels._files import write_atomic

    names, strategies = record["tasks"], record["strategies"]
    T, S = len(names), len(strategies)
    fig, axes = plt.subplots(2, S, figsize=(max(4.2, 1.4 + 0.9 * T) * S, 3.0 + 1.6 * T), squeeze=False,
                             layout="constrained")
    stages = ["zero-shot"] + [f"after {n}" for n in names]
    for k, (spec, entry) in enumerate(strategies.items()):
        R = entry["accuracy_matrix"]
        ax = axes[0][k]
        image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(T):
            for j in range(T):
                ax.text(j, i, f"{R[i][j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if R[i][j] > 0.6 else "white", fontweight="bold" if i == j else "normal")
        ax.set_xticks(range(T), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(T), [f"after {n}" for n in names], fontsize=8)
        ax.set_xlabel("evaluated on", fontsize=8)
        ax.set_title(f"{spec}: AA {_fmt(entry['aa'])}, BWT {_fmt(entry['bwt'], True)}", fontsize=10)
        ax = axes[1][k]
        for j, name in enumerate(names):
            ax.plot(range(T + 1), [entry["zero_shot"][j]] + [row[j] for row in R], marker="o", markersize=3,
                    linewidth=1.0, label=name)
        seen = [statistics.fmean(R[i][:i + 1]) for i in range(T)]
        ax.plot(range(1, T + 1), seen, color="black", linewidth=2.5, label="mean over tasks seen")
        ax.set_xticks(range(T + 1), stages, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{spec}: accuracy over the stream", fontsize=10)
        if k == 0:
            ax.set_ylabel("accuracy")
            ax.legend(fontsize=7, loc="lower left")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.9, label="accuracy")
    path = os.path.join(out, "comparison.png")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
