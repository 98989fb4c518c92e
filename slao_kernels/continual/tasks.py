"""Task streams: what the runner trains and evaluates on.

A :class:`Task` is a classification task in instruction form: a name, an
instruction, its label strings (the options the model chooses between) and
train/test rows of ``(text, label)``. Three sources:

* :func:`load_task_dir` — a directory in the CL_Benchmark layout that LoRA
  continual-learning papers use: ``<dir>/<task>/{train,test,labels}.json``,
  rows ``{"sentence": str, "label": str}``.
* :func:`load_hf_task` — anything Hugging Face ``datasets`` reads (a dataset
  name, or local json/csv/parquet files), with a text and a label column.
* :func:`text_stream` — the embedded real-text tasks (:data:`TEXT_TASKS`: DBpedia topics, BoolQ
  questions, MultiNLI inference, and split DBpedia's three parts, each over a group of the
  topics): a few hundred rows per task cut from public sets whose
  licences allow redistribution with attribution (``data/text/SOURCES.md``), shipped in the
  package so that ``slao demo`` runs on real text offline.
* :func:`generated_suite` — procedurally generated tasks over three-digit
  numbers, the embedded default: no network, no data files. Every task asks a
  yes/no question about the same kind of input, under a different rule, so
  learning one task pulls the shared answer tokens towards another task's rule
  — the interference that makes forgetting visible within a few dozen steps.
  :data:`DISTINCT_ANSWER_RULES` are questions about the same inputs that answer
  with words of their own (high/low, big/small, ...): tasks that share structure but
  not answers, which one adapter can hold side by side.

Task orders of the literature (yahoo is absent from the CL_Benchmark subset
here and dropped) are in :data:`ORDERS`, selectable by name.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One row: the input text and its label (one of the task's labels)."""

    text: str
    label: str


@dataclass(frozen=True)
class Task:
    """A classification task in instruction form.

    Attributes:
        name: identifier used in task orders, reports and on the command line.
        instruction: the question put before every input.
        labels: the answer options, in a fixed order (scored by likelihood).
        train: training rows.
        test: evaluation rows.
    """

    name: str
    instruction: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"Task.name must be a non-empty string, got {self.name!r}")
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"task {self.name!r}: labels must be at least two distinct non-empty strings, "
                             f"got {labels!r}")
        for split in ("train", "test"):
            rows = tuple(getattr(self, split))
            object.__setattr__(self, split, rows)
            bad = next((r for r in rows if r.label not in labels), None)
            if bad is not None:
                raise ValueError(f"task {self.name!r}: a {split} row has label {bad.label!r}, not one of {labels}")
        if not self.test:
            raise ValueError(f"task {self.name!r} has no test rows")

    def __repr__(self) -> str:
        return f"Task({self.name!r}, labels={list(self.labels)}, train={len(self.train)}, test={len(self.test)})"


# --------------------------------------------------------------------------- orders

ORDERS: dict[str, tuple[str, ...]] = {
    # Standard CL benchmark (yahoo dropped: not in the subset)
    "order1": ("dbpedia", "amazon", "agnews"),
    "order2": ("dbpedia", "amazon", "agnews"),
    "order3": ("amazon", "agnews", "dbpedia"),
    # Large number of tasks (yahoo dropped)
    "order4": ("mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst2", "dbpedia",
               "agnews", "multirc"),
}


