"""The continual-learning runner's pieces: task streams, prompts and masking, option
scoring, the training loop, metrics, the runner and its report, the Trainer callback."""

import json
import os

import pytest
import torch
from conftest import DATA_DIR, interrupted_at_task, tiny_model, tiny_tokenizer

from slao_kernels import SLAO, LoRAConfig, patch_llama
from slao_kernels.continual import (
    ORDERS,
    Example,
    PromptEncoder,
    RunConfig,
    Task,
    TrainConfig,
    cl_metrics,
    evaluate_task,
    generated_suite,
    load_hf_task,
    load_task_dir,
    run_stream,
    score_options,
    train_task,
)
from slao_kernels.continual.evaluate import brute_force_scores
from slao_kernels.continual.prompts import collate_answers
from slao_kernels.continual.report import format_report
from slao_kernels.continual.tasks import GENERATED_RULES, resolve_order
from slao_kernels.continual.train import adamw, answer_loss, lr_factor

needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"no task data at {DATA_DIR}")


# --------------------------------------------------------------------------- task streams

@needs_data
def test_task_dir_matches_its_manifest():
    with open(os.path.join(DATA_DIR, "tasks.json")) as f:
        manifest = json.load(f)
    tasks = load_task_dir(DATA_DIR, "cb,sst2,dbpedia")
    assert [t.name for t in tasks] == ["cb", "sst2", "dbpedia"]
    for t in tasks:
        assert list(t.labels) == manifest[t.name]["labels"]
        assert len(t.train) == manifest[t.name]["train.json"] and len(t.test) == manifest[t.name]["test.json"]
        assert all(r.label in t.labels for r in t.train + t.test)


@needs_data
def test_embedded_text_stream_is_balanced_held_out_and_attributed():
    from collections import Counter

    from slao_kernels.continual.tasks import TEXT_STREAM_DIR, TEXT_TASKS, task_dir_names, text_stream

    assert [t.name for t in text_stream()] == ["dbpedia", "boolq", "mnli"]
    tasks = text_stream(TEXT_TASKS)
    assert sorted(TEXT_TASKS) == task_dir_names(TEXT_STREAM_DIR)  # every shipped task is selectable
    assert [len(t.labels) for t in tasks] == [14, 2, 3, 5, 5, 4]
    # split DBpedia: the 14 topics in their order, in groups of 5, 5 and 4, one question, no answer in common
    dbpedia, parts = tasks[0], tasks[3:]
    assert [label for part in parts for label in part.labels] == list(dbpedia.labels)
    assert {part.instruction for part in parts} == {dbpedia.instruction}
    for t in tasks:
        assert (len(t.train), len(t.test)) == (256, 50)
        for rows in (t.train, t.test):
            counts = Counter(r.label for r in rows)
            assert set(counts) == set(t.labels) and max(counts.values()) - min(counts.values()) <= 1, t.name
        # no test row is trained on, by this task or another one of the stream
        assert not {r.text for r in t.test} & {r.text for task in tasks for r in task.train}, t.name
        assert all(0 < len(r.text) <= 1000 for r in t.train + t.test)
    assert [t.name for t in text_stream("mnli,dbpedia")] == ["mnli", "dbpedia"]
    with open(os.path.join(TEXT_STREAM_DIR, "SOURCES.md"), encoding="utf-8") as f:
        rows = {line.split("|")[1].strip(" `"): line for line in f if line.startswith("| `")}
    assert set(rows) == set(TEXT_TASKS)  # a source and a licence for every task
    assert all("CC BY-SA 3.0" in rows[name] for name in ("dbpedia", "boolq", "dbpedia_1", "dbpedia_2", "dbpedia_3"))
    assert "Open American National Corpus" in rows["mnli"]


