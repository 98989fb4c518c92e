"""Strategies side by side: the continual-learning quality benchmark.

:func:`run_comparison` runs every (strategy, seed) over the same task order
from the same base model, each with :func:`~slao_kernels.continual.run_stream`
into ``<out>/runs/<strategy>/seed<k>/`` (so a finished run is skipped and an
interrupted one resumed when the command is repeated), then summarizes:

    results.json      per strategy: mean and standard deviation over seeds of AA,
                      BWT, FWT, forgetting, AP, FP; adapter memory after the first
                      and the last task; wall time per task; every run's numbers
    results.md        the same as a table
    quality.png       AA and BWT per strategy, error bars over seeds
    memory.png        adapter memory after each task, per strategy

A strategy spec is a name with options: ``"slao"``, ``"slao:init=random"``,
``"olora:weight=0.1"``, ``"slice:c=0.5,scope=module"``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence

from slao_kernels.continual.runner import RunConfig, comparable_settings, run_stream
from slao_kernels.continual.strategies import registered_strategy
from slao_kernels.continual.tasks import Task

METRICS = ("aa", "bwt", "fwt", "forgetting", "ap", "fp")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"slice:c=0.5,scope=module"`` → ``("slice", {"c": 0.5, "scope": "module"})``, checked: each
    value read by the declared type of the strategy's config field (:meth:`StrategyConfig.parse_option
    <slao_kernels.continual.strategies.StrategyConfig.parse_option>`)."""
    name, _, rest = spec.partition(":")
    config = registered_strategy(name).config
    pairs = []
    for item in filter(None, rest.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"strategy spec {spec!r}: options are key=value, got {item!r}")
        pairs.append((key, text))
    unknown = sorted({key for key, _ in pairs} - set(config.option_names()))
    if unknown:
        raise ValueError(f"strategy spec {spec!r}: {name!r} has no option(s) {unknown}")
    options = {}
    for key, text in pairs:
        try:
            options[key] = config.parse_option(key, text)
        except ValueError as e:
            raise ValueError(f"strategy spec {spec!r}: {e}") from None
    return name, options


