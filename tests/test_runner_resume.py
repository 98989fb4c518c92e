"""run_stream's per-task commit: a run stopped at any step of its sequence resumes to exactly the
uninterrupted run's report, checkpoint and adapter, never training a task twice; a non-finite loss or
adapter stops the run with the last good state kept; Ctrl-C says which task it interrupted."""

import json
import os

import pytest
import torch
from conftest import interrupted_at_task, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from slao_kernels.continual import RunConfig, TrainConfig, generated_suite, run_stream, runner
from slao_kernels.continual.runner import RunInterrupted, TaskFailed
from slao_kernels.patching import LoRAConfig, lora_modules

QUIET = dict(progress=False, log=lambda s: None)
# the report entries that measure this process (wall times, where it ran), not the run's result
MEASURED = ("timings", "environment", "resumed_after_task", "plots", "adapter")


class Killed(BaseException):
    """Stands for SIGKILL: a BaseException, so no ``except Exception`` on the way out can act on it."""


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _model(tokenizer):
    torch.manual_seed(0)  # the same base weights in every "process"
    return tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2)


TASKS = generated_suite("large,small,last_big", train_size=16, test_size=8)
CONFIG = RunConfig(lora=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
                   train=TrainConfig(steps=3, batch_size=4, lr=1e-2), eval_batch_size=8,
                   strategy_options={"init": "random"})  # the init that draws random numbers


def _counting_training(monkeypatch) -> list[str]:
    """Record every task run_stream trains (through the real training loop)."""
    real, trained = runner.train_task, []

    def train(model, encoder, tasks, *args, **kwargs):
        trained.append("+".join(t.name for t in tasks))
        return real(model, encoder, tasks, *args, **kwargs)
    monkeypatch.setattr(runner, "train_task", train)
    return trained


def _result(out) -> dict:
    """What a run leaves in ``out``, minus what measures the process: report, checkpoint, adapter."""
    report = json.loads((out / "report.json").read_text())
    meta = json.loads((out / "checkpoint" / "slao.json").read_text())
    record = meta.pop("metadata")["run"]
    for key in [k for k in meta if "sha" in k or k == "tensor_file"]:
        meta.pop(key)  # checksums of a JSON that holds wall times; the tensors are compared themselves
    return {
        "report": {k: v for k, v in report.items() if k not in MEASURED},
        "record": {k: v for k, v in record.items() if k not in MEASURED},
        "checkpoint_meta": meta,
        "checkpoint": load_file(out / "checkpoint" / json.loads((out / "checkpoint" / "slao.json").read_text())
                                ["tensor_file"]),
        "adapter": {f: (out / "adapter" / f).read_bytes() for f in sorted(os.listdir(out / "adapter"))},
    }


def _assert_same_result(got: dict, want: dict) -> None:
    assert got["report"] == want["report"]
    assert got["record"] == want["record"]
    assert got["checkpoint_meta"] == want["checkpoint_meta"]
    assert sorted(got["checkpoint"]) == sorted(want["checkpoint"])
    for key, t in want["checkpoint"].items():
        assert torch.equal(got["checkpoint"][key], t), key  # bit for bit
    assert got["adapter"] == want["adapter"]  # byte for byte


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("whole")
    run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(out), **QUIET)
    return _result(out)


KILL_POINTS = [(stage, 2) for stage in ("trained", "checkpoint", "report")] + \
              [(stage, 3) for stage in ("trained", "checkpoint", "report", "plots", "adapter", "complete")]


@pytest.mark.parametrize("stage,task", KILL_POINTS)
def test_a_run_killed_at_any_step_resumes_to_the_uninterrupted_result(stage, task, tmp_path, tokenizer,
                                                                      uninterrupted, monkeypatch):
    trained = _counting_training(monkeypatch)

    def kill(name, index):
        if (name, index) == (stage, task):
            raise Killed
    monkeypatch.setattr(runner, "_stage", kill)
    with pytest.raises(Killed):
        run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path), **QUIET)
    monkeypatch.setattr(runner, "_stage", lambda name, index: None)
    report = run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path), resume=True, **QUIET)
    committed = task if stage != "trained" else task - 1  # the checkpoint is the commit
    assert report["resumed_after_task"] == committed
    names = [t.name for t in TASKS]
    # a committed task is never trained again; one killed before its commit is trained again in full
    assert trained == names[:task] + names[committed:]
    _assert_same_result(_result(tmp_path), uninterrupted)


