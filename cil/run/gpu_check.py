"""`cil gpu-check` (`make gpu-check OUT=DIR`): everything we need to know from a GPU, in one unattended run.

Sections, in order, each written to `report.md` and `report.json` in the output folder as soon as it has a
result (so a run stopped at any point leaves what it measured):
1. environment: Python, torch, torchvision, CUDA, the GPU, Hydra, Avalanche;
2. correctness on CUDA: the same seed twice with `deterministic=true` gives the same accuracy matrix; a run
   killed with SIGKILL and resumed gives the matrix of the uninterrupted one; no host/device synchronisation
   inside a training step (`torch.cuda.set_sync_debug_mode`) for ER, ER-ACE, GSA and GSA's official mode;
3. speed: training samples/s of ER and GSA (and GSA's official mode) with the reduced and the full ResNet-18 on
   the CIFAR-10 JPEG copy, fp32 / bf16 / bf16 + channels_last, and Avalanche's ER where Avalanche is installed;
4. fidelity: the paper's Split CIFAR-10 protocol on the JPEG copy (whole stream, full ResNet-18), GSA at
   M = 500 / 200 / 1000 in the corrected and the official mode, then ER-ACE (separate passes, as its official
   code), several runs at once on the GPU, as many as the measured step times say will finish in the budget.
   At the budget every run still going gets SIGTERM (it checkpoints and says `preempted`, with its step).

`--budget` (seconds, default 480) covers the whole check. Without CUDA it says so in one line and exits 1;
`--dry-run` runs the whole plan at toy size on the CPU (the test suite does). How to read the report:
docs/gpu-check.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cil.run.gpu_plan import (
    STARTUP_S,
    Report,
    RunPool,
    cli_command,
    environment,
    fits,
    last_step,
    seconds_per_step,
    task_end_accuracies,
)
from cil.runfolder import CHECKPOINT, RESULTS, read_json

PUBLISHED = {200: (58.0, 48.9), 500: (64.6, 61.5), 1000: (69.1, 67.6)}  # GSA paper, re-run B (docs/gsa.md)


class Plan:
    """The sizes of everything the check runs: the real ones, or toy ones for --dry-run on the CPU."""

    def __init__(self, dry_run: bool, data_root: str | None):
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.data_root = data_root
        self.dataset = "digits" if dry_run else "cifar10_jpeg"
        self.quick_per_class = 10 if dry_run else 100  # correctness runs: samples per class (10 classes, batch 10)
        self.speed_batches = 1 if dry_run else 40  # speed: batches per task
        self.sync_steps = (3, 2) if dry_run else (30, 20)  # sync check: warm-up steps, checked steps
        self.fidelity_per_class = 6 if dry_run else None  # None: the whole stream
        self.fidelity_memories = (500,) if dry_run else (500, 200, 1000)  # the dry run: one run of each kind
        self.nf = {"reduced_resnet18": 4 if dry_run else None, "resnet18": 4 if dry_run else None}
        self.max_parallel = 3 if dry_run else 6
        # graphs (issue 31): warm-up and timed steps; compile_step's backend (the dry run: capture without codegen)
        self.graph_steps = (3, 2) if dry_run else (30, 60)
        self.compile_backend = "aot_eager" if dry_run else "inductor"
        self.packed_ks = (1, 2) if dry_run else (1, 4, 8, 16)

    def common(self) -> list[str]:
        # fp32: the figures this check records (the paper protocols' own fp16 is a choice of its own)
        out = [f"dataset={self.dataset}", f"device={self.device}", "threads=1", "log.progress=false", "precision=fp32"]
        return out + ([f"dataset.root={self.data_root}"] if self.data_root else [])


# -- runs through the command line ------------------------------------------------------------------------------
def run_cli(overrides: list[str], run_dir: Path, timeout: float) -> dict:
    # A correctness verdict is worth more than its budget share: a slow machine overruns the share (fidelity, which
    # keeps the absolute deadline, then starts fewer runs) rather than losing the verdict.
    proc = subprocess.run(cli_command(overrides, run_dir), capture_output=True, text=True, timeout=max(timeout, 120))
    res = read_json(run_dir / RESULTS)
    if proc.returncode != 0 or res is None:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or proc.stdout[-300:]}")
    return res


# -- 2. correctness -----------------------------------------------------------------------------------------------
def quick_overrides(plan: Plan) -> list[str]:
    nf = plan.nf["reduced_resnet18"]
    return plan.common() + [
        "method=gsa",
        "model=reduced_resnet18",
        *([f"model.nf={nf}"] if nf else []),
        f"stream.samples_per_class={plan.quick_per_class}",
        "buffer.size=200",
        "eval.anytime_every=0",
        "deterministic=true",
        "checkpoint.every=5",
    ]


def correctness_runs(plan: Plan, work: Path, report: Report, deadline: float) -> None:
    ov = quick_overrides(plan)
    a = run_cli(ov, work / "a", deadline - time.time())
    b = run_cli(ov, work / "b", deadline - time.time())
    report.put(
        "correctness",
        "same seed twice, deterministic=true: same accuracy matrix",
        "yes" if a["acc_matrix"] == b["acc_matrix"] else f"NO: {a['acc_matrix']} vs {b['acc_matrix']}",
    )
    # Killed with SIGKILL once a checkpoint past the first one exists, then the same command again.
    run_dir = work / "killed"
    proc = subprocess.Popen(cli_command(ov, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    while proc.poll() is None and time.time() < deadline:
        if (run_dir / CHECKPOINT).exists() and last_step(run_dir) >= plan.quick_per_class // 2:
            proc.send_signal(signal.SIGKILL)
            killed_at = last_step(run_dir)
            break
        time.sleep(0.05)
    proc.wait()
    resumed = run_cli(ov, run_dir, deadline - time.time())
    verdict = "yes" if resumed["acc_matrix"] == a["acc_matrix"] else f"NO: {resumed['acc_matrix']} vs {a['acc_matrix']}"
    report.put(
        "correctness",
        "SIGKILL + resume: same accuracy matrix as uninterrupted",
        f"{verdict} (killed after stream batch {killed_at})"
        if killed_at is not None
        else f"{verdict} (the run ended before it could be killed)",
    )


def sync_check(plan: Plan, dataset, report: Report) -> None:
    """Train-step host/device synchronisations, counted by torch.cuda.set_sync_debug_mode('warn')."""
    from cil.run.config import default_config
    from cil.run.experiment import build_learner

    rows = []
    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("er", "er", {}),
        ("er_ace (separate passes)", "er_ace", {"separate_passes": True}),
        ("gsa", "gsa", {}),
        (
            "gsa (official)",
            "gsa",
            {"crop": "affine", "bn_extra_passes": True, "fresh_head_rows": True, "freeze_head_after_first_task": True},
        ),
        ("gsa (task-free)", "gsa", {"task_free": True}),
        ("gsa (balance=window)", "gsa", {"balance": "window"}),
        ("er_ace (balance=magnitude)", "er_ace", {"balance": "magnitude"}),
        ("derpp", "derpp", {}),
        ("pcr", "pcr", {}),
        # the dry run's toy ResNet has 32 features: the projection heads must be narrower
        ("ocm", "ocm", {"proj_dim": 16} if plan.dry_run else {}),
        ("onpro", "onpro", {"proj_dim": 16} if plan.dry_run else {}),
    ]
    warmup, checked = plan.sync_steps
    for label, name, switches in variants:
        cfg = _config(plan, default_config(name), "reduced_resnet18")
        cfg.method = dataclasses.replace(cfg.method, **switches)
        with tempfile.TemporaryDirectory() as tmp:
            learner = build_learner(cfg, Path(tmp), dataset)
            batches = learner.stream.batches()
            for _ in range(warmup):
                learner.train_batch(next(batches))
            messages = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if plan.device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(checked):
                        learner.train_batch(next(batches))
                finally:
                    if plan.device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
                messages = [
                    str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)
                ]
            learner.logger.close()
        rows.append(
            {
                "method": label,
                "steps checked": checked,
                "syncs": len(messages) if plan.device == "cuda" else "n/a (CPU)",
                "first": messages[0] if messages else "",
            }
        )
        report.put("sync", "host/device syncs inside training steps", rows)


def _config(plan: Plan, cfg, model: str, precision: str = "fp32", channels_last: bool = False):
    cfg.dataset.name, cfg.dataset.root, cfg.dataset.download = plan.dataset, plan.data_root, False
    cfg.model.name, cfg.model.nf = model, plan.nf.get(model)
    cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.weight_decay = (
        "adam",
        1e-3,
        [0.9, 0.99],
        1e-4,
    )
    cfg.device, cfg.precision, cfg.channels_last, cfg.threads = plan.device, precision, channels_last, 1
    cfg.buffer.size, cfg.eval.anytime_every, cfg.log.progress, cfg.checkpoint.at_task_end = 500, 0, False, False
    return cfg


# -- 3. speed ----------------------------------------------------------------------------------------------------
def speed(plan: Plan, dataset, report: Report, deadline: float) -> dict:
    """samples/s of each combination; returns seconds per step of the fidelity runs' settings, for the planner."""
    from cil.run.bench.contestants import run_avalanche, run_ours
    from cil.run.bench.workloads import shorten_stream
    from cil.run.config import default_config

    rows, step_time = [], {}
    run_ours(_config(plan, default_config("er"), "resnet18"), dataset, 1)  # warm-up (CUDA context, kernels): untimed
    combos = [
        (m, model, prec, cl)
        for model in ("reduced_resnet18", "resnet18")
        for m in ("er", "gsa")
        for prec, cl in (("fp32", False), ("bf16", False), ("bf16", True))
    ]
    combos += [("gsa_official", "resnet18", "fp32", False), ("er_ace", "resnet18", "fp32", False)]
    for method, model, prec, cl in combos:
        if time.time() > deadline:
            rows.append(
                {
                    "method": method,
                    "model": model,
                    "precision": prec,
                    "channels_last": cl,
                    "samples/s": "skipped: out of time",
                }
            )
            continue
        cfg = _config(plan, default_config("gsa" if method == "gsa_official" else method), model, prec, cl)
        if method == "gsa_official":
            cfg.method = dataclasses.replace(
                cfg.method, crop="affine", bn_extra_passes=True, fresh_head_rows=True, freeze_head_after_first_task=True
            )
        if method == "er_ace":
            cfg.method = dataclasses.replace(cfg.method, separate_passes=True)
        if method in ("gsa", "gsa_official"):
            cfg.method = dataclasses.replace(cfg.method, replay_batch_size=64)
        res = run_ours(cfg, dataset, plan.speed_batches)
        per_step = seconds_per_step(res, cfg.stream.batch_size)
        rows.append(
            {
                "method": method,
                "model": model,
                "precision": prec,
                "channels_last": cl,
                "samples/s": round(res["samples"] / res["train_time_s"], 1),
                "ms/step": round(1e3 * per_step, 2),
            }
        )
        if model == "resnet18" and prec == "fp32" and not cl:  # the fidelity runs' settings
            step_time[method] = per_step
        report.put("speed", "training samples/s (CIFAR-10 JPEG copy, batch 10, M = 500, one process)", rows)
    if importlib.util.find_spec("avalanche") is None:
        report.put("speed", "Avalanche ER", "skipped: avalanche is not installed here")
    else:
        from cil.core.data.stream import ClassIncrementalStream

        cfg = _config(plan, default_config("er"), "reduced_resnet18")
        stream = shorten_stream(
            ClassIncrementalStream(dataset, 5, 10, "natural", device=plan.device), plan.speed_batches
        )
        res = run_avalanche(cfg, stream, "avalanche_er_tensors")  # our decoded samples: no JPEG decoding timed
        report.put(
            "speed",
            "Avalanche ER on our samples (avalanche_er_tensors; reduced ResNet-18, fp32) samples/s",
            round(res["samples"] / res["train_time_s"], 1),
        )
    return step_time


