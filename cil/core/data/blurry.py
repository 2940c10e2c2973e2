"""Blurry streams: tasks whose classes overlap and whose boundaries a method is not told (docs/streams.md).

i-Blurry-N-M (Koh et al., ICLR 2022): N % of the classes are *disjoint* (each appears in one task only, spread
evenly over the tasks), the others are *blurry*: each has a home task (again spread evenly) that keeps most of its
samples, and M % of every task's blurry-class samples go to a shared pool that is shuffled and dealt evenly to all
tasks, so a blurry class shows up, rarely, in other tasks too.

Si-Blurry (Moon et al., ICCV 2023): the same two kinds of classes, but how many disjoint and how many blurry classes
each task gets is random (random cut points), and so is how many samples each task gives to the pool.

Both are a precomputed, seeded order of training indices cut into tasks: the stream keeps the interface of
ClassIncrementalStream (tasks, batches(start), batches_per_task, class_task, test_task_ids), so the learner,
checkpoint/resume and the buffer work unchanged. A batch still carries its ground-truth task (for the metrics); the
learner hides it from the methods (`hides_boundaries`). A test sample belongs to the home task of its class (the
task its class is assigned to; for a disjoint class the only task it appears in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cil.core.data.dataset import ImageDataset
from cil.core.data.stream import ClassIncrementalStream, Task, check_test_samples
from cil.errors import ConfigError

KINDS = ("iblurry", "siblurry")
SI_BLURRY_DRAWS = 1000  # redraws of Si-Blurry's class split before giving up on a split with no empty task


def _split_evenly(items: list[int], n: int) -> list[list[int]]:
    size = len(items) // n
    return [items[i * size : (i + 1) * size] for i in range(n)]


def _split_at_random(items: list[int], n: int, g: torch.Generator) -> list[list[int]]:
    """n consecutive parts cut at n-1 sorted cut points drawn uniformly in [0, len(items)) (Si-Blurry's split;
    parts may be empty)."""
    if not items:
        return [[] for _ in range(n)]
    cuts = [0] + torch.randint(0, len(items), (n - 1,), generator=g).sort().values.tolist() + [len(items)]
    return [items[cuts[i] : cuts[i + 1]] for i in range(n)]


def _valid_disjoint_pcts(k: int, n_tasks: int) -> list[int]:
    """The smallest N giving each feasible i-Blurry split (disjoint and blurry classes both divisible by the tasks)."""
    return [-(-100 * d // k) for d in range(0, k + 1, n_tasks) if (k - d) % n_tasks == 0]


class BlurryStream(ClassIncrementalStream):
    """An i-Blurry-N-M (`kind="iblurry"`) or Si-Blurry (`kind="siblurry"`) stream of `n_tasks` tasks.

    `disjoint_class_pct` is N (share of the classes that are disjoint, in percent), `blurry_sample_pct` is M (share
    of the blurry classes' samples spread over all tasks). `order` fixes which classes are disjoint (the first ones)
    and the home tasks, as stream.class_order does for a disjoint stream. Everything is drawn from `seed`."""

    hides_boundaries = True

    def __init__(
        self,
        dataset: ImageDataset,
        n_tasks: int,
        batch_size: int = 10,
        order: str | Sequence[int] = "random",
        seed: int = 0,
        device: str | torch.device = "cpu",
        samples_per_class: int | None = None,
        kind: str = "iblurry",
        disjoint_class_pct: int = 50,
        blurry_sample_pct: int = 10,
    ):
        k = dataset.num_classes
        if kind not in KINDS:
            raise ConfigError(f"stream.kind={kind!r} is not a blurry stream: choose one of {KINDS}")
        if not 0 <= disjoint_class_pct <= 100:
            raise ConfigError(f"stream.disjoint_class_pct={disjoint_class_pct} must be a percentage from 0 to 100")
        if not 0 <= blurry_sample_pct <= 100:
            raise ConfigError(f"stream.blurry_sample_pct={blurry_sample_pct} must be a percentage from 0 to 100")
        if n_tasks < 1 or n_tasks > k:
            raise ConfigError(
                f"stream.n_tasks={n_tasks}: a blurry stream of dataset {dataset.name!r} needs 1 to {k} "
                "tasks (one class at least in each)"
            )
        self.kind = kind
        self._setup(dataset, n_tasks, batch_size, order, seed, device)
        self.disjoint_class_pct, self.blurry_sample_pct = disjoint_class_pct, blurry_sample_pct
        g = torch.Generator().manual_seed(seed + 11)  # the stream's own draws, apart from the disjoint stream's

        n_disjoint = k * disjoint_class_pct // 100
        disjoint, blurry = self.class_order[:n_disjoint], self.class_order[n_disjoint:]
        if kind == "iblurry":
            if k % n_tasks or n_disjoint % n_tasks:
                raise ConfigError(
                    f"stream.disjoint_class_pct={disjoint_class_pct} gives {n_disjoint} disjoint and {k - n_disjoint} "
                    f"blurry classes of {k}, which stream.n_tasks={n_tasks} tasks cannot share evenly (i-Blurry); "
                    f"choose n_tasks dividing {k} and disjoint_class_pct in {_valid_disjoint_pcts(k, n_tasks) or '-'}, "
                    "or stream.kind=siblurry (uneven tasks)"
                )
            disjoint_of, blurry_of = _split_evenly(disjoint, n_tasks), _split_evenly(blurry, n_tasks)
        else:
            for _ in range(SI_BLURRY_DRAWS):  # the official code allows a task without classes; we redraw
                disjoint_of, blurry_of = _split_at_random(disjoint, n_tasks, g), _split_at_random(blurry, n_tasks, g)
                if all(d or b for d, b in zip(disjoint_of, blurry_of, strict=True)):
                    break
            else:
                raise ConfigError(
                    f"stream.n_tasks={n_tasks}: no Si-Blurry split of the {k} classes gave every task a "
                    "class; use fewer tasks"
                )
        self.disjoint_classes, self.blurry_classes = disjoint_of, blurry_of  # per task (home task of blurry ones)

        keep = self._subsample(dataset.train_y, samples_per_class, seed) if samples_per_class is not None else None
        labels = dataset.train_y

        def samples_of(classes: list[int]) -> torch.Tensor:
            inside = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
            idx = torch.nonzero(inside if keep is None else inside & keep).squeeze(1)
            return idx[torch.randperm(len(idx), generator=g)]

        own_disjoint = [samples_of(c) for c in disjoint_of]
        own_blurry = [samples_of(c) for c in blurry_of]
        # How many of its blurry-class samples each task gives to the shared pool.
        if kind == "iblurry":
            give = [len(b) * blurry_sample_pct // 100 for b in own_blurry]
        else:  # a random share per task, M % of all blurry samples in total (capped by what a task has)
            total = sum(len(b) for b in own_blurry) * blurry_sample_pct // 100
            cuts = [0] + torch.randint(0, max(total, 1), (n_tasks - 1,), generator=g).sort().values.tolist() + [total]
            give = [min(cuts[t + 1] - cuts[t], len(own_blurry[t])) for t in range(n_tasks)]
        pool = torch.cat([b[:n] for b, n in zip(own_blurry, give, strict=True)])
        pool = pool[torch.randperm(len(pool), generator=g)]
        self.pool_size = len(pool)  # blurry samples moved to the pool (some land back in their home task)
        if kind == "iblurry":  # dealt evenly; the remainder one each to the first tasks (never dropped)
            base, extra = divmod(len(pool), n_tasks)
            receive = [base + (t < extra) for t in range(n_tasks)]
        else:  # each task receives as many as it gave (Si-Blurry's task sizes come from its classes)
            receive = give
        starts = torch.tensor([0] + receive).cumsum(0).tolist()

        self.tasks: list[Task] = []
        for t in range(n_tasks):
            parts = [own_disjoint[t], own_blurry[t][give[t] :], pool[starts[t] : starts[t + 1]]]
            train_idx = torch.cat(parts)
            train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
            home = [c for c in self.class_order if c in set(disjoint_of[t]) | set(blurry_of[t])]
            classes = torch.tensor(home, dtype=torch.long)
            test_idx = torch.nonzero(torch.isin(dataset.test_y, classes)).squeeze(1)
            if len(train_idx) == 0:
                raise ConfigError(
                    f"task {t} (classes {home}) of the {kind} stream has no training samples in "
                    f"{dataset.name!r}; lower stream.blurry_sample_pct or raise stream.samples_per_class"
                )
            check_test_samples(dataset, t, classes)
            self.tasks.append(
                Task(t, classes.to(self.device), train_idx.to(self.device), train_idx, test_idx.to(self.device))
            )
        self.classes_per_task = max(len(task.classes) for task in self.tasks)  # uneven on a Si-Blurry stream
        self._finish(dataset)