def test_a_kill_between_checkpoint_and_report_does_not_train_the_task_again(tmp_path, tokenizer, monkeypatch):
    """The reported bug: the report lagging the checkpoint by one task made the resumed run train that
    task a second time. Killed inside the report write that follows task 2's checkpoint."""
    from slao_kernels import _files as io

    trained = _counting_training(monkeypatch)
    real, writes = io.write_json_atomic, []

    def write(path, payload):
        if os.path.basename(path) == "report.json":
            writes.append(len(payload["accuracy_matrix"]))
            if writes[-1] == 2:
                raise Killed
        return real(path, payload)
    monkeypatch.setattr(io, "write_json_atomic", write)
    with pytest.raises(Killed):
        run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path), **QUIET)
    monkeypatch.setattr(io, "write_json_atomic", real)
    report = run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path), resume=True, **QUIET)
    assert trained == [t.name for t in TASKS]
    assert len(report["accuracy_matrix"]) == 3
    assert report["timings"]["tasks"][-1]["lambda"] == pytest.approx(0.57735026918962, rel=1e-12)  # λ(3), not λ(4)


def _poison_after_training(monkeypatch, task: int, how: str) -> None:
    """Make training of task ``task`` (1-based) diverge: a NaN loss, or a NaN written into an adapter."""
    from slao_kernels.continual import train

    real_train, real_loss, calls = runner.train_task, train.answer_loss, []

    def train_task(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == task and how == "loss":
            monkeypatch.setattr(train, "answer_loss", lambda *a: real_loss(*a) * float("nan"))
        result = real_train(model, *args, **kwargs)
        if len(calls) == task and how == "adapter":
            with torch.no_grad():
                next(iter(lora_modules(model).values())).lora_B[0, 0] = float("inf")
        return result
    monkeypatch.setattr(runner, "train_task", train_task)


@pytest.mark.parametrize("how", ["loss", "adapter"])
def test_a_non_finite_task_stops_the_run_and_resume_retries_it(how, tmp_path, tokenizer, uninterrupted,
                                                               monkeypatch):
    from slao_kernels.continual import train

    real_loss = train.answer_loss
    _poison_after_training(monkeypatch, task=2, how=how)
    model = _model(tokenizer)
    with pytest.raises(TaskFailed, match=r"task 2 of 3 \(small\) failed.*NaN|task 2 of 3 \(small\) failed.*nan") \
            as failure:
        run_stream(model, tokenizer, TASKS, CONFIG, out=str(tmp_path), **QUIET)
    assert (failure.value.task, failure.value.task_name, failure.value.total) == (2, "small", 3)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["failed_task"]["index"] == 2
    assert len(report["accuracy_matrix"]) == 1
    # the checkpoint holds task 1, and the model was put back to task 1's merged adapter (abort_task)
    saved = load_file(tmp_path / "checkpoint" / json.loads((tmp_path / "checkpoint" / "slao.json").read_text())
                      ["tensor_file"])
    for n, m in lora_modules(model).items():
        assert torch.equal(m.lora_A, saved[f"{n}.lora_A"]) and torch.equal(m.lora_B, saved[f"{n}.lora_B"]), n
    assert not (tmp_path / "adapter").exists()
    monkeypatch.setattr(runner, "train_task", train.train_task)
    monkeypatch.setattr(train, "answer_loss", real_loss)
    resumed = run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path), resume=True, **QUIET)
    assert resumed["resumed_after_task"] == 1 and "failed_task" not in resumed
    _assert_same_result(_result(tmp_path), uninterrupted)


def test_ctrl_c_names_the_task_it_interrupted(tmp_path, tokenizer, monkeypatch):
    with interrupted_at_task(2) as stop:
        run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path), **QUIET)
    assert isinstance(stop.value, RunInterrupted) and (stop.value.task, stop.value.total) == (2, 3)
    assert str(stop.value) == "interrupted during task 2 of 3"
    monkeypatch.setattr(runner, "_eval_all", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(RunInterrupted, match="interrupted during task 0 of 3"):  # the zero-shot evaluation
        run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path / "zero"), **QUIET)


