"""Step times of the compiled step and of packed runs: the GPU check's rows for issue 31 (docs/gpu-check.md,
"Graphed steps and packed runs").

- `graphed_row`: one method's ms per step, eager and with `compile_step=reduce-overhead` (CUDA graphs), each timed
  over `timed` steps after `warmup` steps that hold the compilations (their seconds are reported too).
- `packed_rows`: aggregate stream samples/s of K ER runs packed on the device (cil.core.packed), K = 1, 4, 8, 16,
  beside one ordinary run.

`python -m cil.run.step_speed --workload mnist --methods er,gsa --warmup 120 --timed 400 [--mode default]
[--device cuda] [--repeats 2]`: eager and compiled ms per step of a bench workload, interleaved, one JSON line each
(the CPU figures of docs/performance.md, "The compiled step").
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from cil.core.compiled_step import StepCompiler
from cil.schema import RunConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_step(cfg: RunConfig, dataset, warmup: int, timed: int, compiler: StepCompiler | None) -> dict[str, Any]:
    """Seconds of the first `warmup` training steps (compilations, CUDA graph recording) and ms per step of the
    next `timed` (the loop's own `train_batch`: task starts, replay, the step; no evaluation, no read-back)."""
    from cil.run.bench.workloads import shorten_stream
    from cil.run.experiment import build_learner

    cfg = copy.deepcopy(cfg)
    cfg.compute.flops = False  # a FLOP-counted step (a dispatch mode, eager) would sit among the timed ones
    with tempfile.TemporaryDirectory(prefix="cil-step-") as tmp:
        learner = build_learner(cfg, Path(tmp), dataset)
        n_tasks = learner.stream.n_tasks
        shorten_stream(learner.stream, -(-(warmup + timed) // n_tasks) + 1)  # every task reached, as a run would
        if compiler is not None:
            learner.method.use_compiled_step(compiler)
        batches = learner.stream.batches()
        device = learner.device
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            learner.train_batch(next(batches))
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(timed):
            learner.train_batch(next(batches))
        _sync(device)
        t2 = time.perf_counter()
        learner.logger.close()
    return {"warm-up s": t1 - t0, "ms/step": 1e3 * (t2 - t1) / timed}


def graphed_row(
    label: str, cfg: RunConfig, dataset, warmup: int, timed: int, backend: str = "inductor"
) -> dict[str, Any]:
    """Eager against `compile_step=reduce-overhead` for one method's config (`backend`: aot_eager in a dry run)."""
    eager = steady_step(cfg, dataset, warmup, timed, None)
    skips = counters["inductor"]["cudagraph_skips"]
    compiler = StepCompiler("reduce-overhead", backend=backend, device_type=torch.device(cfg.device).type)
    graphed = steady_step(cfg, dataset, warmup, timed, compiler)
    return {
        "method": label,
        "model": cfg.model.name,
        "eager ms/step": round(eager["ms/step"], 2),
        "graphed ms/step": round(graphed["ms/step"], 2),
        "speed-up": round(eager["ms/step"] / graphed["ms/step"], 2),
        "graphed warm-up s": round(graphed["warm-up s"], 1),
        "eager warm-up s": round(eager["warm-up s"], 1),
        "captured": "yes" if compiler.eager_reason is None else f"no: {compiler.eager_reason}",
        "graphs without CUDA graphs": counters["inductor"]["cudagraph_skips"] - skips,
    }


def packed_rows(cfg: RunConfig, dataset, batches_per_task: int, ks: Sequence[int], deadline: float) -> list[dict]:
    """One ordinary run of `cfg`, then K packed runs (seeds seed..seed+K-1) for each K: aggregate samples/s, and
    whether the packed run of the ordinary run's seed ended on its accuracy matrix."""
    from cil.run.bench.contestants import run_ours, run_packed

    rows: list[dict] = []
    ordinary: list[list[float]] = []
    for k in [0, *ks]:  # 0: the ordinary run
        if time.time() > deadline:
            rows.append(
                {"method": cfg.method.name, "runs": k or 1, "packed": k > 0, "samples/s": "skipped: out of time"}
            )
            continue
        res = run_packed(cfg, dataset, batches_per_task, k) if k else run_ours(cfg, dataset, batches_per_task)
        if not k:
            ordinary = res["acc_matrix"]
        row = {
            "method": cfg.method.name,
            "runs": k or 1,
            "packed": k > 0,
            "samples/s": round(res["samples"] / res["train_time_s"], 1),
            "samples/s per run": round(res["samples"] / res["train_time_s"] / (k or 1), 1),
        }
        if k:  # equal, or the first difference (float order: a batch-norm ResNet drifts; docs/performance.md)
            mine = res["acc_matrices"][0]
            row["seed's accuracy matrix as the ordinary run's"] = "yes" if mine == ordinary else f"NO: {mine}"
        rows.append(row)
    base = rows[0]["samples/s"]
    for row in rows:
        if isinstance(row["samples/s"], float) and isinstance(base, float):
            row["vs one run"] = round(row["samples/s"] / base, 2)
    return rows


def main(argv: list[str] | None = None) -> None:
    from cil.run.bench.workloads import workload_config, workload_dataset

    p = argparse.ArgumentParser(prog="python -m cil.run.step_speed", description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="mnist", help="a bench workload: mnist, cifar, digits")
    p.add_argument("--methods", default="er,gsa")
    p.add_argument("--mode", default="default", help="compile_step of the compiled runs")
    p.add_argument("--warmup", type=int, default=120, help="untimed steps first (they hold the compilations)")
    p.add_argument("--timed", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2, help="rounds of eager then compiled")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for method in args.methods.split(","):
        cfg = workload_config(args.workload, method, device=args.device)
        dataset = workload_dataset(args.workload, cfg)
        for repeat in range(args.repeats):
            for mode in ("none", args.mode):
                compiler = StepCompiler(mode, device_type=torch.device(args.device).type) if mode != "none" else None
                row = steady_step(cfg, dataset, args.warmup, args.timed, compiler)
                captured = None if compiler is None else compiler.eager_reason or "yes"
                rows = {"method": method, "compile_step": mode, "repeat": repeat, "captured": captured}
                print(json.dumps({**rows, **{k: round(v, 3) for k, v in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