# -- 3b. graphed steps and packed runs (issue 31; `--only graphs`, not in the default) -----------------------------
def graphs(plan: Plan, dataset, report: Report, deadline: float) -> None:
    """ms per step eager vs CUDA graphs (ER, GSA; ResNet-18, fp32, batch 10) and K packed ER and GSA runs'
    samples/s, in the speed section (cil.run.step_speed)."""
    from cil.run.config import default_config
    from cil.run.step_speed import graphed_row, packed_rows

    model = "mlp" if plan.dry_run else "resnet18"  # the dry run: the toy check of the path, quick to capture
    rows: list[dict] = []
    for method in ("er", "gsa"):
        if time.time() > deadline:
            rows.append({"method": method, "model": model, "eager ms/step": "skipped: out of time"})
        else:
            cfg = _config(plan, default_config(method), model)
            rows.append(graphed_row(method, cfg, dataset, *plan.graph_steps, backend=plan.compile_backend))
        report.put("speed", "ms per step, eager vs compile_step=reduce-overhead (fp32, batch 10, M = 500)", rows)
    packed: list[dict] = []
    for method in ("er", "gsa"):
        cfg = _config(plan, default_config(method), model)
        packed += packed_rows(cfg, dataset, plan.speed_batches, plan.packed_ks, deadline)
        report.put("speed", "runs packed on one device (cil.core.packed): aggregate samples/s", packed)


