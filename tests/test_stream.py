import pytest
import torch

from cil.core.data import ImageDataset
from cil.core.data.stream import ClassIncrementalStream, class_order
from cil.errors import ConfigError


def toy_dataset(num_classes=6, per_class=7, test_per_class=3):
    y = torch.arange(num_classes).repeat_interleave(per_class)
    ty = torch.arange(num_classes).repeat_interleave(test_per_class)
    # each image stores its own index so batches can be traced back to samples
    x = torch.arange(len(y), dtype=torch.int64).view(-1, 1, 1, 1).to(torch.uint8)
    tx = torch.zeros(len(ty), 1, 1, 1, dtype=torch.uint8)
    return ImageDataset("toy", x, y, tx, ty, [f"c{i}" for i in range(num_classes)])


def test_tasks_split_classes_evenly_in_class_order():
    ds = toy_dataset()
    s = ClassIncrementalStream(ds, n_tasks=3, batch_size=4, order=[5, 4, 3, 2, 1, 0])
    assert [t.classes.tolist() for t in s.tasks] == [[5, 4], [3, 2], [1, 0]]
    for t in s.tasks:
        assert set(ds.train_y[t.train_idx].tolist()) == set(t.classes.tolist())
        assert set(ds.test_y[t.test_idx].tolist()) == set(t.classes.tolist())


def test_every_sample_seen_exactly_once_in_task_order():
    ds = toy_dataset()
    s = ClassIncrementalStream(ds, n_tasks=3, batch_size=4, order="natural", seed=1)
    seen, tasks, steps = [], [], []
    for b in s:
        seen += b.x.view(-1).tolist()
        tasks.append(b.task)
        steps.append(b.step)
        assert set(b.y.tolist()) <= set(s.tasks[b.task].classes.tolist())
        assert torch.equal(b.y_host, b.y.cpu())
    assert sorted(seen) == list(range(len(ds.train_y)))
    assert tasks == sorted(tasks)
    assert steps == list(range(len(s)))
    # 14 samples a task, batch 4 -> 4 batches a task, the last one of 2
    assert s.batches_per_task == [4, 4, 4]


def test_random_order_is_seeded_and_within_task_shuffle_depends_on_seed():
    assert class_order(10, "random", 3) == class_order(10, "random", 3)
    assert class_order(10, "random", 3) != class_order(10, "random", 4)
    ds = toy_dataset()
    a = [b.x.view(-1).tolist() for b in ClassIncrementalStream(ds, 3, 4, "natural", seed=0)]
    b = [b.x.view(-1).tolist() for b in ClassIncrementalStream(ds, 3, 4, "natural", seed=0)]
    c = [b.x.view(-1).tolist() for b in ClassIncrementalStream(ds, 3, 4, "natural", seed=1)]
    assert a == b and a != c


def test_resume_from_position_continues_the_same_sequence():
    ds = toy_dataset()
    s = ClassIncrementalStream(ds, 3, 4, "random", seed=2)
    full = [(b.step, b.task, b.x.view(-1).tolist()) for b in s.batches()]
    tail = [(b.step, b.task, b.x.view(-1).tolist()) for b in s.batches(start=5)]
    assert tail == full[5:]


def test_bad_split_and_order_rejected_with_value_named():
    ds = toy_dataset()
    with pytest.raises(ConfigError, match="n_tasks=4"):
        ClassIncrementalStream(ds, n_tasks=4)
    with pytest.raises(ConfigError, match="permutation"):
        ClassIncrementalStream(ds, n_tasks=3, order=[0, 1, 2, 3, 4, 4])
    with pytest.raises(ConfigError, match="bogus"):
        ClassIncrementalStream(ds, n_tasks=3, order="bogus")


def test_samples_per_class_subsamples_each_class_with_a_seed():
    ds = toy_dataset(per_class=7)
    s = ClassIncrementalStream(ds, 3, 4, "natural", seed=0, samples_per_class=3)
    labels = torch.cat([b.y for b in s])
    assert torch.equal(torch.bincount(labels), torch.full((6,), 3))
    again = [b.x.view(-1).tolist() for b in ClassIncrementalStream(ds, 3, 4, "natural", seed=0, samples_per_class=3)]
    assert again == [b.x.view(-1).tolist() for b in s]
    with pytest.raises(ConfigError, match="samples_per_class=0"):
        ClassIncrementalStream(ds, 3, 4, samples_per_class=0)


def test_evaluate_ignores_test_samples_outside_every_task():
    from contextlib import nullcontext
    from types import SimpleNamespace

    from cil.core.learner import evaluate

    class Const(torch.nn.Module):  # always predicts class 0
        def forward(self, x):
            out = torch.zeros(len(x), 2)
            out[:, 0] = 1.0
            return out

    model = Const()
    method = SimpleNamespace(
        model=model,
        seen=torch.tensor([True, True]),
        autocast=nullcontext,
        to_input=lambda x: x.float(),
        owned=torch.nn.ModuleDict(),
        eval_logits=lambda x, head: model(x),
    )
    x = torch.zeros(4, 1, 1, 1, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 0])
    tasks = torch.tensor([0, 0, -1, -1])  # the last two belong to no task: they must not count for task 0
    acc = evaluate(method, x, y, tasks, n_tasks=1, batch_size=3)
    assert acc.tolist() == [50.0]