def test_every_embedded_data_file_ships_in_the_package():
    """What pyproject's package-data globs pick (setuptools expands them with glob, relative to the
    package's directory) is every file of the embedded stream: a wheel without one fails here."""
    import glob

    tomllib = pytest.importorskip("tomllib")
    import slao_kernels.continual as package

    root = os.path.dirname(package.__file__)
    with open(os.path.join(os.path.dirname(os.path.dirname(root)), "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["slao_kernels.continual"]
    shipped = {os.path.relpath(p, root) for pattern in patterns for p in glob.glob(os.path.join(root, pattern))}
    present = {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(os.path.join(root, "data"))
               for n in names if "__pycache__" not in d}
    assert present and shipped == present


def test_named_orders_resolve_against_the_data():
    available = os.listdir(DATA_DIR)
    for name, order in ORDERS.items():
        assert resolve_order(name, available) == list(order)


def _write_task(root, name, train, test, labels=None):
    os.makedirs(root / name)
    for split, rows in (("train", train), ("test", test)):
        (root / name / f"{split}.json").write_text(json.dumps([{"sentence": s, "label": y} for s, y in rows]))
    if labels is not None:
        (root / name / "labels.json").write_text(json.dumps(labels))


def test_task_dir_errors_name_the_problem(tmp_path):
    _write_task(tmp_path, "ok", [("a", "x")], [("b", "y")])  # no labels.json: labels from the data
    _write_task(tmp_path, "gaps", [("a", "x"), ("c", "-")], [("b", "y")], labels=["x", "y"])
    assert load_task_dir(tmp_path, "ok")[0].labels == ("x", "y")
    with pytest.warns(UserWarning, match=r"1 of 2 train rows have labels \['-'\] that labels.json does not list"):
        assert load_task_dir(tmp_path, "gaps")[0].train == (Example("a", "x"),)
    with pytest.raises(ValueError, match=r"label 'z', not one of \('x', 'y'\)"):
        Task("bad", "q", ("x", "y"), (Example("a", "z"),), (Example("b", "x"),))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]; available: \['gaps', 'ok'\]"):
        load_task_dir(tmp_path, "ok,nope")
    with pytest.raises(ValueError, match="more than once"):
        load_task_dir(tmp_path, "ok,ok")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['bad'\]"):
        load_task_dir(tmp_path, "bad")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_dir(tmp_path / "missing")
    (tmp_path / "ok" / "train.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_task_dir(tmp_path, "ok")


def test_hf_datasets_from_local_files(tmp_path):
    rows = [{"text": f"item {i}", "label": i % 3} for i in range(12)]
    for split, part in (("train", rows[:9]), ("test", rows[9:])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    task = load_hf_task("local", "json", data_files={s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")},
                        labels=["red", "green", "blue"], instruction="Which colour?")
    assert task.labels == ("red", "green", "blue") and task.instruction == "Which colour?"
    assert task.train[4] == Example("item 4", "green") and len(task.test) == 3
    with pytest.raises(ValueError, match=r"columns \['sentence'\] not in"):
        load_hf_task("local", "json", text_column="sentence",
                     data_files={s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")})


def test_generated_suite_is_deterministic_balanced_and_follows_its_rules():
    a, b = generated_suite(seed=3), generated_suite(seed=3)
    assert a == b and generated_suite(seed=4) != a
    assert [t.name for t in a] == list(GENERATED_RULES)
    for t in a:
        rule = GENERATED_RULES[t.name]
        numbers = [int(r.text.split()[-1]) for r in t.train + t.test]
        assert len(set(numbers)) == len(numbers)  # no test row was seen in training
        assert all(rule.holds(n) == (r.label == "yes") for n, r in zip(numbers, t.train + t.test, strict=True))
        assert sum(r.label == "yes" for r in t.train) == len(t.train) // 2
    # the rules conflict: on shared inputs, every pair of tasks disagrees on a good share of numbers
    for x in GENERATED_RULES:
        for y in GENERATED_RULES:
            if x < y:
                disagree = sum(GENERATED_RULES[x].holds(n) != GENERATED_RULES[y].holds(n) for n in range(100, 1000))
                assert disagree >= 300, (x, y, disagree)
    # adding a task leaves the others' rows unchanged
    assert generated_suite("small", seed=3)[0] == next(t for t in a if t.name == "small")


def test_task_rejects_bad_definitions():
    with pytest.raises(ValueError, match="at least two distinct"):
        Task("t", "q", ("x",), (), (Example("a", "x"),))
    with pytest.raises(ValueError, match="has no test rows"):
        Task("t", "q", ("x", "y"), (Example("a", "x"),), ())


# --------------------------------------------------------------------------- prompts and masking

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _model(tokenizer):
    # initializer_range 0.2, not the usual 0.02: the random 64-wide model's logits then span a range
    # in which a LoRA (it cannot touch the output head) can make one answer token likely
    return tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.2)


def test_prompts_truncate_the_input_only(tokenizer):
    task = generated_suite("large")[0]
    enc = PromptEncoder(tokenizer, max_prompt_tokens=40)
    short = enc.prompt(task, "Number: 123")
    long = enc.prompt(task, "Number: " + " ".join(["123"] * 200))
    assert short[:len(enc.head(task))] == enc.head(task) == long[:len(enc.head(task))]
    assert long[-3:] == short[-3:]  # the answer cue survives
    assert len(long) == max(40, len(enc.head(task)) + 16 + len(enc._tail))
    assert tokenizer.decode(enc.answer("yes")).strip() == "yes"


def test_collated_batch_masks_everything_but_the_answer(tokenizer):
    task = generated_suite("large")[0]
    enc = PromptEncoder(tokenizer)
    pairs = [enc.encode(task, r) for r in task.train[:5]]
    batch = collate_answers(pairs, enc.pad_id)
    # position k predicts targets[k]: the token right after it is that target
    assert torch.equal(batch.input_ids[batch.rows, batch.positions + 1], batch.targets)
    assert len(batch.targets) == sum(len(a) for _, a in pairs)
    for b, (p, a) in enumerate(pairs):
        assert batch.attention_mask[b].sum() == len(p) + len(a)
        assert batch.targets[batch.rows == b].tolist() == a


def test_answer_loss_equals_the_masked_full_vocabulary_loss(tokenizer):
    model = _model(tokenizer)
    task = generated_suite("small")[0]
    enc = PromptEncoder(tokenizer)
    pairs = [enc.encode(task, r) for r in task.train[:6]]
    batch = collate_answers(pairs, enc.pad_id)
    labels = torch.full_like(batch.input_ids, -100)
    labels[batch.rows, batch.positions + 1] = batch.targets
    reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    torch.testing.assert_close(answer_loss(model, batch), reference, rtol=1e-5, atol=1e-6)  # fp32 sums


# --------------------------------------------------------------------------- option scoring

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_option_scores_match_one_forward_per_option(arch, attn):
    model = tiny_model(arch, attn_implementation=attn)
    V = model.config.vocab_size
    prompts = [torch.randint(1, V, (n,)).tolist() for n in (5, 11, 3, 8)]  # ragged: left padding is exercised
    options = [[7], [3, 4, 5], [9, 2], [3, 4]]  # shared prefixes, one single-token option
    fast = score_options(model, prompts, options, pad_id=0)
    slow = brute_force_scores(model, prompts, options)
    # fp32 log-likelihoods of a few tokens: agreement to a few ulps of their magnitude
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    single = score_options(model, prompts, [[7], [9]], pad_id=0)  # the path without a second forward
    torch.testing.assert_close(single, brute_force_scores(model, prompts, [[7], [9]]), rtol=1e-5, atol=1e-5)


def test_evaluate_task_picks_the_best_scored_option(tokenizer):
    model = _model(tokenizer)
    task = generated_suite("large", test_size=10)[0]
    enc = PromptEncoder(tokenizer)
    result = evaluate_task(model, enc, task, batch_size=3)
    scores = brute_force_scores(model, [enc.prompt(task, r.text) for r in task.test], enc.options(task))
    assert result["predictions"] == scores.argmax(1).tolist()
    right = sum(task.labels[p] == r.label for p, r in zip(result["predictions"], task.test, strict=True))
    expected = right / len(task.test)
    assert result["accuracy"] == expected and result["total"] == 10


# --------------------------------------------------------------------------- training

def test_lr_schedule():
    assert [round(lr_factor(s, 10, 0.2, "linear"), 3) for s in range(10)] == \
        [0.333, 0.667, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert lr_factor(5, 10, 0.0, "constant") == 1.0
    assert lr_factor(0, 10, 0.0, "cosine") == 1.0 and lr_factor(5, 10, 0.0, "cosine") == pytest.approx(0.5)


def test_train_config_rejects_bad_values():
    for bad in (dict(steps=0), dict(lr=0.0), dict(warmup=1.0), dict(schedule="step"), dict(batch_size=0)):
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig(**bad)
    assert TrainConfig(steps=None, epochs=2, batch_size=4, grad_accum=2).total_steps(20) == 5


def test_training_learns_a_task_deterministically(tokenizer):
    task = generated_suite("large", train_size=64, test_size=32)[0]
    enc = PromptEncoder(tokenizer)
    config = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=0.0, seed=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _model(tokenizer)
        patch_llama(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
        params = [p for p in model.parameters() if p.requires_grad]
        runs.append(train_task(model, enc, task, params, config, progress=False))
    assert runs[0]["losses"] == runs[1]["losses"]  # same seed, same rows, same numbers
    losses = runs[0]["losses"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_training_needs_trainable_parameters(tokenizer):
    model = _model(tokenizer)
    task = generated_suite("large", train_size=8, test_size=4)[0]
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_task(model, PromptEncoder(tokenizer), task, [p.requires_grad_(False) for p in model.parameters()])


# --------------------------------------------------------------------------- metrics

def test_metrics_on_hand_made_matrices():
    R = [[0.9, 0.2, 0.1],
         [0.6, 0.8, 0.3],
         [0.5, 0.7, 0.95]]
    R0 = [0.3, 0.25, 0.2]
    m = cl_metrics(R, R0)
    assert m["aa"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["fwt"] == pytest.approx(((0.2 - 0.25) + (0.3 - 0.2)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert m["ap"] == pytest.approx((0.9 + 0.8 + 0.95) / 3) and m["fp"] == m["aa"]
    assert m["ap_minus_fp"] == pytest.approx(m["ap"] - m["aa"])
    # no forgetting at all; one task has no backward terms
    perfect = cl_metrics([[1.0, 0.0], [1.0, 1.0]])
    assert (perfect["bwt"], perfect["forgetting"], perfect["fwt"]) == (0.0, 0.0, None)
    assert cl_metrics([[0.7]], [0.5])["bwt"] is None
    with pytest.raises(ValueError, match="T×T"):
        cl_metrics([[0.1, 0.2]])
    with pytest.raises(ValueError, match="one accuracy per task"):
        cl_metrics([[0.1]], [0.1, 0.2])


# --------------------------------------------------------------------------- the runner

def _tiny_run_config(**overrides):
    return RunConfig(lora=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
                     train=TrainConfig(steps=3, batch_size=4, lr=1e-2), eval_batch_size=8, **overrides)


def test_run_stream_writes_a_complete_report(tmp_path, tokenizer):
    tasks = generated_suite("large,small,last_big", train_size=16, test_size=8)
    model = _model(tokenizer)
    report = run_stream(model, tokenizer, tasks, _tiny_run_config(), out=str(tmp_path), progress=False,
                        log=lambda s: None)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("tasks", "accuracy_matrix", "aa", "bwt", "fwt", "forgetting", "config", "timings"):
        assert key in on_disk
    R = on_disk["accuracy_matrix"]
    assert on_disk["tasks"] == ["large", "small", "last_big"] and len(R) == 3 and all(len(r) == 3 for r in R)
    assert all(a in {k / 8 for k in range(9)} for row in R for a in row)  # 8 test rows per task
    assert {k: on_disk[k] for k in ("aa", "bwt", "fwt", "forgetting")} == pytest.approx(
        {k: v for k, v in cl_metrics(R, on_disk["zero_shot"]).items() if k in ("aa", "bwt", "fwt", "forgetting")})
    assert on_disk["status"] == "complete" and len(on_disk["timings"]["tasks"]) == 3
    assert len(set(on_disk["adapter_bytes"])) == 1  # SLAO: constant memory across tasks
    assert sorted(os.path.basename(p) for p in on_disk["plots"]) == ["accuracy_matrix.png", "accuracy_over_time.png"]
    for p in on_disk["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    # the checkpoint resumes a SLAO controller after the last task
    fresh = _model(tokenizer)
    patch_llama(fresh, _tiny_run_config().lora)
    slao = SLAO.load(fresh, str(tmp_path / "checkpoint"))
    assert slao.task_index == 3
    text = format_report(report)
    assert "after small" in text and "AA" in text and "BWT" in text


def test_a_crash_leaves_the_finished_tasks_report(tmp_path, tokenizer):
    tasks = generated_suite("large,small", train_size=16, test_size=8)
    model = _model(tokenizer)
    with interrupted_at_task(2):  # the user interrupts task 2
        run_stream(model, tokenizer, tasks, _tiny_run_config(), out=str(tmp_path), progress=False, log=lambda s: None)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "running" and len(report["accuracy_matrix"]) == 1
    assert os.path.isfile(tmp_path / "checkpoint" / "slao.json")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_run_stream_rejects_bad_input(tokenizer):
    model = _model(tokenizer)
    tasks = generated_suite("large", train_size=8, test_size=4)
    with pytest.raises(ValueError, match="no tasks"):
        run_stream(model, tokenizer, [], _tiny_run_config())
    with pytest.raises(ValueError, match="distinct"):
        run_stream(model, tokenizer, tasks + tasks, _tiny_run_config())
    with pytest.raises(ValueError, match="unknown strategy 'ewc'"):
        run_stream(model, tokenizer, tasks, _tiny_run_config(strategy="ewc"), progress=False, log=lambda s: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for zero_shot in ([0.5, 0.5], [1.5], [float("nan")], ["0.5"]):
        with pytest.raises(ValueError, match=r"zero_shot must be one accuracy in \[0, 1\] per task \(1\)"):
            run_stream(model, tokenizer, tasks, _tiny_run_config(), progress=False, zero_shot=zero_shot)
    assert model.state_dict().keys() == before.keys()  # refused before the model was patched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- the Trainer callback

def test_slao_callback_runs_slao_inside_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from slao_kernels.continual import SLAOCallback

    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    slao = SLAO(model)
    callback = SLAOCallback(slao)
    seen_init = []

    class Probe(transformers.TrainerCallback):  # runs after SLAOCallback: sees the task's initial adapter
        def on_train_begin(self, args, state, control, **kwargs):
            seen_init.append({n: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                              for n, m in slao.modules.items()})

    def dataset(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, model.config.vocab_size, (16, 12), generator=g)
        return [{"input_ids": x, "labels": x} for x in ids]

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, disable_tqdm=True)
    after = []
    for task in range(2):
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(task),
                                       callbacks=[callback, Probe()])
        trainer.train()
        after.append({n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in slao.modules.items()})
    assert slao.task_index == 2 and not slao.in_task
    assert callback.lambdas == [1.0, pytest.approx(2 ** -0.5)]
    lam = 2 ** -0.5
    for n, m in slao.modules.items():
        b_ft1 = after[0][n][1]  # after task 1 the merge is task 1's fine-tuned B
        a_init2, b_init2 = seen_init[1][n]
        # task 2 began from A = orthonormal rows of A_ft,1 and B = B_ft,1
        torch.testing.assert_close(a_init2 @ a_init2.T, torch.eye(4), rtol=0, atol=1e-5)
        torch.testing.assert_close(b_init2, b_ft1, rtol=0, atol=0)
        b_ft2 = slao._b_other[n]  # the controller keeps B_ft,2 for the next init
        torch.testing.assert_close(m.lora_B.detach(), b_ft1 + lam * (b_ft2 - b_ft1), rtol=1e-6, atol=1e-7)
        assert not torch.equal(b_ft2, b_init2)  # task 2 did train


def test_callback_clears_a_reused_optimizer():
    from slao_kernels.continual import SLAOCallback

    model = tiny_model()
    patch_llama(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj",)))
    slao = SLAO(model)
    opt = torch.optim.AdamW(slao.parameters(), lr=1e-3)
    model(torch.randint(1, 96, (2, 5))).logits.sum().backward()
    opt.step()
    assert opt.state
    callback = SLAOCallback(slao)
    callback.on_train_begin(None, None, None, optimizer=opt)
    assert not opt.state and slao.in_task
    with pytest.raises(TypeError, match="SLAO controller"):
        SLAOCallback(model)



def test_resuming_an_interrupted_run_reproduces_the_uninterrupted_one(tmp_path, tokenizer):
    from slao_kernels.patching import lora_modules

    tasks = generated_suite("large,small,last_big", train_size=16, test_size=8)
    config = _tiny_run_config(strategy_options={"init": "random"})  # the init that draws random numbers
    quiet = dict(progress=False, log=lambda s: None)
    torch.manual_seed(0)
    whole_model = _model(tokenizer)
    whole = run_stream(whole_model, tokenizer, tasks, config, out=str(tmp_path / "whole"), **quiet)

    torch.manual_seed(0)
    with interrupted_at_task(3):
        run_stream(_model(tokenizer), tokenizer, tasks, config, out=str(tmp_path / "cut"), **quiet)
    torch.manual_seed(0)
    resumed_model = _model(tokenizer)  # a fresh process: the base model, nothing else
    resumed = run_stream(resumed_model, tokenizer, tasks, config, out=str(tmp_path / "cut"), resume=True, **quiet)
    assert resumed["resumed_after_task"] == 2
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["losses"] == whole["losses"]
    for (n, a), b in zip(lora_modules(whole_model).items(), lora_modules(resumed_model).values(), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), n
    other = _tiny_run_config(strategy_options={"init": "orthogonal"})
    with pytest.raises(ValueError, match="other settings"):
        run_stream(_model(tokenizer), tokenizer, tasks, other, out=str(tmp_path / "cut"), resume=True, **quiet)
    with pytest.raises(ValueError, match="is a run over"):
        run_stream(_model(tokenizer), tokenizer, tasks[:2], config, out=str(tmp_path / "cut"), resume=True, **quiet)


def test_adamw_is_fused_for_plain_cpu_tensors_and_agrees_with_the_loop():
    """The training loop's AdamW takes torch's fused kernel on plain CPU tensors (8 ms against 43 ms a step
    for SmolLM2's 420 adapter tensors) and torch's default elsewhere (here: the meta device); fused and
    per-tensor AdamW agree to rounding. Per step and element the two may round the new parameter and the
    update (at most lr·(1 + wd·|p|) in size) differently, one fp32 ulp each: after 10 steps the elementwise
    bound is 10·eps·(|p| + lr·(1 + wd·|p|))."""
    eps, lr, wd = torch.finfo(torch.float32).eps, 1e-2, 0.1
    ps = [torch.randn(8, 16, requires_grad=True) for _ in range(3)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fused, loop = adamw(ps, lr=lr, weight_decay=wd), torch.optim.AdamW(qs, lr=lr, weight_decay=wd, foreach=False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert adamw([torch.nn.Parameter(torch.empty(2, device="meta"))], lr=1.0).defaults["fused"] is None
    for _ in range(10):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(ps, qs, strict=True):
        bound = 10 * eps * (q.abs() + lr * (1 + wd * q.abs()))
        assert ((p - q).abs() <= bound).all(), (p - q).abs().max()