def resolve_order(order: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """A task order as a list of names: a named order (:data:`ORDERS`), a
    comma-separated string, a sequence of names, or None for ``available`` as is.

    Raises:
        ValueError: an unknown task name (the message lists what is available),
            a repeated task, or an empty order.
    """
    if order is None:
        names = list(available)
    elif isinstance(order, str):
        names = list(ORDERS[order]) if order in ORDERS else [n.strip() for n in order.split(",") if n.strip()]
    else:
        names = list(order)
    if not names:
        raise ValueError("the task order is empty")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {sorted(available)}; named orders: {sorted(ORDERS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task(s) {repeated} appear more than once in the order")
    return names


# --------------------------------------------------------------------------- CL_Benchmark directories

# Our phrasing of each CL_Benchmark task's question; unknown tasks get a generic one.
INSTRUCTIONS = {
    "agnews": "What is the topic of this news article?",
    "dbpedia": "What kind of entity does this encyclopedia entry describe?",
    "amazon": "How positive is this product review?",
    "yelp": "How positive is this restaurant review?",
    "imdb": "Is the sentiment of this movie review good or bad?",
    "sst2": "Is the sentiment of this sentence good or bad?",
    "mnli": "Does the premise entail the hypothesis, contradict it, or neither?",
    "cb": "Does the premise entail the hypothesis, contradict it, or neither?",
    "rte": "Does the first sentence entail the second?",
    "qqp": "Do these two questions ask the same thing?",
    "boolq": "Answer the question about the passage.",
    "copa": "Which alternative is more plausible?",
    "wic": "Is the word used with the same meaning in both sentences?",
    "multirc": "Is the answer to the question about the paragraph correct?",
}
# split DBpedia (the embedded tasks dbpedia_1..3): DBpedia's question over a group of its topics
INSTRUCTIONS.update({f"dbpedia_{k}": INSTRUCTIONS["dbpedia"] for k in (1, 2, 3)})
GENERIC_INSTRUCTION = "Classify the input."


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def _rows(raw, path: str) -> tuple[Example, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of {{'sentence': ..., 'label': ...}} rows")
    try:
        return tuple(Example(str(r["sentence"]), str(r["label"])) for r in raw)
    except (KeyError, TypeError):
        raise ValueError(f"{path}: every row needs a 'sentence' and a 'label'") from None


def _drop_unlabeled(name: str, split: str, rows: tuple[Example, ...], labels: list[str]) -> tuple[Example, ...]:
    """Rows whose label is one of ``labels``; the others (MNLI's "-": annotators
    did not agree) are dropped with a warning that counts them."""
    kept = tuple(r for r in rows if r.label in labels)
    if len(kept) < len(rows):
        other = sorted({r.label for r in rows if r.label not in labels})
        warnings.warn(f"task {name!r}: {len(rows) - len(kept)} of {len(rows)} {split} rows have labels {other} "
                      f"that labels.json does not list; they are left out", UserWarning, stacklevel=3)
    return kept


def task_dir_names(directory: str) -> list[str]:
    """Names of the tasks in a CL_Benchmark-layout directory (sub-directories with a ``test.json``)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"task directory {directory!r} does not exist")
    return sorted(d for d in os.listdir(directory) if os.path.isfile(os.path.join(directory, d, "test.json")))


def load_task_dir(directory: str, names: Sequence[str] | str | None = None) -> list[Task]:
    """Tasks from a CL_Benchmark-layout directory, in the order of ``names``
    (see :func:`resolve_order`; None loads every task, sorted by name)."""
    order = resolve_order(names, task_dir_names(directory))
    tasks = []
    for name in order:
        base = os.path.join(directory, name)
        labels_path = os.path.join(base, "labels.json")
        train, test = (_rows(_read_json(os.path.join(base, f"{s}.json"), f"task {name!r}"),
                             os.path.join(base, f"{s}.json")) for s in ("train", "test"))
        if os.path.isfile(labels_path):
            labels = [str(x) for x in _read_json(labels_path, f"task {name!r}")]
            train, test = _drop_unlabeled(name, "train", train, labels), _drop_unlabeled(name, "test", test, labels)
        else:  # no labels.json: the labels seen in the data, in order of appearance
            labels = list(dict.fromkeys(r.label for r in train + test))
        tasks.append(Task(name, INSTRUCTIONS.get(name, GENERIC_INSTRUCTION), tuple(labels), train, test))
    return tasks


# --------------------------------------------------------------------------- the embedded real-text stream

TEXT_STREAM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "text")
# three kinds of question with answers of their own: a topic (14 names), yes/no-style True/False about a
# passage, and entailment/neutral/contradiction between two sentences
TEXT_ORDER: tuple[str, ...] = ("dbpedia", "boolq", "mnli")
# every embedded task: TEXT_ORDER's and split DBpedia's three parts (the 14 topics in the source's
# order, in consecutive groups of 5, 5 and 4: one question, one kind of input, no answer in common)
TEXT_TASKS: tuple[str, ...] = (*TEXT_ORDER, "dbpedia_1", "dbpedia_2", "dbpedia_3")


def text_stream(names: Sequence[str] | str | None = None) -> list[Task]:
    """The embedded real-text tasks in the order of ``names`` (default :data:`TEXT_ORDER`): 256
    training and 50 test rows each, label-balanced, cut from the CL_Benchmark subset by
    ``benchmarks/continual/tools/cut_embedded_stream.py``; sources and licences per task in
    ``data/text/SOURCES.md``."""
    return load_task_dir(TEXT_STREAM_DIR, TEXT_ORDER if names is None else names)


# --------------------------------------------------------------------------- Hugging Face datasets

def load_hf_task(name: str, path: str, text_column: str | Sequence[str] = "text", label_column: str = "label",
                 instruction: str = GENERIC_INSTRUCTION, labels: Sequence[str] | None = None,
                 train_split: str = "train", test_split: str = "test", data_files=None,
                 max_train: int | None = None, max_test: int | None = None, **load_kwargs) -> Task:
    """A task from Hugging Face ``datasets``: ``datasets.load_dataset(path, data_files=..., **load_kwargs)``.

    ``path`` is a dataset name or a loader such as ``"json"``/``"csv"`` with
    ``data_files={"train": ..., "test": ...}``. Several text columns are joined
    with newlines, each prefixed by its name. Integer labels of a ``ClassLabel``
    column become their names; other integer labels index ``labels``.
    """
    import datasets

    text_columns = [text_column] if isinstance(text_column, str) else list(text_column)
    ds = datasets.load_dataset(path, data_files=data_files, **load_kwargs)
    for split in (train_split, test_split):
        if split not in ds:
            raise ValueError(f"task {name!r}: dataset {path!r} has no split {split!r} (has {list(ds)})")
        missing = [c for c in text_columns + [label_column] if c not in ds[split].column_names]
        if missing:
            raise ValueError(f"task {name!r}: columns {missing} not in {path!r}[{split!r}] "
                             f"(has {ds[split].column_names})")
    feature = ds[train_split].features[label_column]
    names = list(getattr(feature, "names", None) or labels or [])

    def label_of(value) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and names:
            return names[value]
        return str(value)

    def rows(split: str, limit: int | None) -> tuple[Example, ...]:
        part = ds[split]
        if limit is not None:
            part = part.select(range(min(limit, len(part))))
        out = []
        for r in part:
            text = (str(r[text_columns[0]]) if len(text_columns) == 1
                    else "\n".join(f"{c}: {r[c]}" for c in text_columns))
            out.append(Example(text, label_of(r[label_column])))
        return tuple(out)

    train, test = rows(train_split, max_train), rows(test_split, max_test)
    label_set = tuple(names) if names else tuple(dict.fromkeys(r.label for r in train + test))
    return Task(name, instruction, label_set, train, test)


# --------------------------------------------------------------------------- the generated suite

@dataclass(frozen=True)
class _Rule:
    instruction: str
    holds: Callable[[int], bool]
    labels: tuple[str, str] = ("yes", "no")  # the answer when the rule holds, and when it does not


# Yes/no questions about a three-digit number. All share the input distribution
# and the answer words, and disagree with each other on about half the inputs.
GENERATED_RULES: dict[str, _Rule] = {
    "large": _Rule("Is the number 500 or more?", lambda n: n >= 500),
    "last_big": _Rule("Is the last digit of the number 5 or more?", lambda n: n % 10 >= 5),
    "small": _Rule("Is the number less than 300?", lambda n: n < 300),
    "middle_big": _Rule("Is the middle digit of the number 5 or more?", lambda n: (n // 10) % 10 >= 5),
}
GENERATED_LABELS = ("yes", "no")

# The four rules of GENERATED_RULES on the same inputs, in the same order, but every task answers
# with words of its own: the tasks share structure, not answers, so one adapter can hold all of
# them at once, and what a later task's training does to an earlier one is forgetting, not a
# contradiction between the tasks. (A parity task, even/odd, was tried first and left out: its
# loss stayed at chance after 40 steps on SmolLM2-135M, see benchmarks/continual/README.md.)
DISTINCT_ANSWER_RULES: dict[str, _Rule] = {
    "high_low": _Rule("Is the number high (500 or more) or low?", lambda n: n >= 500, ("high", "low")),
    "last_digit": _Rule("Is the last digit of the number big (5 or more) or small?", lambda n: n % 10 >= 5,
                        ("big", "small")),
    "under_over": _Rule("Is the number under 300 or over?", lambda n: n < 300, ("under", "over")),
    "middle_digit": _Rule("Is the middle digit of the number 5 or more (up) or less (down)?",
                          lambda n: (n // 10) % 10 >= 5, ("up", "down")),
}
# every generated task by name, for streams that mix the two sets
ALL_GENERATED_RULES: dict[str, _Rule] = {**GENERATED_RULES, **DISTINCT_ANSWER_RULES}


def _generated_rows(rule: _Rule, count: int, rng: random.Random) -> tuple[Example, ...]:
    """``count`` label-balanced rows of distinct numbers from 100..999."""
    rows, used = [], set()
    while len(rows) < count:
        want = len(rows) % 2 == 0  # alternate yes/no: every prefix is balanced
        n = rng.randrange(100, 1000)
        if n not in used and rule.holds(n) == want:  # distinct numbers: test rows never seen in training
            used.add(n)
            rows.append(Example(f"Number: {n}", rule.labels[0] if want else rule.labels[1]))
    return tuple(rows)


def generated_suite(names: Sequence[str] | str | None = None, train_size: int = 256, test_size: int = 100,
                    seed: int = 0, rules: Mapping[str, _Rule] | None = None) -> list[Task]:
    """The built-in generated tasks (see the module docstring), deterministic in ``seed``.

    Args:
        names: which tasks and in which order (:func:`resolve_order`); None is all of
            :data:`GENERATED_RULES` in their listed order.
        train_size, test_size: rows per task (label-balanced).
        seed: the same seed gives the same rows on every machine.
        rules: the tasks to draw from: :data:`GENERATED_RULES` (None, the default),
            :data:`DISTINCT_ANSWER_RULES` or :data:`ALL_GENERATED_RULES`.
    """
    rules = GENERATED_RULES if rules is None else rules
    if train_size < 1 or test_size < 2 or train_size + test_size > 400:
        raise ValueError("generated_suite needs train_size >= 1, test_size >= 2 and at most 400 rows (distinct "
                         f"three-digit numbers per label), got {train_size}, {test_size}")
    order = resolve_order(names, list(rules))
    tasks = []
    for name in order:
        rule = rules[name]
        rng = random.Random(f"{seed}:{name}")  # per task: adding a task does not change the others
        rows = _generated_rows(rule, train_size + test_size, rng)
        tasks.append(Task(name, rule.instruction, rule.labels, rows[:train_size], rows[train_size:]))
    return tasks