def _spread(values: list[float | None]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def run_directory(out: str, spec: str, seed: int) -> str:
    """Where :func:`run_comparison` writes the run of ``spec`` with ``seed``: ``<out>/runs/<spec>/seed<k>``,
    the spec's ``:``, ``,`` and ``=`` made safe for a path."""
    return os.path.join(out, "runs", spec.replace(":", "_").replace(",", "_").replace("=", "-"), f"seed{seed}")


def run_comparison(model, tokenizer, tasks: Sequence[Task], specs: Sequence[str], seeds: Sequence[int],
                   config: RunConfig, out: str, progress: bool = True,
                   log: Callable[[str], None] = print, extra: dict | None = None) -> dict:
    """Run every strategy spec with every seed on a fresh copy of ``model``; returns the summary.

    A finished run already in ``out`` is reused as it is when it has this comparison's tasks and settings,
    and refused (``ValueError`` naming what differs) otherwise, before anything runs; an unfinished one is
    resumed, checked by :func:`run_stream`.

    ``config`` sets everything but the strategy and the seeds (its ``seed`` and
    ``train.seed`` are replaced by each seed). The zero-shot accuracies are measured
    by the first run and given to the others (see :func:`run_stream`'s ``zero_shot``).
    """
    parsed = {spec: parse_spec(spec) for spec in specs}  # every spec checked before anything runs
    if not seeds:
        raise ValueError("run_comparison: no seeds")
    runs: dict[str, list[dict]] = {}
    zero_shot = None  # the base model's, the same for every run
    names = [t.name for t in tasks]
    evaluation = json.loads(json.dumps({**config.to_dict(), **(extra or {})}))  # as a report.json reads back
    plan = []  # every finished run checked to be this comparison's before anything runs
    for spec, (name, options) in parsed.items():
        for seed in seeds:
            run_dir = run_directory(out, spec, seed)
            run_config = RunConfig(lora=config.lora, train=type(config.train)(**{**config.train.to_dict(),
                                                                                  "seed": seed}),
                                   strategy=name, strategy_options=options, eval_batch_size=config.eval_batch_size,
                                   max_test=config.max_test, max_prompt_tokens=config.max_prompt_tokens, seed=seed)
            report_path = os.path.join(run_dir, "report.json")
            existing = None
            if os.path.isfile(report_path):
                with open(report_path) as f:
                    existing = json.load(f)
            if existing and existing.get("status") == "complete":
                _check_reusable(existing, report_path, names,
                                {**run_config.to_dict(), "spec": spec, **(extra or {})})
            plan.append((spec, seed, run_dir, report_path, run_config, existing))
    for spec, seed, run_dir, report_path, run_config, existing in plan:
        if existing and existing.get("status") == "complete":
            log(f"{spec} seed {seed}: done earlier, {report_path}")
            runs.setdefault(spec, []).append(existing)
            if zero_shot is None and _same_evaluation(existing, names, evaluation):
                zero_shot = existing.get("zero_shot")
            continue
        log(f"{spec} seed {seed}: {'resuming' if existing else 'running'} into {run_dir}")
        fresh = copy.deepcopy(model)  # the base weights untouched by earlier runs (LoRA-GA, SLICE change them)
        start = time.perf_counter()
        report = run_stream(fresh, tokenizer, tasks, run_config, out=run_dir, progress=progress,
                            log=lambda s: None, extra_report={"spec": spec, **(extra or {})},
                            resume=existing is not None, zero_shot=zero_shot)
        zero_shot = report["zero_shot"]
        del fresh
        bwt = "n/a" if report["bwt"] is None else f"{report['bwt']:+.3f}"
        log(f"{spec} seed {seed}: AA {report['aa']:.3f}, BWT {bwt} in {time.perf_counter() - start:.0f} s")
        runs.setdefault(spec, []).append(report)
    summary = summarize(runs, [t.name for t in tasks], list(seeds))
    return write_summary(summary, out, extra={"config": config.to_dict(), **(extra or {})}, log=log)


def _check_reusable(report: dict, path: str, names: list[str], expected: dict) -> None:
    """A finished run is reused as it is only when it is this comparison's: the same tasks and the same
    settings (as run_stream's resumption checks an unfinished one); else ``ValueError`` naming what differs."""
    if report.get("tasks") != names:
        raise ValueError(f"run_comparison: {path} is a finished run over {report.get('tasks')}, not {names}; "
                         "use another output directory, or remove it")
    theirs = comparable_settings(report.get("config") or {})
    ours = comparable_settings(json.loads(json.dumps(expected)))  # as a report.json reads back
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"run_comparison: {path} is a finished run with other settings ({', '.join(differ)}); "
                         "use another output directory, or remove it")


# what the zero-shot accuracies depend on, besides the tasks
_EVALUATION = ("lora", "max_test", "max_prompt_tokens", "eval_batch_size", "model", "tasks_source", "quantize")


def _same_evaluation(report: dict, names: list[str], evaluation: dict) -> bool:
    """Whether a finished run's zero-shot accuracies are this comparison's: the same tasks, and the
    same model, adapter shape and evaluation settings."""
    theirs = report.get("config") or {}
    return report.get("tasks") == names and all(theirs.get(k) == evaluation.get(k) for k in _EVALUATION)


