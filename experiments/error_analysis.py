"""Which class pairs the cross-task errors are made of, per method (or variant), from results.json confusions.

    python experiments/error_analysis.py experiments/runs/split_fashion_mnist_methods --memory 500 [--top 8]

For every run folder under the given folders whose results.json has a `confusion` matrix (and, with --memory,
that buffer size), a test sample of class i predicted as class j counts towards the unordered pair {i, j} when
i and j were in different tasks *in that run* (class orders differ between seeds). Printed as a markdown table:
the pairs with the most such errors over all methods, in percent of the test samples (mean over the runs of a
method), and per label the total cross-task and within-task error. A label is a run folder's name
without `_m<M>_s<seed>` (gsa, er_ace, gsa-two-views-false, ...). Class names are Fashion-MNIST's for that dataset.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}


def runs(folders: list[Path], memory: int | None):
    for folder in folders:
        for path in sorted(folder.rglob("results.json")):
            res = json.loads(path.read_text())
            if res.get("status") != "complete" or res.get("confusion") is None:
                continue
            if memory is not None and res["config"]["buffer"]["size"] != memory:
                continue
            # label: the run folder's name up to "_m<M>_s<seed>" (e.g. gsa, er_ace, gsa-two-views-false)
            yield re.sub(r"_m\d+_s\d+$", "", path.parent.name), res


def cross_task_pairs(res: dict) -> tuple[dict, float, float]:
    """({(i, j): percent of test samples confused between i and j across tasks}, cross %, within %); the two
    totals are the run's own `errors` breakdown."""
    conf = np.asarray(res["confusion"], dtype=np.float64)
    order, n_tasks = res["class_order"], res["config"]["stream"]["n_tasks"]
    per_task = len(order) // n_tasks
    task = {c: k // per_task for k, c in enumerate(order)}
    pairs = defaultdict(float)
    for i, j in zip(*np.nonzero(conf), strict=True):
        if task[int(i)] != task[int(j)]:
            pairs[(min(i, j), max(i, j))] += 100.0 * conf[i, j] / conf.sum()
    errors = res["errors"]
    return pairs, errors["to_newer_task"] + errors["to_older_task"], errors["within_task"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--memory", type=int)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()

    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}; pass sweep folders such as experiments/runs/<table>")
    by_method: dict[str, list] = defaultdict(list)
    dataset = None
    for label, res in runs(args.folders, args.memory):
        by_method[label].append(cross_task_pairs(res))
        dataset = res["config"]["dataset"]["name"]
    if not by_method:
        raise SystemExit(
            f"no complete run with a confusion matrix under {', '.join(map(str, args.folders))}"
            + (f" with buffer size {args.memory}" if args.memory is not None else "")
            + "; results.json has 'confusion' only for runs made since it was added"
        )
    names = CLASS_NAMES.get(dataset)
    label = (lambda c: names[c]) if names else str

    methods = sorted(by_method)
    mean_pairs = {m: defaultdict(float) for m in methods}
    for m in methods:
        for pairs, _, _ in by_method[m]:
            for pair, share in pairs.items():
                mean_pairs[m][pair] += share / len(by_method[m])
    every_pair = {pair for m in methods for pair in mean_pairs[m]}
    top = sorted(every_pair, key=lambda pr: -sum(mean_pairs[m][pr] for m in methods))[: args.top]

    print("| class pair (cross-task errors, % of test samples) | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for i, j in top:
        print(f"| {label(i)} / {label(j)} | " + " | ".join(f"{mean_pairs[m][(i, j)]:.2f}" for m in methods) + " |")
    print(
        "| **all cross-task errors** | "
        + " | ".join(f"**{np.mean([c for _, c, _ in by_method[m]]):.2f}**" for m in methods)
        + " |"
    )
    print(
        "| within-task errors | "
        + " | ".join(f"{np.mean([w for _, _, w in by_method[m]]):.2f}" for m in methods)
        + " |"
    )
    print("| runs | " + " | ".join(str(len(by_method[m])) for m in methods) + " |")


if __name__ == "__main__":
    main()
