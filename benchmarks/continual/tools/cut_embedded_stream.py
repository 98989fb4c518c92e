"""Cut the embedded real-text stream (slao_kernels/continual/data/text/) from a CL_Benchmark directory.

The package ships a few hundred rows of each task whose source licence allows redistribution with
attribution (listed in the stream's SOURCES.md), so that ``slao demo`` runs on real text with no
data files and no network. This script is how those files were made; it is deterministic:

    python benchmarks/continual/tools/cut_embedded_stream.py --src ../shared/data/cl_benchmark

Rows are taken label-balanced in the source's order (round robin over the labels), the first
``--train`` of train.json and the first ``--test`` of test.json; inputs longer than ``--max-chars``
are cut at a word boundary (the prompts are cut to 128 tokens anyway, about 500 characters).

Split DBpedia (``dbpedia_1``, ``dbpedia_2``, ``dbpedia_3``): DBpedia's 14 topics in the source's
label order, cut into consecutive groups of 5, 5 and 4; each part is a task of its own over its
group's topics only (the rows of those topics, taken as above), so the parts share the inputs' kind
and the question but not one answer.
"""

import argparse
import json
import os
from itertools import zip_longest

TASKS = ("dbpedia", "boolq", "mnli")
# split DBpedia: (task name, source task, first label, end label) in the source's label order
SPLITS = (("dbpedia_1", "dbpedia", 0, 5), ("dbpedia_2", "dbpedia", 5, 10), ("dbpedia_3", "dbpedia", 10, 14))
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "slao_kernels", "continual", "data", "text")


def balanced(rows, labels, count):
    by_label = {label: [r for r in rows if r["label"] == label] for label in labels}
    mixed = [r for group in zip_longest(*by_label.values()) for r in group if r is not None]
    if len(mixed) < count:
        raise SystemExit(f"only {len(mixed)} labelled rows, {count} asked for")
    return mixed[:count]


def shorten(text, limit):
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="a CL_Benchmark-layout directory")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--max-chars", type=int, default=1000)
    a = p.parse_args()
    cuts = [(task, task, 0, None) for task in TASKS] + list(SPLITS)
    for task, source, first, end in cuts:
        with open(os.path.join(a.src, source, "labels.json")) as f:
            labels = json.load(f)[first:end]
        os.makedirs(os.path.join(OUT, task), exist_ok=True)
        for split, count in (("train", a.train), ("test", a.test)):
            with open(os.path.join(a.src, source, f"{split}.json")) as f:
                rows = balanced(json.load(f), labels, count)
            rows = [{"sentence": shorten(r["sentence"], a.max_chars), "label": r["label"]} for r in rows]
            with open(os.path.join(OUT, task, f"{split}.json"), "w") as f:
                json.dump(rows, f, ensure_ascii=False, indent=0)
                f.write("\n")
        with open(os.path.join(OUT, task, "labels.json"), "w") as f:
            json.dump(labels, f, ensure_ascii=False)
            f.write("\n")
        print(task, len(labels), "labels")


if __name__ == "__main__":
    main()
