"""The real-time mode's delay, measured before the run starts (docs/compute.md).

k = ceil(FLOPs(method step) / FLOPs(reference step)) on the same model, stream and batch size. Both steps are
counted on probes: each method is built afresh on a deep copy of the run's freshly initialised model (its own
optimizer and buffer), fed the run's first stream batches, and its steps in the steady state are counted with
PyTorch's FLOP counter: the buffer holds enough samples for every draw, and the probe is past the first task
boundary (methods whose step changes after the first task, such as GSA's, are counted as they run for most of
the stream). Everything runs under a forked RNG, so the run itself starts exactly as without the probe.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable

import torch

from cil.core.compute import count_flops, delay_from_flops
from cil.core.data.stream import ClassIncrementalStream
from cil.run.config import method_defaults
from cil.schema import RunConfig

PROBE_STEPS = 3  # counted steps per probe (their mean)


def probe_step_flops(method, stream: ClassIncrementalStream, draws: int) -> float:
    """Mean FLOPs of `method`'s step, counted on PROBE_STEPS batches of the second task (the first when there is
    one task), after enough first-task batches that the buffer holds `draws` samples."""
    fill = min(stream.batches_per_task[0], -(-draws // stream.batch_size) + 1)
    start = stream.batches_per_task[0] if stream.n_tasks > 1 else fill
    warm = itertools.islice(stream.batches(0), fill)
    counted = itertools.islice(stream.batches(start), PROBE_STEPS)
    task, flops = -1, []
    for i, batch in enumerate(itertools.chain(warm, counted)):
        if batch.task != task:
            assert batch.task is not None  # the stream's own batch carries its task
            task = batch.task
            method.on_task_start(task, stream.tasks[task].classes)
        if i < fill:
            out = method.observe(batch)
        else:
            out, n = count_flops(functools.partial(method.observe, batch))
            flops.append(n)
        method.remember(batch, out)
    return sum(flops) / len(flops) if flops else 0.0


def measure_delay(
    cfg: RunConfig,
    model: torch.nn.Module,
    dataset,
    stream: ClassIncrementalStream,
    device: torch.device,
    normalize,
    build: Callable,
) -> dict:
    """The delay k and what it came from (results.json `realtime`). `build(method_cfg, addon, model)`: one of our
    methods on `model` (cil.run.experiment.build_native_method)."""
    reference_cfg = method_defaults(cfg.realtime.reference)
    counts = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for key, method_cfg, addon in (("method", cfg.method, cfg.addon), ("reference", reference_cfg, None)):
            method = build(method_cfg, addon, copy.deepcopy(model))
            draws = max([*method_cfg.buffer_draws().values(), 1])
            counts[key] = probe_step_flops(method, stream, draws)
            del method
    delay = delay_from_flops(round(counts["method"]), round(counts["reference"]))
    return {
        "reference": cfg.realtime.reference,
        "delay_source": "measured",
        "delay": delay,
        "method_flops_per_step": counts["method"],
        "reference_flops_per_step": counts["reference"],
    }