def _killed_at(monkeypatch, stage: str, task: int, model, tokenizer, out) -> None:
    """Run the stream on ``model`` into ``out`` and 'kill' it at ``(stage, task)`` of its sequence."""
    def kill(name, index):
        if (name, index) == (stage, task):
            raise Killed
    monkeypatch.setattr(runner, "_stage", kill)
    with pytest.raises(Killed):
        run_stream(model, tokenizer, TASKS, CONFIG, out=str(out), **QUIET)
    monkeypatch.setattr(runner, "_stage", lambda name, index: None)


def test_resume_refuses_a_report_without_its_checkpoint(tmp_path, tokenizer, monkeypatch):
    _killed_at(monkeypatch, "report", 1, _model(tokenizer), tokenizer, tmp_path)
    for f in os.listdir(tmp_path / "checkpoint"):
        os.unlink(tmp_path / "checkpoint" / f)
    os.rmdir(tmp_path / "checkpoint")
    model = _model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lists 1 finished task\(s\) but .* holds no checkpoint"):
        run_stream(model, tokenizer, TASKS, CONFIG, out=str(tmp_path), resume=True, **QUIET)
    assert lora_modules(model) == {}  # refused before patching
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(v, after[k]) for k, v in before.items())


def test_resuming_on_the_model_a_killed_run_trained_is_refused(tmp_path, tokenizer, monkeypatch):
    """The reported bug: killed after task 1's training (before its commit) and resumed on the same model
    object (a notebook retry), the run kept the trained adapters in the model: the zero-shot accuracies and
    task 1 were measured and trained on from them. Now refused, the run directory untouched; a fresh model
    resumes it to the uninterrupted result."""
    model = _model(tokenizer)
    _killed_at(monkeypatch, "trained", 1, model, tokenizer, tmp_path)
    before = (tmp_path / "report.json").read_bytes()
    with pytest.raises(ValueError, match="already carries trained adapters"):
        run_stream(model, tokenizer, TASKS, CONFIG, out=str(tmp_path), resume=True, **QUIET)
    assert (tmp_path / "report.json").read_bytes() == before
    report = run_stream(_model(tokenizer), tokenizer, TASKS, CONFIG, out=str(tmp_path), resume=True, **QUIET)
    assert report["status"] == "complete"


def test_a_model_patched_but_not_trained_is_taken(tokenizer):
    """Adapters as patch_llama makes them (B = 0: the model computes the base's outputs) are not refused."""
    from slao_kernels import patch_llama

    model = _model(tokenizer)
    torch.manual_seed(CONFIG.seed)
    patch_llama(model, CONFIG.lora)
    report = run_stream(model, tokenizer, TASKS[:1], CONFIG, **QUIET)
    assert report["status"] == "complete"


@pytest.mark.parametrize("field,value", [("max_test", 0), ("max_test", -1), ("eval_batch_size", 0),
                                         ("max_prompt_tokens", 0), ("seed", 1.5), ("strategy", "nope")])
def test_run_config_refuses_bad_values_naming_the_field(field, value):
    """max_test=-1 used to evaluate every test row but the last, 0 to divide by zero after the model was patched."""
    with pytest.raises(ValueError, match=field if field != "strategy" else "unknown strategy 'nope'"):
        RunConfig(**{field: value})


def test_a_bad_strategy_option_is_refused_before_the_model_is_patched(tokenizer):
    model = _model(tokenizer)
    config = RunConfig(lora=CONFIG.lora, train=CONFIG.train, strategy_options={"merge": "C"})
    with pytest.raises(ValueError, match="merge"):
        run_stream(model, tokenizer, TASKS, config, **QUIET)
    assert lora_modules(model) == {}


def test_a_resume_whose_strategy_settings_resolve_otherwise_is_refused(tmp_path, tokenizer, monkeypatch):
    """The reported gap: the resume check compared the options given, not what the strategy makes of
    them, so a library whose defaults changed between the kill and the resume (here: SLAO's λ schedule)
    continued the run under other settings. Now the resolved settings are compared too."""
    from slao_kernels.continual.strategies import STRATEGIES

    _killed_at(monkeypatch, "report", 1, _model(tokenizer), tokenizer, tmp_path)
    config_class = STRATEGIES["slao"].config
    real = config_class.report
    monkeypatch.setattr(config_class, "report", lambda self: {**real(self), "lam": "inv"})
    model = _model(tokenizer)
    with pytest.raises(ValueError, match="strategy settings"):
        run_stream(model, tokenizer, TASKS, CONFIG, out=str(tmp_path), resume=True, **QUIET)
    assert lora_modules(model) == {}  # refused before the model was touched