# -- 4. fidelity --------------------------------------------------------------------------------------------------
def fidelity_queue(plan: Plan) -> list[tuple[str, str, list[str]]]:
    """(label, kind, overrides) in priority order."""
    base = plan.common() + (
        [f"stream.samples_per_class={plan.fidelity_per_class}", "model.nf=4"] if plan.fidelity_per_class else []
    )
    queue = []
    for memory in plan.fidelity_memories:
        queue.append((f"gsa M={memory}", "gsa", ["experiment=gsa_cifar10", *base, f"buffer.size={memory}"]))
        queue.append(
            (
                f"gsa official M={memory}",
                "gsa_official",
                ["experiment=gsa_cifar10_official", *base, f"buffer.size={memory}"],
            )
        )
    for memory in plan.fidelity_memories:
        queue.append(
            (
                f"er_ace M={memory}",
                "er_ace",
                [
                    "experiment=gsa_cifar10",
                    "method=er_ace",
                    "method.separate_passes=true",
                    *base,
                    f"buffer.size={memory}",
                ],
            )
        )
    return queue


def fidelity(plan: Plan, work: Path, report: Report, step_time: dict, deadline: float) -> None:
    work.mkdir(parents=True, exist_ok=True)
    queue = fidelity_queue(plan)
    steps = 5000 if plan.fidelity_per_class is None else plan.fidelity_per_class  # 10 classes, batch 10
    pool = RunPool()
    rows: dict[str, dict] = {label: {"run": label, "status": "queued"} for label, _, _ in queue}

    def publish():
        report.put("fidelity", "Split CIFAR-10 (JPEG copy), full ResNet-18, whole stream, fp32", list(rows.values()))

    def still_needs(run) -> float:  # seconds alone a run going still needs
        done = last_step(run.run_dir)
        return max(0.0, STARTUP_S - (time.time() - run.started)) * (done == 0) + (steps - done) * run.info["s/step"]

    publish()
    margin = 20.0 if not plan.dry_run else 2.0
    stopped = False
    while queue or pool.running:
        now = time.time()
        while queue and len(pool.running) < plan.max_parallel:
            label, kind, overrides = queue.pop(0)
            per_step = step_time.get(kind, max(step_time.values(), default=0.0))  # unmeasured: start it anyway
            estimate = steps * per_step + STARTUP_S
            # Runs share the GPU (gpu_plan): started only if it and every run going still end before the deadline.
            if not fits([still_needs(r) for r in pool.running.values()], estimate, deadline - margin - now):
                rows[label] |= {"status": f"not started: estimated {estimate:.0f} s alone, {deadline - now:.0f} s left"}
                continue
            pool.start(label, overrides, work / label.replace(" ", "_").replace("=", ""), {"s/step": per_step})
            rows[label] |= {"status": "running", "command": "python -m cil " + " ".join(overrides)}
            publish()
        if not stopped and time.time() > deadline - margin:  # out of time: every run still going checkpoints, stops
            pool.stop(grace=margin)
            stopped = True
        for ended in pool.reap():
            rows[ended.key] |= _fidelity_row(ended.key, ended.run_dir, ended.code, ended.seconds, ended.stderr_tail)
            publish()
        time.sleep(0.5)
    publish()


