"""The contestants: one training pass over a workload's stream each, timed without evaluation.

- every native method (``er``, ``er_ace``, ``gsa``, ``derpp``, ... : the registry of ``cil.core.methods``): ours,
  through ``cil.run.build_learner`` and ``Learner.run`` (the real loop; its ``train_time_s`` already excludes the
  task-end evaluations, and anytime evaluation is off). ``--set method.<key>=...`` reaches their configs.
- ``floor``: a bare hand-written PyTorch loop doing the same ER math (incoming batch + ``replay_batch_size``
  samples drawn without replacement from a preallocated reservoir, one cross-entropy over the seen classes, one
  SGD/Adam step). No framework, no logging, no checks: the lower bound on what ER can cost.
- ``avalanche_er``: Avalanche's Naive strategy with its ReplayPlugin (reservoir storage policy);
  ``avalanche_er_ace``: Avalanche's ER_ACE; ``avalanche_naive``: Naive without replay. All on Avalanche's own
  classic benchmark (SplitMNIST; Split CIFAR-10 from the JPEG folder through torchvision's ImageFolder and
  ``nc_benchmark``) with our class order and seed, split by ``split_online_stream(experience_size=batch)``,
  stopped after ``batches_per_task`` sub-experiences of every experience, and an evaluator with no metrics and no
  loggers (cil/avalanche/bench.py). The samples are not ours: Avalanche shuffles within each experience with
  its own seeded splitter, so the first N batches of a task are another uniform draw from the same task's
  classes (same classes, same count, same model, optimizer and initialisation); only the order is Avalanche's.
- ``avalanche_er_tensors``, ``avalanche_er_ace_tensors``, ``avalanche_naive_tensors``: the same strategies on
  *our* stream's samples in our order, as float tensor datasets built with a private Avalanche helper (the
  bench's earlier Avalanche rows; its ER memory slows down over the stream, Avalanche's own datasets do not).

Each returns a dict with ``train_time_s``, ``train_cpu_s``, ``task_train_time_s`` and ``task_train_cpu_s``
(per task, so a slow-down over the stream shows), ``samples``, ``final_acc`` (mean over tasks of the accuracy on
each task's test set, argmax over the classes seen, computed after training and outside the timing) and, for
ours, a ``breakdown`` of where the training time went.
"""

from __future__ import annotations

import random
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

from cil.core.data.stream import ClassIncrementalStream
from cil.core.methods import METHODS
from cil.schema import RunConfig

OURS = tuple(METHODS)
AVALANCHE_CLASSIC = ("avalanche_er", "avalanche_er_ace", "avalanche_naive")
AVALANCHE_TENSORS = tuple(f"{n}_tensors" for n in AVALANCHE_CLASSIC)
AVALANCHE = AVALANCHE_CLASSIC + AVALANCHE_TENSORS
CONTESTANTS = OURS + ("floor",) + AVALANCHE
PACKED = "packed"  # packed<K>: K ER runs of the workload (seeds seed..seed+K-1) stepped together (cil.core.packed)


def packed_runs(name: str) -> int:
    """K of a `packed<K>` contestant, else 0."""
    k = name[len(PACKED) :]
    return int(k) if name.startswith(PACKED) and k.isdigit() and int(k) >= 1 else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def final_accuracy(model: torch.nn.Module, stream: ClassIncrementalStream, batch_size: int = 1000, logits=None) -> dict:
    """Per-task test accuracy (percent) after training, argmax over the classes of the stream's tasks.
    `logits`: uint8 images -> evaluation logits (ours: the method's input conversion and evaluation head);
    default: the model on [0, 1] inputs."""
    logits_of = logits or (lambda x: model(x.float().div_(255.0)))
    was_training = model.training
    model.eval()
    seen = torch.zeros(stream.num_classes, dtype=torch.bool, device=stream.device)
    for t in stream.tasks:
        seen[t.classes] = True
    accs = []
    for t in stream.tasks:
        x, y = stream.test_x[t.test_idx], stream.test_y[t.test_idx]
        correct = 0
        for i in range(0, len(y), batch_size):
            with torch.inference_mode():
                logits = logits_of(x[i : i + batch_size]).float()
            correct += int((logits.masked_fill(~seen, float("-inf")).argmax(1) == y[i : i + batch_size]).sum())
        accs.append(100.0 * correct / max(len(y), 1))
    model.train(was_training)
    return {"final_acc": sum(accs) / len(accs), "task_acc": accs}


