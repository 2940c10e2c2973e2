"""Command line of the benchmark: `python -m cil bench [options]` (see `--help` and docs/performance.md)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cil.run.bench.contestants import CONTESTANTS, OURS, packed_runs
from cil.run.machine import machine_info

DEFAULT_BATCHES = {"mnist": 0, "cifar": 20}  # per task; 0 = the whole stream
TEST_PER_CLASS = {"cifar": 200}  # untimed evaluations of a ResNet on a CPU are slow: 2000 test images suffice
QUICK_BATCHES = {"mnist": 100, "cifar": 4}


# ------------------------------------------------------------------------------------------------ one run
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _apply_overrides(cfg, overrides: list[str]) -> None:
    """`key.sub=value` strings (values parsed as JSON when they parse, else kept as text) onto a RunConfig."""
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        obj, *path = [cfg] + key.split(".")
        for part in path[:-1]:
            obj = getattr(obj, part)
        if not hasattr(obj, path[-1]):
            raise SystemExit(f"bench: unknown config key {key!r} in --set")
        setattr(obj, path[-1], value)


def run_one(spec: dict) -> dict:
    """One contestant on one workload in this process; returns the timing, accuracy and memory."""
    import torch

    from cil.core.data.stream import ClassIncrementalStream
    from cil.run.bench.contestants import run_avalanche, run_floor, run_ours, run_packed
    from cil.run.bench.workloads import shorten_stream, subsample_test, workload_config, workload_dataset
    from cil.run.experiment import resolve_device

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    name = spec["contestant"]
    cfg = workload_config(spec["workload"], name if name in OURS else "er", seed=spec["seed"], device=spec["device"])
    _apply_overrides(cfg, spec.get("overrides", []))
    dataset = subsample_test(workload_dataset(spec["workload"], cfg), spec.get("test_per_class"))
    rss_data = _rss_mb()
    if name in OURS:
        out = run_ours(cfg, dataset, spec["batches_per_task"], breakdown=spec.get("timers", False))
    elif packed_runs(name):
        out = run_packed(cfg, dataset, spec["batches_per_task"], packed_runs(name))
    else:
        device = resolve_device(cfg.device)
        stream = ClassIncrementalStream(
            dataset, cfg.stream.n_tasks, cfg.stream.batch_size, cfg.stream.class_order, seed=cfg.seed, device=device
        )
        shorten_stream(stream, spec["batches_per_task"])
        out = (
            run_floor(cfg, stream)
            if name == "floor"
            else run_avalanche(cfg, stream, name, spec["workload"], spec["batches_per_task"])
        )
    out["samples_per_s"] = out["samples"] / out["train_time_s"]
    out["samples_per_cpu_s"] = out["samples"] / out["train_cpu_s"]
    out["rss_after_data_mb"] = rss_data
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if torch.cuda.is_available() and cfg.device != "cpu":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["threads"] = torch.get_num_threads()
    return {**spec, **out}


# ------------------------------------------------------------------------------------------------ many runs
def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "cil", "bench", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {**spec, "error": "\n".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def _group(run: dict) -> str:
    """Summary rows are grouped by workload, and by sweep setting when there is one: 'mnist[buffer.size=200]'."""
    return run["workload"] + (f"[{run['variant']}]" if run.get("variant") else "")


def summarise(runs: list[dict]) -> dict:
    """Medians per (workload, contestant), and ratios paired within each repeat (drift cancels in a pair)."""
    summary: dict[str, dict[str, Any]] = {}
    ok = [r for r in runs if "error" not in r]
    for wl in dict.fromkeys(_group(r) for r in ok if not r.get("profile")):
        rows = [r for r in ok if _group(r) == wl]
        by: dict[str, dict[Any, dict[str, Any]]] = {}  # contestant -> repeat -> run
        profiled: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r.get("profile"):  # instrumented: where the time goes, not how much there is
                profiled.setdefault(r["contestant"], []).append(r)
            else:
                by.setdefault(r["contestant"], {})[r["repeat"]] = r
        summary[wl] = {}
        for name, reps in by.items():
            vals = list(reps.values())
            s = {
                "runs": len(vals),
                "samples": vals[0]["samples"],
                "samples_per_s": statistics.median(v["samples_per_s"] for v in vals),
                "samples_per_s_all": [round(v["samples_per_s"], 1) for v in vals],
                "samples_per_cpu_s": statistics.median(v["samples_per_cpu_s"] for v in vals),
                "samples_per_cpu_s_all": [round(v["samples_per_cpu_s"], 1) for v in vals],
                "train_time_s": statistics.median(v["train_time_s"] for v in vals),
                "final_acc": statistics.median(v["final_acc"] for v in vals),
                "peak_rss_mb": statistics.median(v["peak_rss_mb"] for v in vals),
                "rss_after_data_mb": statistics.median(v["rss_after_data_mb"] for v in vals),
            }
            s["us_per_sample_cpu"] = 1e6 / s["samples_per_cpu_s"]
            if all("task_train_cpu_s" in v and "task_samples" in v for v in vals):
                s.update(_per_task(vals))
            if all("eval_time_s" in v for v in vals):  # ours: evaluation time, outside the training time
                s["eval_time_s"] = statistics.median(v["eval_time_s"] for v in vals)
            if any("peak_cuda_mb" in v for v in vals):
                s["peak_cuda_mb"] = statistics.median(v.get("peak_cuda_mb", 0.0) for v in vals)
            for ref in ("floor", "avalanche_er", "er"):  # vs_er: packed<K> against one run
                for metric, suffix in (("samples_per_s", ""), ("samples_per_cpu_s", "_cpu")):
                    pairs = [reps[k][metric] / by[ref][k][metric] for k in reps if ref in by and k in by[ref]]
                    if pairs and name != ref:
                        s[f"vs_{ref}{suffix}"] = statistics.median(pairs)
            prof = profiled.get(name, [])
            if prof:
                keys = sorted({k for v in prof for k in v["breakdown"]})
                s["breakdown_s"] = {k: statistics.median(v["breakdown"].get(k, 0.0) for v in prof) for k in keys}
                # Per run, then the median: a run's overhead compares times measured under the same load. The
                # timers' own cost counts as overhead here, so this errs on the side of too much.
                s["overhead_over_arithmetic"] = statistics.median(
                    v["train_time_s" if v["device"].startswith("cuda") else "train_cpu_s"]
                    / max(v["breakdown"]["arithmetic"], 1e-9)
                    - 1.0
                    for v in prof
                )
                s["profile_runs"] = len(prof)
            summary[wl][name] = s
    return summary


def _per_task(vals: list[dict]) -> dict:
    """Per-task training time (medians over the runs, task by task), CPU microseconds per sample of each task, and
    the slow-down over the stream: last task's CPU time per sample over the first task's (median over runs)."""
    n_tasks = min(len(v["task_train_cpu_s"]) for v in vals)

    def per_task(key):
        return [statistics.median(v[key][t] for v in vals) for t in range(n_tasks)]

    def us(v, t):
        return 1e6 * v["task_train_cpu_s"][t] / max(v["task_samples"][t], 1)

    out = {
        "task_train_time_s": per_task("task_train_time_s"),
        "task_train_cpu_s": per_task("task_train_cpu_s"),
        "task_samples": vals[0]["task_samples"][:n_tasks],
        "task_us_per_sample_cpu": [statistics.median(us(v, t) for v in vals) for t in range(n_tasks)],
    }
    if n_tasks > 1:
        out["slowdown_last_over_first_cpu"] = statistics.median(us(v, n_tasks - 1) / max(us(v, 0), 1e-12) for v in vals)
    return out


def print_table(summary: dict) -> None:
    for wl, rows in summary.items():
        print(f"\n== {wl} ==")
        print(
            f"{'contestant':<18}{'samples/s':>10}{'vs floor':>9}{'vs av.ER':>9}{'per CPU-s':>10}{'vs floor':>9}"
            f"{'vs av.ER':>9}{'acc %':>7}{'peak RSS MB':>12}{'overhead':>9}{'last/1st':>9}  all samples/s"
        )

        def ratio(s, key):
            return f"{s[key]:.2f}x" if key in s else "-"

        for name, s in rows.items():
            ov = f"{100 * s['overhead_over_arithmetic']:.0f}%" if "overhead_over_arithmetic" in s else "-"
            slow = f"{s['slowdown_last_over_first_cpu']:.2f}x" if "slowdown_last_over_first_cpu" in s else "-"
            print(
                f"{name:<18}{s['samples_per_s']:>10.0f}{ratio(s, 'vs_floor'):>9}{ratio(s, 'vs_avalanche_er'):>9}"
                f"{s['samples_per_cpu_s']:>10.0f}{ratio(s, 'vs_floor_cpu'):>9}"
                f"{ratio(s, 'vs_avalanche_er_cpu'):>9}{s['final_acc']:>7.1f}{s['peak_rss_mb']:>12.0f}{ov:>9}{slow:>9}"
                f"  {s['samples_per_s_all']}"
            )
        for name, s in rows.items():
            if packed_runs(name) and "vs_er" in s:
                print(f"{name}: {s['vs_er']:.2f}x one ER run's samples/s, {s['vs_er_cpu']:.2f}x per CPU-s (all K runs)")
        timed = {name: s for name, s in rows.items() if "task_us_per_sample_cpu" in s}
        if timed:
            print("per task, CPU us per sample (median over runs):")
            for name, s in timed.items():
                print(f"  {name:<26}" + " ".join(f"{u:>8.0f}" for u in s["task_us_per_sample_cpu"]))
    print(
        "\nsamples/s: stream samples per second of training wall time; per CPU-s: per second of the process's CPU "
        "time\n(steadier on a loaded machine); ratios are medians of ratios within a repeat. 'overhead': training "
        "(CPU) time\nover the (CPU) time inside the model's forward passes, backward and optimizer step, "
        "minus 1, from one extra\ninstrumented run (the timed runs carry no timers). 'last/1st': CPU time per "
        "sample of the last task over\nthe first task's (a slow-down over the stream shows as > 1)."
    )


def _write(args, runs: list, load_before: list, started: float) -> dict:
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": _load(),
        "wall_s": time.time() - started,
        "summary": summarise(runs),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cil bench",
        description=__doc__.split("\n")[0]
        + " "
        + (
            "Times the training pass of our loop, a bare PyTorch ER loop (the floor) and Avalanche's online ER/ER-ACE "
            "on Split MNIST (MLP) and Split CIFAR-10 JPEG (reduced ResNet-18), interleaved, and writes JSON."
        ),
    )
    p.add_argument("--workloads", default="mnist,cifar", help="comma list: mnist, cifar, synth<K>, digits")
    p.add_argument(
        "--contestants",
        default="floor,er,er_ace,gsa,avalanche_er,avalanche_er_ace",
        help=f"comma list from {', '.join(CONTESTANTS)}, packed<K> (K ER runs, seeds seed..seed+K-1, stepped together)",
    )
    p.add_argument(
        "--batches-per-task",
        type=int,
        default=None,
        help="stream batches kept per task (0: whole stream); default: mnist whole, cifar 20",
    )
    p.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        help="test images kept per class for the (untimed) accuracy; default: cifar 200, others all",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every run (median reported)")
    p.add_argument(
        "--quick", action="store_true", help="a couple of minutes: 1 repeat, 100 batches per task on mnist, 4 on cifar"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per run (default: torch's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. --set precision=bf16 --set buffer.size=2000",
    )
    p.add_argument(
        "--sweep",
        metavar="KEY=V1,V2,...",
        help="repeat everything for each value of one config key (scaling figures), e.g. "
        "--sweep buffer.size=200,1000,10000; summary rows become 'workload[key=value]'",
    )
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the extra instrumented run of each of our contestants (the timed repeats never "
        "carry timers) that times forward/backward/augment/buffer separately",
    )
    p.add_argument("--out", default="bench_results.json", help="where to write the JSON")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a single run is abandoned")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return 0
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    contestants = [c.strip() for c in args.contestants.split(",") if c.strip()]
    unknown = [c for c in contestants if c not in CONTESTANTS and not packed_runs(c)]
    if unknown:
        print(f"bench: unknown contestant(s) {unknown}; choose from {', '.join(CONTESTANTS)}", file=sys.stderr)
        return 2
    repeats = 1 if args.quick and args.repeats == 3 else args.repeats
    variants = [""]
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        variants = [f"{key}={v}" for v in values.split(",") if v]
        if not key or not variants:
            print(f"bench: --sweep {args.sweep!r} is not KEY=V1,V2,...", file=sys.stderr)
            return 2
    started, load_before = time.time(), _load()
    runs, jobs = [], []
    for rep in range(repeats):
        for wl, variant in [(w, v) for w in workloads for v in variants]:
            if args.batches_per_task is not None:
                bpt = args.batches_per_task
            else:
                bpt = (QUICK_BATCHES if args.quick else DEFAULT_BATCHES).get(wl, 0)
            order = contestants[rep % len(contestants) :] + contestants[: rep % len(contestants)]
            for name in order:
                spec = {
                    "workload": wl,
                    "contestant": name,
                    "repeat": rep,
                    "batches_per_task": bpt,
                    "seed": args.seed,
                    "device": args.device,
                    "threads": args.threads,
                    "test_per_class": args.test_per_class
                    if args.test_per_class is not None
                    else TEST_PER_CLASS.get(wl, 0),
                    "overrides": args.overrides + ([variant] if variant else []),
                    "variant": variant,
                    "timers": False,
                }
                jobs.append((f"{rep + 1}/{repeats}", spec))
    if args.breakdown:  # the timers cost a few percent, so they run apart from the timed repeats
        for spec in [s for _, s in jobs[: len(jobs) // repeats] if s["contestant"] in OURS]:
            jobs.append(("profile", {**spec, "repeat": "profile", "timers": True, "profile": True}))
    for label, spec in jobs:
        t0 = time.time()
        res = _run_child(spec, args.timeout)
        res["load_before"] = _load()
        runs.append(res)
        _write(args, runs, load_before, started)  # a long benchmark stopped early keeps what it measured
        msg = res.get("error") or (
            f"{res['samples_per_s']:.0f} samples/s, acc {res['final_acc']:.1f}%, peak RSS {res['peak_rss_mb']:.0f} MB"
        )
        print(
            f"[{label}] {_group(spec):<7} {spec['contestant']:<17} {msg}  ({time.time() - t0:.0f}s wall, "
            f"load {res['load_before']})",
            flush=True,
        )
    result = _write(args, runs, load_before, started)
    summary = result["summary"]
    print_table(summary)
    print(f"\nload average before {load_before}, after {result['load_after']}; wrote {args.out}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