def _fidelity_row(label: str, run_dir: Path, code: int, seconds: float, stderr: str) -> dict:
    res = read_json(run_dir / RESULTS) or {}
    row: dict[str, Any] = {"status": res.get("status", f"exit {code}"), "wall s": round(seconds, 1)}
    if res.get("status") == "complete":
        paper = PUBLISHED.get(res["config"]["buffer"]["size"], (None, None)) if label.startswith("gsa") else (None,) * 2
        row |= {
            "final avg acc %": round(res["final_avg_acc"], 2),
            "forgetting %": round(res["avg_forgetting"], 2),
            "samples/s": round(res["samples_per_s"], 1),
            "GSA paper %": paper[0],
            "re-run B %": paper[1],
            "acc_matrix": [[round(a, 1) for a in r] for r in res["acc_matrix"]],
        }
    elif res.get("status") == "preempted":
        row |= {
            "stopped at stream batch": res.get("step"),
            "of": res.get("stream_batches"),
            "avg acc after each task %": task_end_accuracies(run_dir),
        }
    else:
        row["error"] = res.get("error") or stderr[-300:]
    return row


# -- the whole check ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cil gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="report folder (default gpu-check-<date>-<time>)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--dry-run", action="store_true", help="the whole plan at toy size on the CPU")
    p.add_argument("--data-root", default=os.environ.get("CIL_DATA_ROOT"), help="folder holding cifar10-jpeg/")
    p.add_argument("--max-parallel", type=int, default=None, help="fidelity runs at once (default 6; dry run 3)")
    p.add_argument(
        "--only",
        default="correctness,sync,speed,fidelity",
        help="comma-separated sections to run (default: these four; `graphs`, issue 31's graphed steps and packed "
        "runs, only when named)",
    )
    args = p.parse_args(argv)
    start = time.time()
    deadline = start + args.budget
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False); --dry-run rehearses the plan on "
            "the CPU",
            file=sys.stderr,
        )
        return 1
    plan = Plan(args.dry_run, args.data_root)
    if args.max_parallel:
        plan.max_parallel = args.max_parallel
    out = args.out or Path(time.strftime("gpu-check-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    work.mkdir(exist_ok=True)
    report = Report(out)
    report.put("plan", "budget s", args.budget)
    report.put("environment", "versions", environment(plan.dry_run))
    ok = True

    def section(name: str, fn, *a):
        nonlocal ok
        t0 = time.time()
        try:
            return fn(*a)
        except Exception as err:  # noqa: BLE001 - a failed section is reported; the next one still runs
            ok = False
            report.put(name, "error", f"{type(err).__name__}: {err}")
        finally:
            report.put("timing", f"{name} s", round(time.time() - t0, 1))

    from cil.core.data import load_dataset

    dataset = load_dataset(plan.dataset, plan.data_root, download=False)
    # Budget shares: correctness up to 25 % (four short CLI runs, each paying the process start-up), correctness
    # and speed together up to 45 %; fidelity gets the rest.
    only = set(args.only.split(","))
    if "correctness" in only:
        section("correctness", correctness_runs, plan, work / "correctness", report, start + 0.25 * args.budget)
    if "sync" in only:
        section("sync", sync_check, plan, dataset, report)
    step_time = section("speed", speed, plan, dataset, report, start + 0.45 * args.budget) if "speed" in only else {}
    if "graphs" in only:  # before fidelity, with its share up to 70 % of the budget when fidelity follows
        section("graphs", graphs, plan, dataset, report, start + 0.7 * args.budget if "fidelity" in only else deadline)
    if "fidelity" in only:
        section("fidelity", fidelity, plan, work / "fidelity", report, step_time or {}, deadline)
    report.put("plan", "total s", round(time.time() - start, 1))
    print(f"gpu-check: report in {out / 'report.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