# ------------------------------------------------------------------------------------------------ ours
class _Timed:
    """Wrap a bound method or callable so its time accumulates under `key`: CPU time of the calling thread on a
    CPU device (steady when other jobs share the cores; all of the work with threads=1), device-synchronised wall
    time on CUDA. thread_time, not process_time: on this VM a process_time call costs ~140 us of wall time,
    thread_time ~0.5 us."""

    def __init__(self, fn, totals: dict, key: str, device: torch.device):
        self.fn, self.totals, self.key, self.device = fn, totals, key, device
        self.clock = time.perf_counter if device.type == "cuda" else time.thread_time

    def __call__(self, *args, **kwargs):
        _sync(self.device)
        start = self.clock()
        out = self.fn(*args, **kwargs)
        _sync(self.device)
        self.totals[self.key] = self.totals.get(self.key, 0.0) + self.clock() - start
        return out


def _evaluation_logits(method):
    def logits(x):
        method.owned.eval()
        try:
            return method.eval_logits(method.to_input(x))
        finally:
            method.owned.train()

    return logits


def _time_modules(modules, totals: dict, key: str, device: torch.device) -> None:
    """Time every call of these modules (forward hooks: however a method calls them) under `key`."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    starts = []

    def before(module, args):
        _sync(device)
        starts.append(clock())

    def after(module, args, output):
        _sync(device)
        totals[key] = totals.get(key, 0.0) + clock() - starts.pop()

    for m in modules:
        m.register_forward_pre_hook(before)
        m.register_forward_hook(after)


def _instrument(method, totals: dict):
    """Time the model's arithmetic (forward passes of the network's body, its head and the method's own modules
    such as projection heads; every backward pass and the optimizer's step) and the method's extras
    (augmentation, buffer) separately; everything else (the method's and its add-ons' own math, e.g. teachers'
    passes or contrastive similarity matrices) is "other". Backward is timed at `Tensor.backward`, not around
    `Method.step`, because add-ons compute their loss terms (with forward passes of their own) inside the step.
    Each timer costs two clock calls (and a sync on CUDA). Returns a function that removes the process-wide
    backward timer."""
    dev = method.device
    model = getattr(method.model, "_orig_mod", method.model)
    body = model.features  # forward() and methods that take features both call it through the instance
    model.features = _Timed(body, totals, "forward", dev)
    _time_modules([model.head, *method.owned.values()], totals, "forward", dev)
    method.optimizer.step = _Timed(method.optimizer.step, totals, "backward_step", dev)
    backward = torch.Tensor.backward
    timed_backward = _Timed(backward, totals, "backward_step", dev)
    torch.Tensor.backward = (  # type: ignore[method-assign]  # the bench times every backward pass
        lambda self, *args, **kwargs: timed_backward(self, *args, **kwargs)
    )
    aug = getattr(getattr(method, "gsa", None), "augment", None)
    if aug is not None:  # the augmentation's stages, however the method calls them (cil.core.augment.PreDrawn)
        for stage in ("draw", "grid", "apply_grid"):
            setattr(aug, stage, _Timed(getattr(aug, stage), totals, "augment", dev))
    if method.buffer is not None:
        for name in ("sample", "sample_extras", "add"):
            setattr(method.buffer, name, _Timed(getattr(method.buffer, name), totals, "buffer", dev))

    def restore():
        torch.Tensor.backward = backward  # type: ignore[method-assign]  # the bench's timer taken out again

    return restore


def _cpu_timed(fn, acc: dict, totals: dict, task_cpu: list | None = None):
    """Time an evaluation in CPU time (to take it out of the training CPU time); the breakdown's timers fire
    inside it too (its forward passes), so their totals are restored afterwards. `task_cpu`: the training CPU
    time at each call (the task ends)."""

    def timed(*args, **kwargs):
        start = time.process_time()
        if task_cpu is not None:
            task_cpu.append(start - acc["cpu0"] - acc["s"])
        saved = dict(totals)
        try:
            return fn(*args, **kwargs)
        finally:
            acc["s"] += time.process_time() - start
            totals.clear()
            totals.update(saved)

    return timed


def run_ours(cfg: RunConfig, dataset, batches_per_task, breakdown: bool = False) -> dict:
    from cil.run.bench.workloads import shorten_stream
    from cil.run.experiment import build_learner

    with tempfile.TemporaryDirectory(prefix="cil-bench-") as tmp:
        learner = build_learner(cfg, Path(tmp), dataset)
        shorten_stream(learner.stream, batches_per_task)
        totals: dict = {}
        restore = _instrument(learner.method, totals) if breakdown else (lambda: None)
        try:
            eval_cpu: dict[str, float] = {"s": 0.0}
            task_ends: list[float] = []
            # the learner times evaluation apart in wall time; here in CPU time (and the CPU time at each task end)
            learner._task_end = _cpu_timed(  # type: ignore[method-assign]  # the bench times it in place
                learner._task_end, eval_cpu, totals, task_ends
            )
            learner._anytime = _cpu_timed(learner._anytime, eval_cpu, totals)  # type: ignore[method-assign]  # timed too
            cpu0 = eval_cpu["cpu0"] = time.process_time()
            res = learner.run()
            train_cpu = time.process_time() - cpu0 - eval_cpu["s"]
        finally:
            restore()
        learner.logger.close()
    out = {
        "train_time_s": res["train_time_s"],
        "train_cpu_s": train_cpu,
        "eval_time_s": res["eval_time_s"],
        "task_train_time_s": res["task_train_time_s"],
        "task_train_cpu_s": [b - a for a, b in pairwise([0.0, *task_ends])],
        "samples": learner.stream.n_samples,
        "task_samples": [len(t.train_idx) for t in learner.stream.tasks],
        "learner_final_avg_acc": res["final_avg_acc"],
        "acc_matrix": res["acc_matrix"],
    }
    if breakdown:  # before the final accuracy below, whose forward passes would fire the timers
        totals = dict(totals)
        totals["arithmetic"] = totals.get("forward", 0.0) + totals.get("backward_step", 0.0)
        total = res["train_time_s"] if learner.device.type == "cuda" else train_cpu
        totals["other"] = total - sum(v for k, v in totals.items() if k != "arithmetic")
        out["breakdown"] = totals
    out.update(final_accuracy(learner.method.model, learner.stream, logits=_evaluation_logits(learner.method)))
    return out


def run_packed(cfg: RunConfig, dataset, batches_per_task, k: int) -> dict:
    """`packed<K>`: K ER runs of the workload, seeds seed..seed+K-1, trained together by `cil.core.packed.PackedRuns`;
    samples, times and accuracy are the K runs' together (accuracy: their mean). Evaluations are timed apart in CPU
    time, as for one run."""
    import copy

    from cil.core.packed import PackedRuns
    from cil.run.bench.workloads import shorten_stream
    from cil.run.experiment import build_learner

    with tempfile.TemporaryDirectory(prefix="cil-bench-") as tmp:
        learners = []
        for i in range(k):
            run_cfg = copy.deepcopy(cfg)
            run_cfg.seed = cfg.seed + i
            learner = build_learner(run_cfg, Path(tmp) / str(i), dataset)
            shorten_stream(learner.stream, batches_per_task)
            learners.append(learner)
        eval_cpu: dict[str, float] = {"s": 0.0}
        for learner in learners:  # the evaluations' CPU time, taken out of the training's
            learner._task_end = _cpu_timed(learner._task_end, eval_cpu, {})  # type: ignore[method-assign]
        packed = PackedRuns(learners)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = packed.run()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        for learner in learners:
            learner.logger.close()
    eval_wall = sum(r["eval_time_s"] for r in results)
    finals = [final_accuracy(ln.method.model, ln.stream, logits=_evaluation_logits(ln.method)) for ln in learners]
    return {
        "train_time_s": wall - eval_wall,
        "train_cpu_s": cpu - eval_cpu["s"],
        "eval_time_s": eval_wall,
        "samples": sum(ln.stream.n_samples for ln in learners),
        "packed_runs": k,
        "acc_matrices": [r["acc_matrix"] for r in results],
        "final_acc": sum(f["final_acc"] for f in finals) / k,
    }


# ------------------------------------------------------------------------------------------------ floor
def _model_and_optimizer(cfg: RunConfig, stream: ClassIncrementalStream):
    from cil.core.models import build_model
    from cil.run.experiment import build_optimizer

    torch.manual_seed(cfg.seed)
    kwargs = {"hidden": tuple(cfg.model.hidden)} if cfg.model.name == "mlp" else {}
    model = build_model(cfg.model.name, stream.dataset.input_shape, stream.num_classes, **kwargs).to(stream.device)
    return model, build_optimizer(cfg, model.parameters())


def run_floor(cfg: RunConfig, stream: ClassIncrementalStream) -> dict:
    """ER as a person would write it with nothing but PyTorch."""
    model, opt = _model_and_optimizer(cfg, stream)
    dev, b, m, r = stream.device, stream.batch_size, cfg.buffer.size, cfg.method.replay_batch_size
    buf_x = torch.zeros((m, *stream.dataset.input_shape), dtype=torch.uint8, device=dev)
    buf_y = torch.zeros(m, dtype=torch.long, device=dev)
    seen = torch.zeros(stream.num_classes, dtype=torch.bool, device=dev)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    n_seen = 0
    task_wall, task_cpu = [], []
    _sync(dev)
    start, cpu0 = time.perf_counter(), time.process_time()
    for task in stream.tasks:
        t0, c0 = time.perf_counter(), time.process_time()
        order = task.train_idx
        for lo in range(0, len(order), b):
            idx = order[lo : lo + b]
            x, y = stream.train_x.index_select(0, idx), stream.train_y.index_select(0, idx)
            seen.index_fill_(0, y, True)
            xb, yb = x, y
            if n_seen:
                pick = torch.randperm(min(n_seen, m), generator=gen)[:r].to(dev)
                xb, yb = torch.cat([x, buf_x.index_select(0, pick)]), torch.cat([y, buf_y.index_select(0, pick)])
            logits = model(xb.float().div_(255.0))
            loss = F.cross_entropy(logits.masked_fill(~seen, float("-inf")), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            slots, rows = [], []  # reservoir sampling (Vitter's R), one Python int per incoming sample
            for i in range(len(idx)):
                j = n_seen + i
                s = j if j < m else rng.randint(0, j)
                if s < m:
                    slots.append(s)
                    rows.append(i)
            n_seen += len(idx)
            if slots:
                slots_t, rows_t = torch.tensor(slots, device=dev), torch.tensor(rows, device=dev)
                buf_x[slots_t] = x[rows_t]
                buf_y[slots_t] = y[rows_t]
        _sync(dev)
        task_wall.append(time.perf_counter() - t0)
        task_cpu.append(time.process_time() - c0)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {
        "train_time_s": elapsed,
        "train_cpu_s": cpu,
        "task_train_time_s": task_wall,
        "task_train_cpu_s": task_cpu,
        "samples": stream.n_samples,
        "task_samples": [len(t.train_idx) for t in stream.tasks],
        **final_accuracy(model, stream),
    }


# ------------------------------------------------------------------------------------------------ Avalanche
def run_avalanche(
    cfg: RunConfig, stream: ClassIncrementalStream, which: str, workload: str = "", batches_per_task=None
) -> dict:
    """Avalanche 0.6's own strategies. ``*_tensors``: on an online stream of our samples in our order; the others:
    on Avalanche's own classic benchmark of `workload` (built before the timing, like our dataset), our class
    order and seed, the first `batches_per_task` online sub-experiences of every experience."""
    from cil.avalanche.bench import classic_benchmark, train_classic, train_online

    model, opt = _model_and_optimizer(cfg, stream)
    if which in AVALANCHE_TENSORS:
        torch.manual_seed(cfg.seed)
        out = train_online(which[: -len("_tensors")], model, opt, stream, cfg.buffer.size, cfg.method.replay_batch_size)
    else:
        from cil.core.data.dataset import data_root

        t0 = time.perf_counter()
        image_folder = Path(cfg.dataset.path) if cfg.dataset.path else None
        bench = classic_benchmark(
            workload, data_root(cfg.dataset.root), stream.class_order, stream.n_tasks, cfg.seed, image_folder
        )
        setup = time.perf_counter() - t0
        torch.manual_seed(cfg.seed)
        out = train_classic(
            which,
            model,
            opt,
            bench,
            stream.device,
            stream.batch_size,
            cfg.buffer.size,
            cfg.method.replay_batch_size,
            batches_per_task,
            cfg.seed,
        )
        out["benchmark_setup_s"] = setup
    return {**out, **final_accuracy(model, stream)}
