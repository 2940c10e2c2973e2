"""Compute accounting: the FLOPs of a training step, counted by PyTorch's own counter
(`torch.utils.flop_counter.FlopCounterMode`), and the real-time schedule (Ghunaim et al., CVPR 2023) that says
which stream batches a method slower than the stream trains on. docs/compute.md has the definitions.

The counter is a dispatch mode: it sees every operator the step runs (forward and backward) and adds the FLOPs of
the ones it has a formula for (matrix products, convolutions, attention), never elementwise ops, reductions or
optimizer updates. It only reads shapes, so it changes no value and reads nothing back from the device; but it
costs Python time on every operator, so the learner counts a few sampled steps only (`FlopMeter`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")
COUNTER = "torch.utils.flop_counter.FlopCounterMode"  # what results.json's flops.method names


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run `fn()` under PyTorch's FLOP counter: (its result, the FLOPs of everything it ran, backward included)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


class FlopMeter:
    """Which trained batches are counted, and what was counted. Trained batch i (0-based, counted over the batches
    the method trains on) is counted when i % every == every // 2: mid-interval, so the first, cheaper steps
    (an empty buffer) are not over-represented and a run of `every` trained batches has one count."""

    def __init__(self, every: int):
        self.every = every
        self.samples: list[int] = []  # FLOPs of each counted step, in stream order

    def due(self, trained_index: int) -> bool:
        return self.every > 0 and trained_index % self.every == self.every // 2

    def summary(self, trained_batches: int, stream_samples: int) -> dict[str, float | int | str | None] | None:
        """results.json `flops`: the mean over the counted steps, per trained step and per stream sample, and the
        run's total estimated as mean x trained batches."""
        if self.every <= 0:
            return None
        per_step = sum(self.samples) / len(self.samples) if self.samples else None
        total = None if per_step is None else per_step * trained_batches
        return {
            "per_step": per_step,
            "per_sample": None if total is None else total / max(stream_samples, 1),
            "total": total,
            "measured_steps": len(self.samples),
            "method": COUNTER,
        }


def trains(step: int, delay: int) -> bool:
    """Real-time schedule: with delay k the method trains on stream batches 0, k, 2k, ...; the k-1 batches that
    arrive while it trains are predicted (online accuracy) but neither trained on nor stored in the buffer."""
    return step % delay == 0


def trained_batches(steps: int, delay: int) -> int:
    """Batches trained on among the first `steps` stream batches."""
    return -(-steps // delay)


def delay_from_flops(method_flops: int, reference_flops: int) -> int:
    """k = ceil(FLOPs(method step) / FLOPs(reference step)), at least 1 (a method cheaper than the reference keeps
    up with the stream)."""
    if reference_flops <= 0:
        return 1
    return max(1, -(-int(method_flops) // int(reference_flops)))
