"""Run a strategy over a task stream: zero-shot evaluation, then per task train →
consolidate → evaluate every task, with the metrics and a report on disk.

Output directory (every file is written atomically, so a crash leaves the
last consistent state, never a torn file)::

    report.json                 tasks, test_rows (rows evaluated per task), accuracy_matrix, zero_shot,
                                aa, bwt, fwt, forgetting, ap, fp, config, timings, losses, adapter_bytes,
                                status ("running", "failed" with failed_task, or "complete") — rewritten
                                after every task
    checkpoint/                 the strategy's state after the last finished task (SLAO: SLAO.load),
                                with the run's record of every finished task: the commit point
    adapter/                    the final adapter in PEFT format (written last; only for strategies whose
                                result is one adapter over the original base: slao, seqlora, multitask)
    accuracy_matrix.png         heatmap of R (with matplotlib installed)
    accuracy_over_time.png      accuracy of every task after each training stage
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from slao_kernels._files import is_int, is_real
from slao_kernels.continual.evaluate import evaluate_task
from slao_kernels.continual.metrics import cl_metrics
from slao_kernels.continual.prompts import PromptEncoder
from slao_kernels.continual.strategies import make_strategy, registered_strategy
from slao_kernels.continual.tasks import Task
from slao_kernels.continual.train import TrainConfig, hash_name, train_task
from slao_kernels.patching import LLAMA_PROJECTIONS, LoRAConfig, lora_modules, patch_llama


class TaskFailed(RuntimeError):
    """A task of the stream could not be completed (a non-finite loss or adapter).

    The run directory keeps the last good checkpoint and a report whose
    ``status`` is ``"failed"`` and ``failed_task`` names this task; ``resume=True``
    retries it. Attributes: ``task`` (1-based), ``task_name``, ``total`` (tasks in the stream).
    """

    def __init__(self, message: str, task: int, task_name: str, total: int):
        super().__init__(message)
        self.task, self.task_name, self.total = task, task_name, total


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run. ``task`` (1-based; 0 during the zero-shot
    evaluation) is the task that was in progress, ``total`` the tasks in the
    stream; the run directory holds the last finished task and resumes from it."""

    def __init__(self, task: int, total: int):
        super().__init__(f"interrupted during task {task} of {total}")
        self.task, self.total = task, total


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on besides the model and the tasks.

    Attributes:
        lora: the adapter (default: rank 8 on all seven projections, which
            learns the built-in tasks within tens of steps on a CPU).
        train: how each task is trained.
        strategy: a name in :data:`~slao_kernels.continual.strategies.STRATEGIES`.
        strategy_options: keyword options of the strategy (SLAO: lam, init, merge).
        eval_batch_size: prompts per scoring batch.
        max_test: evaluate on at most this many test rows per task (None: all).
        max_prompt_tokens: prompt length cap (the input text is truncated).
        seed: seeds the adapter initialization (training has its own seed).
    """

    lora: LoRAConfig = LoRAConfig(rank=8, alpha=16.0, targets=LLAMA_PROJECTIONS)
    train: TrainConfig = TrainConfig()
    strategy: str = "slao"
    strategy_options: dict = field(default_factory=dict)
    eval_batch_size: int = 16
    max_test: int | None = None
    max_prompt_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        for name in ("eval_batch_size", "max_prompt_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"RunConfig.{name} must be an int >= 1, got {value!r}")
        if self.max_test is not None and (not is_int(self.max_test) or self.max_test < 1):
            raise ValueError(f"RunConfig.max_test must be None or an int >= 1, got {self.max_test!r}")
        if not is_int(self.seed):
            raise ValueError(f"RunConfig.seed must be an int, got {self.seed!r}")
        if not isinstance(self.lora, LoRAConfig) or not isinstance(self.train, TrainConfig):
            raise TypeError(f"RunConfig.lora must be a LoRAConfig and .train a TrainConfig, got "
                            f"{type(self.lora).__name__} and {type(self.train).__name__}")
        registered_strategy(self.strategy)  # an unknown name raises here, naming the available ones

    def to_dict(self) -> dict:
        """A JSON-safe dict (the report's ``config``); ``lora`` as :meth:`LoRAConfig.to_dict` writes it."""
        return {**asdict(self), "lora": self.lora.to_dict()}


def evaluated_rows(tasks, config: RunConfig) -> list[int]:
    """The number of test rows each task is evaluated on (``max_test`` caps every task's test set)."""
    return [len(t.test) if config.max_test is None else min(len(t.test), config.max_test) for t in tasks]


def _eval_all(model, encoder, tasks, config: RunConfig, desc: str, progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    total = sum(evaluated_rows(tasks, config))
    with tqdm(total=total, desc=desc, unit="row", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        return [evaluate_task(model, encoder, t, config.eval_batch_size, config.max_test, bar.update)["accuracy"]
                for t in tasks]


# report["config"] entries that may differ between a run and its resumption
RUN_SPECIFIC = ("model_load_s",)
# the report entries a checkpoint records, task by task: what a resumed run rebuilds its report from
RECORDED = ("tasks", "zero_shot", "accuracy_matrix", "losses", "adapter_bytes", "timings")


def _stage(name: str, task: int) -> None:
    """Called as each step of a task's sequence completes (``"trained"``, ``"checkpoint"``, ``"report"``;
    at the end ``"plots"``, ``"adapter"``, ``"complete"``). Does nothing: the crash tests replace it to
    stop a run at exactly that point."""


def comparable_settings(config: dict) -> dict:
    """A report's ``config`` without what may differ between a run and its resumption (or reuse)."""
    # strategy_config follows from the strategy and its options (compared): left out, so the check
    # can run before the strategy exists
    return {k: v for k, v in config.items() if k not in RUN_SPECIFIC and k != "strategy_config"}


def _resume_state(out: str, names: list[str], config: dict) -> dict | None:
    """What an interrupted run in ``out`` has committed: its checkpoint's record of the finished tasks
    (None when no task finished), checked against this run's tasks and settings before anything is loaded.

    The checkpoint is the commit point of every task; report.json is derived from it and may lag by one
    task (a kill between the two writes), never lead. Anything else is refused."""
    from slao_kernels.continual.checkpoint import load_checkpoint

    report_path, checkpoint = os.path.join(out, "report.json"), os.path.join(out, "checkpoint")
    report = None
    if os.path.isfile(report_path):
        with open(report_path) as f:
            report = json.load(f)
        if not isinstance(report, dict) or report.get("tasks") != names:
            raise ValueError(f"cannot resume: {report_path} is a run over "
                             f"{report.get('tasks') if isinstance(report, dict) else report!r}, not {names}")
    if not os.path.isfile(os.path.join(checkpoint, "slao.json")):
        if report is not None and report.get("accuracy_matrix"):
            raise ValueError(f"cannot resume: {report_path} lists {len(report['accuracy_matrix'])} finished "
                             f"task(s) but {checkpoint} holds no checkpoint; start again with --overwrite")
        if report is None:
            raise FileNotFoundError(f"nothing to resume: {report_path} does not exist")
        return None
    meta, _ = load_checkpoint(checkpoint)
    record = (meta.get("metadata") or {}).get("run")
    if not isinstance(record, dict) or any(k not in record for k in RECORDED + ("config",)):
        raise ValueError(f"cannot resume: the checkpoint in {checkpoint} has no run record (written by an "
                         "older version, or not by run_stream); start again with --overwrite")
    done = len(record["accuracy_matrix"])
    if record["tasks"] != names or not 1 <= done <= len(names):
        raise ValueError(f"cannot resume: the checkpoint in {checkpoint} is of a run over {record['tasks']} "
                         f"with {done} finished, not of {names}")
    saved, ours = comparable_settings(record["config"]), comparable_settings(config)
    if saved != ours:
        differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        raise ValueError(f"cannot resume: the run in {out} has other settings ({', '.join(differ)})")
    return record


def _check_fresh_adapters(model: nn.Module) -> None:
    """A model that already carries adapters is taken only if they are untrained (every lora_B zero, as
    patch_llama makes them): one a run trained on, kept in memory after an interrupt or a finished run,
    would start this run from its state, and its zero-shot accuracies would not be the base model's."""
    trained = [path for path, m in lora_modules(model).items() if bool(m.lora_B.detach().ne(0).any())]
    if trained:
        raise ValueError(f"run_stream: the model already carries trained adapters ({len(trained)} with "
                         f"lora_B != 0, first {trained[0]!r}); pass the base model (a fresh load, or a copy "
                         "made before any run), not one an earlier run trained")


def run_stream(model: nn.Module, tokenizer, tasks: Sequence[Task], config: RunConfig = RunConfig(),
               out: str | None = None, progress: bool = True, log: Callable[[str], None] = print,
               extra_report: dict | None = None, resume: bool = False,
               base_model_name_or_path: str | None = None, zero_shot: Sequence[float] | None = None) -> dict:
    """Train ``model`` on ``tasks`` in order with ``config.strategy``; returns the report.

    The model is patched with ``config.lora`` (in place) unless it already
    carries those adapters untrained (every ``lora_B`` zero); trained ones are
    refused. With ``out``, the report, checkpoint, plots and the final adapter
    (``out/adapter``, PEFT format, naming ``base_model_name_or_path``) are written
    there (see the module docstring). ``extra_report`` is merged into
    the report's ``config`` (model and data sources).

    Each task ends in one commit: the checkpoint, which records the task's report
    entries with the strategy's state. ``report.json`` is rewritten from it after.

    ``resume=True`` continues an interrupted run in ``out`` (same tasks, same
    settings, checked before the model is touched) after the last task its
    checkpoint holds, rebuilding the report from the checkpoint's record. Each
    task starts from a seed of its own, so a resumed run reproduces the
    uninterrupted one bit for bit (report, checkpoint, adapter) and never
    trains a task twice.

    ``zero_shot``: the accuracy of the untrained model on each task, when it was
    already measured on the same model, tasks and evaluation settings; None measures
    it. Before the first task every strategy's model computes exactly the base's
    outputs (B = 0 adds an exact zero), so a comparison measures it once for all its
    runs (:func:`~slao_kernels.continual.compare.run_comparison`); the report's
    ``timings.zero_shot_eval_s`` is then 0.

    Raises:
        TaskFailed: a task's loss or adapter became non-finite. The report says
            which (``status: "failed"``, ``failed_task``); the checkpoint keeps the
            last finished task, which ``resume=True`` continues from. With the SLAO
            strategy the model is back to that task's merged adapter.
        RunInterrupted: Ctrl-C; the run directory holds the last finished task.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_stream: no tasks")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"run_stream: task names must be distinct, got {names}")
    for t in tasks:
        if not t.train:
            raise ValueError(f"run_stream: task {t.name!r} has no training rows")
    if resume and out is None:
        raise ValueError("resume=True needs the output directory of the run to continue")
    if zero_shot is not None:
        zero_shot = list(zero_shot)
        if len(zero_shot) != len(tasks) or not all(is_real(a) and 0.0 <= a <= 1.0 for a in zero_shot):
            raise ValueError(f"run_stream: zero_shot must be one accuracy in [0, 1] per task ({len(tasks)}), "
                             f"got {zero_shot!r}")
    current = 0  # the task in progress (1-based; 0 before the first), for RunInterrupted
    try:
        run_config = {**config.to_dict(), **(extra_report or {})}
        # everything a resumption depends on is checked before the model changes
        record = _resume_state(out, names, run_config) if resume else None
        # the options resolved once, before the model is touched, and the strategy built from them below
        options = registered_strategy(config.strategy).config.from_options(dict(config.strategy_options),
                                                                           where=f"strategy {config.strategy!r}")
        if record is not None:  # the settings the strategy resolves its options to, defaults included
            saved, ours = record["config"].get("strategy_config"), json.loads(json.dumps(options.report()))
            if saved != ours:
                raise ValueError(f"cannot resume: the run in {out} was made with strategy settings {saved}, "
                                 f"this version makes {ours} of the same options; start again with --overwrite")
        _check_fresh_adapters(model)
        torch.manual_seed(config.seed)
        patch_llama(model, config.lora)
        strategy = make_strategy(config.strategy, model, options)
        encoder = PromptEncoder(tokenizer, config.max_prompt_tokens)
        strategy.attach(encoder, config.train, tasks)
        report = {
            "tasks": names, "test_rows": evaluated_rows(tasks, config), "status": "running", "accuracy_matrix": [],
            "zero_shot": None,
            "aa": None, "bwt": None, "fwt": None, "forgetting": None, "ap": None, "fp": None,
            "config": {**run_config, "strategy_config": strategy.config()},
            "timings": {"zero_shot_eval_s": None, "tasks": []}, "losses": [], "adapter_bytes": [],
            "environment": {"torch": torch.__version__, "device": str(next(model.parameters()).device),
                            "cpu_threads": torch.get_num_threads(), "machine": platform.machine()},
        }

        def save_report() -> None:
            if out is not None:
                from slao_kernels._files import write_json_atomic

                write_json_atomic(os.path.join(out, "report.json"), report)

        start = time.perf_counter()
        done = 0
        if resume:
            if record is not None:
                strategy.load(os.path.join(out, "checkpoint"))
                report.update({k: record[k] for k in RECORDED})
                done = len(record["accuracy_matrix"])
            report["resumed_after_task"] = done
            log(f"resuming {out}: {done} of {len(tasks)} tasks done")
        if report["zero_shot"] is None and zero_shot is not None:
            report["zero_shot"], report["timings"]["zero_shot_eval_s"] = [float(a) for a in zero_shot], 0.0
            save_report()
        if report["zero_shot"] is None:
            t0 = time.perf_counter()
            report["zero_shot"] = _eval_all(model, encoder, tasks, config, "zero-shot eval", progress)
            report["timings"]["zero_shot_eval_s"] = time.perf_counter() - t0
            log("zero-shot accuracy: "
                + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, report["zero_shot"], strict=True)))
            save_report()
        for i, task in enumerate(tasks):
            if i < done:
                continue
            current = i + 1
            torch.manual_seed(hash_name(f"{config.seed}:task {i}"))  # per task: a resumed run draws the same numbers
            t0 = time.perf_counter()
            try:
                strategy.begin_task(task)  # a gradient init can go non-finite already here
                t1 = time.perf_counter()
                trained = train_task(model, encoder, strategy.training_tasks(task, tasks[:i + 1]),
                                     strategy.parameters(), config.train, extra_loss=strategy.extra_loss,
                                     progress=progress, description=f"task {i + 1}/{len(tasks)} {task.name}")
                _check_finite(strategy, "after training")
                t2 = time.perf_counter()
                info = strategy.end_task(task)
                _check_finite(strategy, "after the strategy's end of task")
            except FloatingPointError as exc:
                undone = strategy.abort_task()
                report["status"], report["failed_task"] = "failed", {"index": i + 1, "name": task.name,
                                                                     "reason": str(exc)}
                save_report()
                raise TaskFailed(f"task {i + 1} of {len(tasks)} ({task.name}) failed: {exc}; "
                                 + ("the model holds the adapter of the last finished task" if undone else
                                    "the model's adapter is left as training made it")
                                 + (f"; {out} keeps the last finished task's checkpoint" if out else ""),
                                 i + 1, task.name, len(tasks)) from exc
            t3 = time.perf_counter()
            row = _eval_all(model, encoder, tasks, config, f"eval after {task.name}", progress)
            t4 = time.perf_counter()
            report["accuracy_matrix"].append(row)
            report["losses"].append(trained["losses"])
            report["adapter_bytes"].append(strategy.state_bytes())
            report["timings"]["tasks"].append({"task": task.name, "begin_s": t1 - t0, "train_s": t2 - t1,
                                               "end_s": t3 - t2, "eval_s": t4 - t3, "steps": trained["steps"],
                                               **info})
            report.pop("failed_task", None)
            report["status"] = "running"
            _stage("trained", i + 1)
            if out is not None:  # the commit: the strategy's state and the report entries, in one file
                record = {**{k: report[k] for k in RECORDED}, "config": report["config"]}
                strategy.save(os.path.join(out, "checkpoint"), metadata={"run": record})
            _stage("checkpoint", i + 1)
            save_report()
            _stage("report", i + 1)
            log(f"task {i + 1}/{len(tasks)} {task.name}: loss {trained['losses'][0]:.3f} → "
                f"{trained['losses'][-1]:.3f} in {t2 - t1:.1f} s; accuracy "
                + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, row, strict=True)))
        current = len(tasks)
        report.update(cl_metrics(report["accuracy_matrix"], report["zero_shot"]))
        report["timings"]["total_s"] = time.perf_counter() - start  # of this process: after a resume, the rest
        if out is not None:
            from slao_kernels.continual.report import plot_report
            from slao_kernels.peft_format import save_peft_adapter

            report["plots"] = plot_report(report, out, log=log)
            _stage("plots", len(tasks))
            if strategy.single_adapter:
                save_peft_adapter(model, os.path.join(out, "adapter"),
                                  base_model_name_or_path=base_model_name_or_path)
                report["adapter"] = os.path.join(out, "adapter")
            else:
                log(f"no PEFT adapter written: {config.strategy}'s result is not one adapter over the "
                    "original base weights (the checkpoint holds it)")
            _stage("adapter", len(tasks))
        report["status"] = "complete"
        save_report()
        _stage("complete", len(tasks))
        return report
    except KeyboardInterrupt:
        raise RunInterrupted(current, len(tasks)) from None


def _check_finite(strategy, when: str) -> None:
    """Raise ``FloatingPointError`` naming the adapter tensors that are not finite."""
    bad = [f"{n}.{f}" for n, m in strategy.modules.items() for f in ("lora_A", "lora_B", "weight")
           if not torch.isfinite(getattr(m, f)).all()]
    if bad:
        raise FloatingPointError(f"{when}, {bad[:3]}{' and more' if len(bad) > 3 else ''} hold NaN or inf")
