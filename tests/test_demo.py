"""`slao demo` end to end on a tiny Llama saved to disk: the table, comparison.json and the figure
exist and agree with each other and with every strategy's own run."""

import contextlib
import io
import json
import os

import pytest

from slao_kernels.cli import main

TINY_DEMO = ["--order", "large,small", "--train-size", "16", "--test-size", "8", "--steps", "3", "--batch-size", "4",
             "--rank", "4", "--targets", "q_proj,v_proj", "--quiet"]
REQUIRED = ("aa", "bwt", "fwt", "forgetting", "accuracy_matrix", "adapter_bytes", "seconds")


@pytest.fixture(scope="module")
def demo(model_dir, tmp_path_factory):
    """One demo over two seeds, its printed output and its comparison.json."""
    out = str(tmp_path_factory.mktemp("demo") / "out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["demo", "--model", model_dir, "--out", out, "--seeds", "0,1", *TINY_DEMO])
    assert status == 0
    with open(os.path.join(out, "comparison.json")) as f:
        record = json.load(f)
    return out, printed.getvalue(), record


def test_demo_writes_the_comparison_the_figure_and_each_strategy_run(demo):
    out, _, record = demo
    assert list(record["strategies"]) == ["slao", "seqlora"] and record["tasks"] == ["large", "small"]
    assert record["seeds"] == [0, 1] and record["reference"] == "slao"
    assert "strategy" not in record["config"] and "seed" not in record["config"]["train"]  # shared settings only
    assert record["config"]["train"]["steps"] == 3 and record["config"]["lora"]["rank"] == 4
    for spec, entry in record["strategies"].items():
        assert all(entry.get(key) is not None for key in REQUIRED), (spec, entry)
        assert len(entry["accuracy_matrix"]) == 2 and all(len(row) == 2 for row in entry["accuracy_matrix"])
        assert entry["adapter_bytes"] > 0 and entry["seconds"] > 0
        assert len(entry["run_dirs"]) == 2
        for run_dir, run in zip(entry["run_dirs"], entry["runs"], strict=True):
            with open(os.path.join(run_dir, "report.json")) as f:
                report = json.load(f)
            assert report["status"] == "complete" and report["config"]["strategy"] == spec
            assert report["config"]["seed"] == run["seed"] and report["accuracy_matrix"] == run["accuracy_matrix"]
            assert report["aa"] == pytest.approx(run["aa"])
            assert os.path.dirname(os.path.dirname(run_dir)) == os.path.join(out, "runs")
        # the entry's numbers are the means over its seeds
        assert entry["aa"] == pytest.approx(sum(r["aa"] for r in entry["runs"]) / 2)
        assert entry["bwt"] == pytest.approx(sum(r["bwt"] for r in entry["runs"]) / 2)
        assert entry["accuracy_matrix"][1][0] == pytest.approx(sum(r["accuracy_matrix"][1][0]
                                                                   for r in entry["runs"]) / 2)
        assert entry["seconds"] == pytest.approx(sum(r["seconds"] for r in entry["runs"]))
        assert entry["test_rows"] == [8, 8]  # --test-size 8 per task, every row evaluated
        assert 0 < entry["aa_standard_error"] <= 0.5 / 8**0.5 / 2**0.5  # at most p = 0.5 on both tasks
    slao, seqlora = record["strategies"]["slao"], record["strategies"]["seqlora"]
    assert record["gain_aa_points"]["seqlora"] == pytest.approx(100 * (slao["aa"] - seqlora["aa"]))
    assert slao["adapter_bytes"] > seqlora["adapter_bytes"]  # SLAO keeps one B buffer per layer besides
    with open(record["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert record["figure"] == os.path.join(out, "comparison.png")


def test_demo_prints_the_table_that_comparison_md_holds(demo):
    out, printed, record = demo
    with open(os.path.join(out, "comparison.md")) as f:
        table = f.read()
    assert table in printed
    for spec, entry in record["strategies"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {spec} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{entry['aa']:.3f} ± {entry['aa_std']:.3f}"
        assert cells[2] == f"{entry['bwt']:+.3f} ± {entry['bwt_std']:.3f}"
        assert cells[5] == f"{entry['adapter_bytes'] / 2**20:.2f} MiB"
        assert cells[6] == f"{entry['seconds']:.0f} s"
    gain = record["gain_aa_points"]["seqlora"]
    assert f"slao vs seqlora: {gain:+.1f} AA points" in printed
    errors = ", ".join(f"{100 * e['aa_standard_error']:.1f} ({spec})" for spec, e in record["strategies"].items())
    assert f"resolution: one run's AA rests on 16 test rows (8 + 8); its binomial standard error is {errors}" in table
    assert os.path.join(out, "comparison.png") in printed


def test_demo_refuses_an_earlier_demo_then_resume_reuses_it(demo, model_dir, capsys):
    out, _, record = demo
    assert main(["demo", "--model", model_dir, "--out", out, "--seeds", "0,1", *TINY_DEMO]) == 2
    err = capsys.readouterr().err
    assert "already holds a demo" in err and "--resume" in err and err.count("\n") == 1
    # --resume with other settings is refused before anything runs
    assert main(["demo", "--model", model_dir, "--out", out, "--seeds", "0,1", *TINY_DEMO, "--steps", "4",
                 "--resume"]) == 2
    assert "other settings (train)" in capsys.readouterr().err
    # the same command with --resume trains nothing and writes the same numbers
    assert main(["demo", "--model", model_dir, "--out", out, "--seeds", "0,1", *TINY_DEMO, "--resume"]) == 0
    assert "done earlier" in capsys.readouterr().out
    with open(os.path.join(out, "comparison.json")) as f:
        again = json.load(f)
    assert again["strategies"]["slao"]["runs"] == record["strategies"]["slao"]["runs"]


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "slao"], "--strategies needs at least two distinct strategies"),
    (["--strategies", "slao,bogus"], "--strategies bogus"),
    (["--seeds", "0,0"], "argument --seeds: expected distinct"),
    (["--order", "large,nope"], "unknown task(s) ['nope']"),
])
def test_demo_checks_its_flags_before_loading_the_model(extra, message, model_dir, tmp_path, capsys, monkeypatch):
    import slao_kernels.continual.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    out = tmp_path / "o"
    assert main(["demo", "--model", model_dir, "--out", str(out), *TINY_DEMO, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_distinct_answer_tasks_share_the_inputs_not_the_answers():
    from slao_kernels.continual.tasks import DISTINCT_ANSWER_RULES, GENERATED_RULES, generated_suite

    tasks = generated_suite(rules=DISTINCT_ANSWER_RULES, train_size=64, test_size=16, seed=1)
    assert [t.name for t in tasks] == list(DISTINCT_ANSWER_RULES)
    assert not set(DISTINCT_ANSWER_RULES) & set(GENERATED_RULES)
    labels = [set(t.labels) for t in tasks]
    assert all(len(a & b) == 0 for i, a in enumerate(labels) for b in labels[i + 1:])  # no answer word shared
    for t in tasks:
        rule = DISTINCT_ANSWER_RULES[t.name]
        rows = t.train + t.test
        assert all(r.label == rule.labels[0 if rule.holds(int(r.text.split()[-1])) else 1] for r in rows)
        assert sum(r.label == t.labels[0] for r in t.train) == 32  # label-balanced
        assert len({r.text for r in rows}) == len(rows)  # test rows never seen in training
    # the built-in suite is unchanged: same rows, yes/no answers
    assert generated_suite("large", seed=3)[0].labels == ("yes", "no")


def test_demo_defaults_the_embedded_text_stream_and_generated_orders_of_either_set():
    from slao_kernels.cli import build_parser
    from slao_kernels.cli.demo import DEMO_ORDER, DEMO_TEST_SIZE
    from slao_kernels.cli.run import _load_tasks

    demo, run = build_parser().parse_args(["demo"]), build_parser().parse_args(["run"])
    # the demo's own budget; slao run keeps its defaults
    assert (demo.targets, demo.steps, demo.max_prompt_tokens, demo.max_test) == ("q_proj,v_proj", 20, 96, 40)
    assert (len(run.targets.split(",")), run.steps, run.max_prompt_tokens, run.max_test) == (7, 40, 256, None)

    tasks, source = _load_tasks(demo, DEMO_ORDER, DEMO_TEST_SIZE)
    assert [t.name for t in tasks] == ["dbpedia", "boolq", "mnli"] and source == {"source": "embedded_text"}
    assert all(len(t.test) == 50 for t in tasks)
    generated, source = _load_tasks(build_parser().parse_args(["demo", "--order", "large"]), DEMO_ORDER, DEMO_TEST_SIZE)
    assert source == {"source": "generated", "train_size": 256, "test_size": 50, "data_seed": 0}  # the demo's 50
    assert _load_tasks(run)[1] == {"source": "generated", "train_size": 256, "test_size": 100, "data_seed": 0}
    mixed, source = _load_tasks(build_parser().parse_args(["demo", "--order", "under_over,large",
                                                            "--test-size", "10"]), DEMO_ORDER, DEMO_TEST_SIZE)
    assert [(t.name, t.labels) for t in mixed] == [("under_over", ("under", "over")), ("large", ("yes", "no"))]
    assert source["source"] == "generated" and all(len(t.test) == 10 for t in mixed)


def test_a_failed_task_in_the_demo_is_reported_as_the_demo_s(model_dir, tmp_path, capsys, monkeypatch):
    from slao_kernels.continual import compare, runner

    def fail(*args, **kwargs):
        raise runner.TaskFailed("task 2 of 2 (small) failed: the loss is nan at step 3", 2, "small", 2)

    monkeypatch.setattr(compare, "run_stream", fail)
    assert main(["demo", "--model", model_dir, "--out", str(tmp_path / "o"), *TINY_DEMO]) == 1
    err = capsys.readouterr().err
    assert err.startswith("slao demo: task 2 of 2 (small) failed") and err.count("\n") == 1, err
    assert "continue with --resume" in err


def test_demo_data_without_order_runs_every_task_of_the_directory(model_dir, tmp_path):
    """--data without --order: the directory's own tasks (not the embedded stream's names)."""
    for name in ("alpha", "beta"):
        task = tmp_path / "data" / name
        task.mkdir(parents=True)
        rows = [{"sentence": f"{name} row {i}", "label": "x" if i % 2 else "y"} for i in range(8)]
        (task / "train.json").write_text(json.dumps(rows))
        (task / "test.json").write_text(json.dumps(rows[:4]))
    out = tmp_path / "out"
    drop = {"--order", "--train-size", "--test-size"}  # --data: the directory's tasks and rows
    argv = [a for i, a in enumerate(TINY_DEMO) if a not in drop and (i == 0 or TINY_DEMO[i - 1] not in drop)]
    assert main(["demo", "--model", model_dir, "--out", str(out), "--data", str(tmp_path / "data"), *argv]) == 0
    assert json.loads((out / "comparison.json").read_text())["tasks"] == ["alpha", "beta"]