def collect_runs(out: str, order: Sequence[str] = ()) -> dict[str, list[dict]]:
    """Every finished run under ``out/runs``, by strategy spec (``order`` first, then the rest
    sorted), each list sorted by seed: what :func:`summarize` takes, whatever specs and
    seeds the earlier commands ran. Unfinished runs are left out."""
    found: dict[str, list[dict]] = {}
    runs_dir = os.path.join(out, "runs")
    for strategy in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        for seed_dir in sorted(os.listdir(os.path.join(runs_dir, strategy))):
            path = os.path.join(runs_dir, strategy, seed_dir, "report.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                report = json.load(f)
            if report.get("status") == "complete":
                found.setdefault(report["config"].get("spec", strategy), []).append(report)
    for reports in found.values():
        reports.sort(key=lambda r: r["config"]["seed"])
    specs = [s for s in order if s in found] + sorted(s for s in found if s not in order)
    return {spec: found[spec] for spec in specs}


def write_summary(summary: dict, out: str, extra: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Write results.json, results.md and the plots of a :func:`summarize` result into ``out``."""
    from slao_kernels._files import write_atomic, write_json_atomic

    write_json_atomic(os.path.join(out, "results.json"), {**summary, **(extra or {})})
    table = format_summary(summary)
    write_atomic(os.path.join(out, "results.md"), lambda f: f.write(table.encode()))
    summary["plots"] = plot_summary(summary, out, log=log)
    return summary


def summarize(runs: dict[str, list[dict]], task_names: list[str], seeds: list[int]) -> dict:
    """Mean and spread over seeds of every metric, memory and time, per strategy spec."""
    strategies = {}
    for spec, reports in runs.items():
        per_task_s = [t["train_s"] + t["begin_s"] + t["end_s"] for r in reports for t in r["timings"]["tasks"]]
        strategies[spec] = {
            **{k: _spread([r[k] for r in reports]) for k in METRICS},
            "adapter_bytes_first": reports[0]["adapter_bytes"][0],
            "adapter_bytes_last": reports[0]["adapter_bytes"][-1],
            "adapter_bytes": reports[0]["adapter_bytes"],
            "train_s_per_task": _spread(per_task_s),
            "runs": [{"seed": r["config"]["seed"], **{k: r[k] for k in METRICS},
                      "accuracy_matrix": r["accuracy_matrix"], "zero_shot": r["zero_shot"]} for r in reports],
        }
    return {"tasks": task_names, "seeds": seeds, "strategies": strategies}


def _cell(spread: dict, signed: bool = False) -> str:
    if spread["mean"] is None:
        return "n/a"
    fmt = "+.3f" if signed else ".3f"
    if spread["n"] < 2:  # one seed: no spread to show
        return f"{spread['mean']:{fmt}}"
    return f"{spread['mean']:{fmt}} ± {spread['std']:.3f}"


def format_summary(summary: dict) -> str:
    """A Markdown table of :func:`summarize`'s output."""
    lines = [f"Tasks: {' → '.join(summary['tasks'])}; mean ± standard deviation over the seeds listed "
             "(the value alone for one seed).", "",
             "| strategy | seeds | AA | BWT | FWT | forgetting | AP | FP | adapter memory (first → last task) "
             "| s per task |", "|---|---|---|---|---|---|---|---|---|---|"]
    for spec, s in summary["strategies"].items():
        mem = f"{s['adapter_bytes_first'] / 2**20:.2f} → {s['adapter_bytes_last'] / 2**20:.2f} MiB"
        seeds = ",".join(str(r["seed"]) for r in s["runs"])
        lines.append(f"| {spec} | {seeds} | {_cell(s['aa'])} | {_cell(s['bwt'], True)} | {_cell(s['fwt'], True)} | "
                     f"{_cell(s['forgetting'])} | {_cell(s['ap'])} | {_cell(s['fp'])} | {mem} | "
                     f"{s['train_s_per_task']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, out: str, log: Callable[[str], None] = print) -> list[str]:
    """``quality.png`` (AA and BWT with error bars) and ``memory.png``; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots")
        return []
    from slao_kernels._files import write_atomic

    specs = list(summary["strategies"])
    paths = []

    def save(fig, name):
        path = os.path.join(out, name)
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.1 * len(specs) * 2), 3.8))
    for ax, key, title in ((axes[0], "aa", "average accuracy (AA)"), (axes[1], "bwt", "backward transfer (BWT)")):
        means = [summary["strategies"][s][key]["mean"] or 0.0 for s in specs]
        stds = [summary["strategies"][s][key]["std"] or 0.0 for s in specs]
        ax.bar(range(len(specs)), means, yerr=stds, capsize=3, color=["C0" if s == "slao" else "C7" for s in specs])
        ax.set_xticks(range(len(specs)), specs, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    save(fig, "quality.png")

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for s in specs:
        mem = summary["strategies"][s]["adapter_bytes"]
        ax.plot(range(1, len(mem) + 1), [b / 2**20 for b in mem], marker="o", label=s)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("adapter memory (MiB)")
    ax.set_xticks(range(1, len(summary["tasks"]) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("adapter memory over the stream", fontsize=10)
    save(fig, "memory.png")
    return paths


# --------------------------------------------------------------------------- side by side (slao demo)


def aa_standard_error(report: dict) -> float | None:
    """The binomial standard error of a finished run's AA: AA is the mean over T tasks of accuracies p_j
    measured on n_j test rows each, so its variance from the finite test sets alone is
    Σ_j p_j (1 − p_j) / n_j / T², with p_j the last row of the accuracy matrix. None for a report
    without ``test_rows`` (written before the key existed)."""
    rows, final = report.get("test_rows"), report["accuracy_matrix"][-1]
    if not rows:
        return None
    return math.sqrt(sum(p * (1.0 - p) / n for p, n in zip(final, rows, strict=True))) / len(final)


def run_seconds(report: dict) -> float:
    """A finished run's time: its zero-shot evaluation plus every task's begin, training, end and
    evaluation, as its record keeps them. Unlike ``timings.total_s`` (the time of the process that
    finished the run) this includes the tasks an interrupted process finished before a resume."""
    timings = report["timings"]
    return (timings.get("zero_shot_eval_s") or 0.0) + sum(
        t.get(k, 0.0) for t in timings["tasks"] for k in ("begin_s", "train_s", "end_s", "eval_s"))


def _mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    return [[statistics.fmean(cells) for cells in zip(*rows, strict=True)] for rows in zip(*matrices, strict=True)]


def side_by_side(runs: dict[str, list[dict]], out: str) -> dict:
    """The record ``slao demo`` writes as ``comparison.json``, from finished runs by strategy spec
    (:func:`collect_runs`; every spec over the same tasks and seeds).

    Per spec under ``strategies``: ``aa``, ``bwt``, ``fwt``, ``forgetting``, ``ap`` (means over the
    seeds; ``<metric>_std`` their standard deviation), ``accuracy_matrix`` and ``zero_shot`` (element-wise
    means over the seeds; each seed's own under ``runs``), ``adapter_bytes`` (after the last task) with
    ``adapter_bytes_per_task``, ``aa_standard_error`` (:func:`aa_standard_error`, the mean over the
    seeds; None where a report lacks ``test_rows``), ``test_rows``, ``seconds`` (wall time of its runs,
    summed over the seeds: zero-shot evaluation, training, evaluation; the model load is not in it) and
    ``run_dirs``. ``gain_aa_points``
    holds, for every other spec, the first spec's AA minus that spec's in points (100 × the difference of
    the means), and ``gain_aa_points_per_seed`` the same seed by seed.
    """
    if not runs:
        raise ValueError("side_by_side: no finished runs")
    tasks = next(iter(runs.values()))[0]["tasks"]
    strategies = {}
    for spec, reports in runs.items():
        entry = {}
        for key in ("aa", "bwt", "fwt", "forgetting", "ap"):
            spread = _spread([r[key] for r in reports])
            entry[key], entry[f"{key}_std"] = spread["mean"], spread["std"]
        entry.update({
            "seeds": [r["config"]["seed"] for r in reports],
            "accuracy_matrix": _mean_matrix([r["accuracy_matrix"] for r in reports]),
            "zero_shot": [statistics.fmean(a) for a in zip(*(r["zero_shot"] for r in reports), strict=True)],
            "adapter_bytes": reports[0]["adapter_bytes"][-1],
            "adapter_bytes_per_task": reports[0]["adapter_bytes"],
            "test_rows": reports[0].get("test_rows"),
            "aa_standard_error": _mean_or_none([aa_standard_error(r) for r in reports]),
            "seconds": sum(run_seconds(r) for r in reports),
            "run_dirs": [run_directory(out, spec, r["config"]["seed"]) for r in reports],
            "runs": [{"seed": r["config"]["seed"], "aa": r["aa"], "bwt": r["bwt"], "fwt": r["fwt"],
                      "forgetting": r["forgetting"], "accuracy_matrix": r["accuracy_matrix"],
                      "zero_shot": r["zero_shot"], "seconds": run_seconds(r)} for r in reports],
        })
        strategies[spec] = entry
    first, *others = list(strategies)
    gains, per_seed = {}, {}
    for other in others:
        gains[other] = 100.0 * (strategies[first]["aa"] - strategies[other]["aa"])
        theirs = {r["seed"]: r["aa"] for r in strategies[other]["runs"]}
        per_seed[other] = {str(r["seed"]): 100.0 * (r["aa"] - theirs[r["seed"]])
                           for r in strategies[first]["runs"] if r["seed"] in theirs}
    return {"tasks": tasks, "reference": first, "strategies": strategies, "gain_aa_points": gains,
            "gain_aa_points_per_seed": per_seed}


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def _mean_std(entry: dict, key: str, signed: bool = False) -> str:
    return _cell({"mean": entry[key], "std": entry[f"{key}_std"], "n": len(entry["seeds"])}, signed)


def format_side_by_side(record: dict) -> str:
    """The table of :func:`side_by_side`'s record (AA, BWT, FWT, forgetting, adapter memory and wall
    time per strategy), then the first strategy's gain over each other one in AA points."""
    seeds = next(iter(record["strategies"].values()))["seeds"]
    lines = [f"{' → '.join(record['tasks'])}; seed{'s' if len(seeds) > 1 else ''} "
             f"{','.join(map(str, seeds))}" + ("; mean ± standard deviation over the seeds" if len(seeds) > 1 else ""),
             "", "| strategy | AA | BWT | FWT | forgetting | adapter memory | wall time |",
             "|---|---|---|---|---|---|---|"]
    for spec, e in record["strategies"].items():
        lines.append(f"| {spec} | {_mean_std(e, 'aa')} | {_mean_std(e, 'bwt', True)} | {_mean_std(e, 'fwt', True)} | "
                     f"{_mean_std(e, 'forgetting')} | {e['adapter_bytes'] / 2**20:.2f} MiB | {e['seconds']:.0f} s |")
    lines.append("")
    for other, gain in record["gain_aa_points"].items():
        seeds_text = ", ".join(f"{g:+.1f}" for g in record["gain_aa_points_per_seed"][other].values())
        lines.append(f"{record['reference']} vs {other}: {gain:+.1f} AA points"
                     + (f" (per seed: {seeds_text})" if len(seeds) > 1 else ""))
    errors = {spec: e["aa_standard_error"] for spec, e in record["strategies"].items()}
    if all(v is not None for v in errors.values()):
        rows = next(iter(record["strategies"].values()))["test_rows"]
        lines.append(f"resolution: one run's AA rests on {sum(rows)} test rows "
                     f"({' + '.join(map(str, rows))}); its binomial standard error is "
                     + ", ".join(f"{100 * v:.1f} ({spec})" for spec, v in errors.items()) + " AA points")
    return "\n".join(lines) + "\n"
