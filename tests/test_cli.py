"""The `slao` command end to end on a tiny Llama saved to disk (model + tokenizer, no hub)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from slao_kernels.cli import main

TINY_RUN = ["--order", "large,small", "--train-size", "16", "--test-size", "8", "--steps", "3", "--batch-size", "4",
            "--rank", "4", "--targets", "q_proj,v_proj", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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
    assert message in capsys.readouterr().err
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
    from slao_kernels import bench

    rows = bench.compare_task_switch_ops("cpu", rounds=2, shape=(6, 4, 64))
    assert [r["op"].split()[0] for r in rows] == ["scaled_merge_", "orthonormalize_rows"]
    assert set(rows[0]["ms"]) == {"slao", "slao_checked", "foreach_lerp", "copy"}
    assert set(rows[1]["ms"]) == {"slao", "slao_inplace", "linalg_qr", "copy"}
    assert all(v > 0 for r in rows for v in list(r["ms"].values()) + list(r["ratios"].values()))
    assert "linalg_qr/slao_inplace" in bench.format_task_switch_table(rows)
