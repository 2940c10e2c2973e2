"""Replay memory: preallocated tensors on the device, bookkeeping on the CPU.

Design (add/sample run every stream step, so they must not stall the device):
- Images, labels and task ids live in device tensors with ``capacity + 1`` rows. The extra last row is a
  trash row: a batch item that is not kept is still written, to the trash row, so one ``index_copy_`` with
  a CPU-chosen index tensor stores the whole batch without any masking on the device.
  ``x``/``y``/``task`` are views of the first ``capacity`` rows.
- Every decision (which slot an item goes to, which slots to sample) is made on the CPU with the buffer's own
  ``torch.Generator`` on small int64 mirrors of the task ids and labels; only the finished index tensor moves
  to the device (non_blocking). Filled slots are always the prefix ``[0, len(self))``.
- Task ids arrive as a Python int, so their mirror is exact at once. Labels arrive on the device; with the
  default reservoir policy nothing in ``add`` needs them, so their CPU copy is started asynchronously and
  folded into the mirror later (when finished, or when a label query such as ``classes=`` or
  ``class_counts()`` needs it). The class-balanced policy decides by label, so it copies labels at once
  (a device sync on CUDA; pass CPU labels to avoid it). Pass ``classes=`` as a CPU tensor or a list.
- Reservoir (Vitter's algorithm R) draws for the whole batch at once: item i has stream index j = n_seen + i and
  goes to slot j while j < capacity, else to slot r ~ U{0..j} if r < capacity. When two items of one batch
  pick the same slot the later one wins, as in the sequential algorithm; the earlier one goes to the trash row.
  The slot choice runs on Python ints: for ~10 items that is cheaper than any array op (measured in
  docs/performance.md), and most batches of a long stream keep nothing, so they stop there.
- Class-balanced reservoir (CBRS, Chrysakis & Moens, ICML 2020) is sequential by nature; it loops over the
  batch in Python on CPU ints, which is fine for batches of ~10.
- Extras: a method may keep more per sample than the image, label and task (DER++ keeps the logits it saw).
  ``extras={"logits": ((C,), torch.float32)}`` allocates one more device tensor per name; ``add`` takes them as
  keyword arguments and writes them to the same slots; ``sample_extras`` returns them with the rows.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, TypedDict, Unpack

import numpy as np
import torch
from torch import Tensor

from cil.errors import ConfigError

POLICIES = ("reservoir", "class_balanced")


class SampleFilters(TypedDict, total=False):
    """The filters and draw options of `ReplayBuffer.sample` as keyword arguments (`sample_extras`,
    `Method.replay`)."""

    task: int | None
    exclude_task: int | None
    classes: Tensor | Sequence[int] | None
    replace: bool
    generator: torch.Generator | None


def _later_writer_wins(slots: np.ndarray, trash: int) -> np.ndarray:
    """Route every item whose slot is written again later in the same batch to the trash row."""
    if np.count_nonzero(slots != trash) < 2:  # one real write at most: no collision possible
        return slots
    order = np.argsort(slots, kind="stable")  # stable: equal slots stay in batch order, the last one wins
    ordered = slots[order]
    slots[order[:-1][ordered[:-1] == ordered[1:]]] = trash
    return slots


class ReplayBuffer:
    def __init__(
        self,
        capacity: int | numbers.Integral,  # a numpy integer too; a bool or a float is refused below
        sample_shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        policy: str = "reservoir",
        seed: int = 0,
        dtype: torch.dtype = torch.uint8,
        extras: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ConfigError(
                f"buffer capacity must be an integer >= 1, got {capacity!r}; "
                "set the memory size (e.g. buffer.size=1000)"
            )
        if policy not in POLICIES:
            raise ConfigError(f"unknown buffer policy {policy!r}; valid choices: {', '.join(POLICIES)}")
        self.capacity = capacity = int(capacity)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.device = torch.device(device)
        self.policy = policy
        self.dtype = dtype
        self.n_seen = 0
        self._trash = capacity  # index of the spare row
        self._gen = torch.Generator().manual_seed(seed)

        self._x = torch.zeros((capacity + 1, *self.sample_shape), dtype=dtype, device=self.device)
        self._y = torch.full((capacity + 1,), -1, dtype=torch.long, device=self.device)  # -1 = empty slot
        self._task = torch.full((capacity + 1,), -1, dtype=torch.long, device=self.device)
        self.x, self.y, self.task = self._x[:capacity], self._y[:capacity], self._task[:capacity]
        self._extras = {
            name: torch.zeros((capacity + 1, *shape), dtype=dt, device=self.device)
            for name, (shape, dt) in (extras or {}).items()
        }

        # CPU mirrors, with the trash row too so scatters need no masking. Index arithmetic on ~10 items runs
        # through numpy views of them: a numpy op costs ~1 us, a torch CPU op ~3-5 us of dispatch.
        self._task_cpu = torch.full((capacity + 1,), -1, dtype=torch.long)
        self._y_cpu = torch.full((capacity + 1,), -1, dtype=torch.long)
        self._task_np, self._y_np = self._task_cpu.numpy(), self._y_cpu.numpy()  # share memory
        # (slots, host labels, event or None)
        self._pending_labels: list[tuple[np.ndarray, Tensor, torch.cuda.Event | None]] = []
        # CBRS state: stream count per class, and the classes that are or have been a largest class in memory.
        self._seen_per_class: dict[int, int] = {}
        self._full_classes: set[int] = set()

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    # ---------------------------------------------------------------- add
    def add(self, x: Tensor, y: Tensor, task: int | None, *, y_host: Tensor | None = None, **extras: Tensor) -> None:
        """Offer a batch. ``y_host``: the same labels on the CPU, when the caller has them (the stream does): the
        label mirror is then written at once, so a later label query (``classes=``) never waits for the device."""
        b = x.shape[0]
        if set(extras) != set(self._extras):
            raise ValueError(f"buffer.add expects the extras {sorted(self._extras)}, got {sorted(extras)}")
        if tuple(x.shape[1:]) != self.sample_shape or tuple(y.shape) != (b,):
            raise ValueError(
                f"buffer.add expects x of shape [B, {', '.join(map(str, self.sample_shape))}] and "
                f"y of shape [B]; got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        if x.dtype != self.dtype:
            raise ValueError(f"buffer.add expects x of dtype {self.dtype} (raw images), got {x.dtype}")
        if b == 0:
            return
        task = -1 if task is None else int(task)  # None: a task-free method (blurry stream) does not know it
        if self.policy == "reservoir":
            slots = self._reservoir_slots(self._draw(self.n_seen, b))
            if slots is None:  # nothing kept (most batches once the memory is full): the trash-row writes
                self.n_seen += b  # below would change nothing visible
                return
            self._queue_labels(slots, y if y_host is None else y_host)
        else:
            self._sync_labels()
            slots = self._cbrs_slots(
                (y if y_host is None else y_host).to("cpu").tolist()
            )  # a sync on CUDA: this policy decides by label
        self._task_np[slots] = task
        self.n_seen += b

        idx = torch.from_numpy(slots).to(self.device, non_blocking=True)
        self._x.index_copy_(0, idx, x.to(self.device, non_blocking=True))
        self._y.index_copy_(0, idx, y.to(self.device, dtype=torch.long, non_blocking=True))
        self._task.index_fill_(0, idx, task)
        for name, value in extras.items():
            self._extras[name].index_copy_(0, idx, value.detach().to(self.device, self._extras[name].dtype))

    def _draw(self, first: int, b: int) -> list[int]:
        """r_i uniform in [0, j_i] for the stream indices j_i = first, ..., first + b - 1 (one draw per item,
        used or not)."""
        # 62 random bits modulo j+1: the modulo bias is below j / 2**62, far under anything measurable.
        # Python ints, not numpy: for ~10 items a handful of int operations beats any array op.
        bits = torch.randint(0, 2**62, (b,), generator=self._gen).tolist()
        return [r % (j + 1) for j, r in enumerate(bits, start=first)]

    def _reservoir_slots(self, draws: list[int]) -> np.ndarray | None:
        """Slot of every item of the batch (the trash row for items not kept), or None when none is kept."""
        # slot -> the batch item that writes it last (the later writer wins, as in sequential R)
        owner: dict[int, int] = {}
        for j, r in enumerate(draws, start=self.n_seen):
            slot = j if j < self.capacity else r
            if slot < self.capacity:
                owner[slot] = j - self.n_seen
        if not owner:
            return None
        slots = np.full(len(draws), self._trash, dtype=np.int64)
        slots[list(owner.values())] = list(owner.keys())
        return slots

    def _cbrs_slots(self, labels: list[int]) -> np.ndarray:
        slots = np.full(len(labels), self._trash, dtype=np.int64)
        counts = self._class_counts_cpu()
        stored = self._y_np[: self.capacity]
        for i, c in enumerate(labels):
            if counts:  # CBRS: a class is "full" once it is, or has ever been, a largest class in memory
                largest = max(counts.values())
                self._full_classes.update(k for k, v in counts.items() if v == largest)
            n_c = self._seen_per_class.get(c, 0) + 1
            self._seen_per_class[c] = n_c
            if self.n_seen + i < self.capacity:  # still filling: next free slot
                slot = self.n_seen + i
            else:
                if c not in self._full_classes:
                    # replace a random instance of a largest class
                    cand = np.flatnonzero(np.isin(stored, [k for k, v in counts.items() if v == largest]))
                else:
                    # keep with probability m_c / n_c, replacing a random instance of its own class
                    if float(torch.rand((), generator=self._gen, dtype=torch.float64)) * n_c >= counts.get(c, 0):
                        continue
                    cand = np.flatnonzero(stored == c)
                slot = int(cand[int(torch.randint(len(cand), (), generator=self._gen))])
                counts[int(stored[slot])] -= 1
            counts[c] = counts.get(c, 0) + 1
            stored[slot] = c
            slots[i] = slot
        return _later_writer_wins(slots, self._trash)

    # ---------------------------------------------------------------- label mirror
    def _queue_labels(self, slots: np.ndarray, y: Tensor) -> None:
        if y.device.type == "cpu" and not self._pending_labels:  # nothing to wait for: write the mirror now
            self._y_np[slots] = y.numpy()
            return
        self._sync_labels(block=False)  # fold in copies that already finished; keeps the queue short
        if y.device.type == "cuda":
            host = y.to("cpu", non_blocking=True)  # lands in pinned memory; valid once the event fires
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(y.device))
        else:
            host, event = y.to("cpu", dtype=torch.long, copy=True), None  # copy: the caller may reuse y
        self._pending_labels.append((slots, host, event))

    def _sync_labels(self, block: bool = True) -> None:
        """Apply queued label copies to the CPU mirror, oldest first (so later writes win)."""
        while self._pending_labels:
            slots, host, event = self._pending_labels[0]
            if event is not None:
                if not block and not event.query():
                    return
                event.synchronize()
            self._y_np[slots] = host.numpy()
            self._pending_labels.pop(0)

    def _class_counts_cpu(self) -> dict[int, int]:
        labels, counts = np.unique(self._y_np[: len(self)], return_counts=True)
        return dict(zip(labels.tolist(), counts.tolist(), strict=True))

    # ---------------------------------------------------------------- queries
    def _candidates(
        self, task: int | None, exclude_task: int | None, classes: Tensor | Sequence[int] | None
    ) -> np.ndarray | None:
        """Indices of filled slots matching the filters, or None for 'all filled slots'."""
        n = len(self)
        if task is None and exclude_task is None and classes is None:
            return None
        keep = np.ones(n, dtype=bool)
        if task is not None:
            keep &= self._task_np[:n] == int(task)
        if exclude_task is not None:
            keep &= self._task_np[:n] != int(exclude_task)
        if classes is not None:
            self._sync_labels()
            wanted = torch.as_tensor(classes, dtype=torch.long).to("cpu").numpy()  # pass CPU classes: no sync
            keep &= np.isin(self._y_np[:n], wanted)
        return np.flatnonzero(keep)

    def _sample_index(
        self,
        n: int,
        task: int | None,
        exclude_task: int | None,
        classes: Tensor | Sequence[int] | None,
        replace: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        cand = self._candidates(task, exclude_task, classes)
        available = len(self) if cand is None else len(cand)
        k = min(int(n), available)
        if k <= 0:
            return None
        if replace:
            return self._index_with_replacement(k, available, cand, generator)
        idx = torch.randperm(available, generator=self._gen)[:k]
        if cand is not None:
            idx = torch.from_numpy(cand[idx.numpy()])
        if self.device.type != "cpu":
            idx = idx.to(self.device, non_blocking=True)
        return idx

    def _index_with_replacement(
        self, k: int, available: int, cand: np.ndarray | None, generator: torch.Generator | None
    ) -> Tensor:
        """k slots, each uniform among the `available` candidates (None: the filled prefix), drawn on the device
        from `generator` (the caller's, on the buffer's device), so nothing is read back."""
        if generator is None or generator.device.type != self.device.type:
            raise ValueError(
                f"a draw with replacement needs a generator on the buffer's device ({self.device}), got "
                f"{None if generator is None else generator.device}; pass the method's generator"
            )
        pick = torch.randint(0, available, (k,), generator=generator, device=self.device)
        if cand is None:  # filled slots are the prefix [0, len(self))
            return pick
        return torch.from_numpy(cand).to(self.device, non_blocking=True)[pick]

    def sample(
        self,
        n: int,
        *,
        task: int | None = None,
        exclude_task: int | None = None,
        classes: Tensor | Sequence[int] | None = None,
        replace: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Up to n rows drawn uniformly among filled slots matching all filters: min(n, matching) rows, without
        replacement by default (from the buffer's own generator, on the host); ``replace=True``: as many rows,
        each uniform on its own, so a row can repeat (the add-on papers' ``np.random.choice``), drawn from
        ``generator`` on the buffer's device (the buffer's own generator is then left as it was)."""
        idx = self._sample_index(n, task, exclude_task, classes, replace, generator)
        if idx is None:
            return (self._x.new_empty((0, *self.sample_shape)), self._y.new_empty((0,)), self._task.new_empty((0,)))
        return self._x.index_select(0, idx), self._y.index_select(0, idx), self._task.index_select(0, idx)

    def sample_extras(
        self, n: int, **filters: Unpack[SampleFilters]
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """As `sample` (the same draw from the generator), plus every extra of the drawn rows by name."""
        idx = self._sample_index(
            n,
            filters.get("task"),
            filters.get("exclude_task"),
            filters.get("classes"),
            filters.get("replace", False),
            filters.get("generator"),
        )
        if idx is None:
            idx = torch.zeros(0, dtype=torch.long, device=self.device)
        return (
            self._x.index_select(0, idx),
            self._y.index_select(0, idx),
            self._task.index_select(0, idx),
            {name: t.index_select(0, idx) for name, t in self._extras.items()},
        )

    def count(self, *, task: int | None = None, exclude_task: int | None = None) -> int:
        cand = self._candidates(task, exclude_task, None)
        return len(self) if cand is None else len(cand)

    def class_counts(self) -> dict[int, int]:
        self._sync_labels()
        return self._class_counts_cpu()

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        self._sync_labels()
        n = len(self)
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "sample_shape": self.sample_shape,
            "n_seen": self.n_seen,
            "generator": self._gen.get_state(),
            "x": self._x[:n].to("cpu", copy=True),
            "y": self._y_cpu[:n].clone(),
            "task": self._task_cpu[:n].clone(),
            "seen_per_class": dict(self._seen_per_class),
            "full_classes": sorted(self._full_classes),
            **({"extras": {k: t[:n].to("cpu", copy=True) for k, t in self._extras.items()}} if self._extras else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("policy", "capacity", "sample_shape"):
            mine, theirs = getattr(self, key), state[key]
            if key == "sample_shape":
                theirs = tuple(theirs)
            if mine != theirs:
                raise ConfigError(
                    f"buffer checkpoint has {key}={theirs!r} but this buffer has {key}={mine!r}; "
                    "build the buffer with the checkpoint's settings"
                )
        n = min(int(state["n_seen"]), self.capacity)
        self._pending_labels.clear()
        self._y_cpu.fill_(-1)
        self._task_cpu.fill_(-1)
        self._y_cpu[:n] = state["y"]
        self._task_cpu[:n] = state["task"]
        self._x.zero_()
        self._x[:n] = state["x"].to(self.device)
        self._y.copy_(self._y_cpu.to(self.device))
        self._task.copy_(self._task_cpu.to(self.device))
        self.n_seen = int(state["n_seen"])
        self._gen.set_state(state["generator"])
        self._seen_per_class = {int(k): int(v) for k, v in state["seen_per_class"].items()}
        self._full_classes = {int(c) for c in state["full_classes"]}
        saved = state.get("extras", {})
        if set(saved) != set(self._extras):
            raise ConfigError(
                f"buffer checkpoint has the extras {sorted(saved)} but this buffer keeps "
                f"{sorted(self._extras)}; resume with the method that wrote the checkpoint"
            )
        for name, t in self._extras.items():
            t.zero_()
            t[:n] = saved[name].to(self.device)
