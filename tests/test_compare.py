"""The quality benchmark's harness (slao_kernels.continual.compare) on a tiny Llama."""

import copy
import json
import os
import statistics

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from slao_kernels.continual import RunConfig, TrainConfig, generated_suite, run_stream
from slao_kernels.continual.compare import (
    aa_standard_error,
    collect_runs,
    format_summary,
    parse_spec,
    run_comparison,
    run_directory,
    run_seconds,
    summarize,
)
from slao_kernels.patching import LoRAConfig


def test_specs_parse_and_are_checked():
    assert parse_spec("slao") == ("slao", {})
    assert parse_spec("slice:c=0.5,scope=module") == ("slice", {"c": 0.5, "scope": "module"})
    assert parse_spec("olora:weight=1") == ("olora", {"weight": 1})
    with pytest.raises(ValueError, match="no option"):
        parse_spec("slao:lr=1")
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_spec("ewc")
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("slao:random")


def test_aa_standard_error_is_the_binomial_error_of_the_last_row():
    """AA = mean of T accuracies on n_j rows each: its standard error is √(Σ p_j(1 − p_j)/n_j) / T.
    Hand values: one task at 0.5 on 100 rows, 0.05; 0.5 on 40 rows and 1.0 on 10, √(0.25/40)/2."""
    one = {"accuracy_matrix": [[0.9], [0.5]], "test_rows": [100]}
    two = {"accuracy_matrix": [[0.1, 0.2], [0.5, 1.0]], "test_rows": [40, 10]}
    assert aa_standard_error(one) == pytest.approx(0.05)
    assert aa_standard_error(two) == pytest.approx(0.0395284708)
    assert aa_standard_error({"accuracy_matrix": [[0.5]]}) is None  # a report from before test_rows
    with pytest.raises(ValueError):
        aa_standard_error({"accuracy_matrix": [[0.5, 0.5]], "test_rows": [40]})  # one count per task


def test_a_resumed_run_s_seconds_include_the_tasks_of_the_process_before():
    """The reported bug: a run's time was its report's total_s, the time of the process that finished it,
    so after a resume the demo's wall-time column left out every task finished before the interrupt."""
    resumed = {"timings": {"zero_shot_eval_s": 4.0, "total_s": 12.0, "tasks": [
        {"task": "a", "begin_s": 0.5, "train_s": 30.0, "end_s": 0.25, "eval_s": 5.0},  # the first process
        {"task": "b", "begin_s": 0.5, "train_s": 8.0, "end_s": 0.25, "eval_s": 3.0}]}}  # after the resume
    assert run_seconds(resumed) == pytest.approx(4.0 + 35.75 + 11.75)


def test_comparison_runs_summarizes_and_skips_finished_runs(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = generated_suite("large,small", train_size=16, test_size=8)
    config = RunConfig(lora=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
                       train=TrainConfig(steps=2, batch_size=4, lr=1e-2), eval_batch_size=8)
    specs, seeds = ["slao", "lora_ga:grad_batches=1", "inclora"], [0, 1]
    lines = []
    summary = run_comparison(model, tokenizer, tasks, specs, seeds, config, str(tmp_path), progress=False,
                             log=lines.append)
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())  # runs use copies
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert list(on_disk["strategies"]) == specs and on_disk["seeds"] == seeds
    for spec in specs:
        s = on_disk["strategies"][spec]
        aas = [r["aa"] for r in s["runs"]]
        assert len(aas) == 2 and [r["seed"] for r in s["runs"]] == seeds
        assert s["aa"]["mean"] == pytest.approx(statistics.fmean(aas))
        assert s["aa"]["std"] == pytest.approx(statistics.stdev(aas))
    inc = on_disk["strategies"]["inclora"]
    assert inc["adapter_bytes_last"] == 2 * inc["adapter_bytes_first"]
    table = (tmp_path / "results.md").read_text()
    assert table == format_summary(summary) and "| lora_ga:grad_batches=1 |" in table
    assert sorted(os.path.basename(p) for p in summary["plots"]) == ["memory.png", "quality.png"]
    # the zero-shot accuracies: measured by the first run only, and what a run measures on its own
    first, *others = [json.loads(open(os.path.join(run_directory(str(tmp_path), spec, seed), "report.json")).read())
                      for spec in specs for seed in seeds]
    assert first["timings"]["zero_shot_eval_s"] > 0 and all(r["timings"]["zero_shot_eval_s"] == 0 for r in others)
    alone = run_stream(copy.deepcopy(model), tokenizer, tasks, RunConfig(
        lora=config.lora, train=TrainConfig(steps=2, batch_size=4, lr=1e-2, seed=1), strategy="inclora", seed=1,
        eval_batch_size=8), progress=False, log=lambda s: None)
    assert all(r["zero_shot"] == alone["zero_shot"] for r in (first, *others))
    # repeating the command re-uses finished runs
    lines.clear()
    again = run_comparison(model, tokenizer, tasks, specs, seeds, config, str(tmp_path), progress=False,
                           log=lines.append)
    assert sum("done earlier" in line for line in lines) == 6
    assert again["strategies"]["slao"]["aa"] == summary["strategies"]["slao"]["aa"]
    # collecting finished runs gives the same summary; an unfinished run is left out
    collected = collect_runs(str(tmp_path), order=["inclora"])
    assert list(collected) == ["inclora", "lora_ga:grad_batches=1", "slao"]
    assert summarize(collected, summary["tasks"], seeds)["strategies"]["slao"] == summary["strategies"]["slao"]
    report_path = tmp_path / "runs" / "inclora" / "seed1" / "report.json"
    report_path.write_text(json.dumps({**json.loads(report_path.read_text()), "status": "running"}))
    assert [r["config"]["seed"] for r in collect_runs(str(tmp_path))["inclora"]] == [0]
    assert collect_runs(str(tmp_path / "nothing")) == {}


def test_a_finished_run_of_other_tasks_or_settings_is_refused_before_anything_runs(tmp_path):
    """The reported bug: a finished run in the output directory was reused whatever its tasks or settings
    (a 1-task slao run summarized beside a 2-task seqlora run). Now refused, naming what differs, before any
    run starts; the same command again reuses it."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2)
    config = RunConfig(lora=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
                       train=TrainConfig(steps=1, batch_size=4, lr=1e-2), eval_batch_size=8)
    run_comparison(model, tokenizer, generated_suite("large", train_size=8, test_size=4), ["slao"], [0], config,
                   str(tmp_path), progress=False, log=lambda line: None)
    tasks = generated_suite("large,small", train_size=8, test_size=4)
    with pytest.raises(ValueError, match=r"finished run over \['large'\], not \['large', 'small'\]"):
        run_comparison(model, tokenizer, tasks, ["seqlora", "slao"], [0], config, str(tmp_path),
                       progress=False, log=lambda line: None)
    assert not os.path.exists(run_directory(str(tmp_path), "seqlora", 0))  # checked before seqlora ran
    longer = RunConfig(lora=config.lora, train=TrainConfig(steps=2, batch_size=4, lr=1e-2), eval_batch_size=8)
    with pytest.raises(ValueError, match=r"other settings \(train\)"):
        run_comparison(model, tokenizer, tasks[:1], ["slao"], [0], longer, str(tmp_path),
                       progress=False, log=lambda line: None)
    lines = []
    run_comparison(model, tokenizer, tasks[:1], ["slao"], [0], config, str(tmp_path), progress=False,
                   log=lines.append)
    assert any("done earlier" in line for line in lines)
