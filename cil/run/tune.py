"""`cil tune`: a hyperparameter search on the validation protocol, then the best setting on the test protocol with
several seeds, in one command.

    python -m cil tune search=gsa experiment=split_mnist [--trials 20] [--seeds 0,1,2] [--dir DIR] [overrides]

1. Search: the search space `search=<name>` (conf/search/<name>.yaml: Hydra's Optuna sweeper, its parameter
   ranges, eval.split=validation) runs as a Hydra multirun into DIR/search. Every trial trains on the training set
   minus a held-out 10 % of every class and is scored on that 10 % (final average accuracy); the test set is
   dropped before a trial's stream is built (cil.core.data.holdout_validation), and the command line refuses a
   search scored on it (cil.run.cli).
2. Final: the best trial's parameters (DIR/search/optimization_results.yaml, chosen by Optuna from the validation
   scores alone) run on the full training set and are evaluated on the test set, one run per seed, into DIR/final.

The other overrides apply to both phases (a protocol, a launcher: hydra/launcher=joblib). DIR/tune.json records
the phases; `python -m cil report DIR` shows the trials and the final table. Re-running the same command with the
same --dir skips every finished trial and run (the sampler is seeded, so it proposes the same trials).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cil.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, os_error_text
from cil.run.hydra_conf import CONF_DIR
from cil.runfolder import RESULTS, read_json, write_json_atomic

TUNE_FILE = "tune.json"
SEARCH_SPACES = Path(CONF_DIR) / "search"
SEARCH_DIR, FINAL_DIR = "search", "final"
# Overrides that belong to the search only: the final runs drop them.
SEARCH_ONLY = (
    "search=",
    "hydra/sweeper=",
    "hydra.sweeper.",
    "eval.split=",
    "eval.validation_fraction=",
    "seed=",
    "hydra.sweep.dir=",
)


def final_overrides(overrides: list[str], best_params: dict, method: str, seeds: str, final_dir: Path) -> list[str]:
    """The final phase's command line: the user's overrides without the search's, the search's method, the best
    parameters and the seeds."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(SEARCH_ONLY)]
    if not any(o.startswith("method=") for o in kept):
        kept.append(f"method={method}")
    return kept + [f"{k}={v}" for k, v in best_params.items()] + [f"seed={seeds}", f"hydra.sweep.dir={final_dir}"]


def best_trial(search_dir: Path, started: float = 0.0) -> tuple[dict, float, dict | None]:
    """(best parameters, best validation score, a complete trial's results) of a search finished since `started`
    (Optuna writes optimization_results.yaml at the end of a search: one older than `started` is an earlier
    launch's)."""
    path = search_dir / "optimization_results.yaml"
    try:
        if path.stat().st_mtime < started:
            raise RuntimeError(
                f"the search did not finish: {path} is from an earlier launch, so it says nothing of this one; "
                "see its log above, then run the same command again"
            )
        best = yaml.safe_load(path.read_text())
        return dict(best["best_params"]), float(best["best_value"]), _complete_trial(search_dir)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise RuntimeError(f"the search left no readable {path} ({err}); see its log above") from None


def _complete_trial(search_dir: Path) -> dict | None:
    return next(
        (
            r
            for r in (read_json(p) for p in sorted(search_dir.glob(f"*/{RESULTS}")))
            if r and r.get("status") == "complete"
        ),
        None,
    )


def main(argv: list[str], run_hydra: Callable[[list[str]], int]) -> int:
    p = argparse.ArgumentParser(
        prog="cil tune",
        description=__doc__.split("\n\n")[0],
        epilog="Everything else is a Hydra override (search=<name> is required).",
    )
    p.add_argument("--trials", type=int, help="number of search trials (default: the search space's n_trials)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the final runs (default 0,1,2)")
    p.add_argument("--dir", type=Path, help="where search/ and final/ go (default tune/<date>/<time>_<search>)")
    args, overrides = p.parse_known_args(argv)
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        p.error(f"unknown option(s) {' '.join(flags)}; Hydra overrides take the form key=value")
    search = next((o.split("=", 1)[1] for o in overrides if o.startswith("search=")), None)
    if not search:
        print(
            "error: cil tune needs a search space: search=<name> (conf/search/: "
            f"{', '.join(sorted(s.stem for s in SEARCH_SPACES.glob('*.yaml')))})",
            file=sys.stderr,
        )
        return 2
    if args.trials is not None and args.trials < 1:
        print(f"error: --trials {args.trials} must be >= 1", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        print(
            f"error: --seeds {args.seeds!r} must be a comma-separated list of integers >= 0, e.g. 0,1,2",
            file=sys.stderr,
        )
        return 2
    try:
        out = (args.dir or Path("tune") / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}_{search}").resolve()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot use the tune folder {os_error_text(err)} (--dir)", file=sys.stderr)
        return 2
    search_dir, final_dir = out / SEARCH_DIR, out / FINAL_DIR
    earlier = read_json(out / TUNE_FILE)
    if earlier is not None and earlier.get("search") != search:
        print(
            f"error: {out} holds the tune of search={earlier.get('search')} ({out / TUNE_FILE}); a tune of "
            f"search={search} there would mix their trials and final runs: choose another --dir",
            file=sys.stderr,
        )
        return 2
    record: dict[str, Any] = {
        "command": "python -m cil tune " + " ".join(argv),
        "search": search,
        "search_dir": str(search_dir),
        "final_dir": str(final_dir),
        "seeds": seeds,
        "metric": "final_avg_acc on eval.split=validation",
        "status": "searching",
    }

    search_args = ["-m", *overrides, f"hydra.sweep.dir={search_dir}"]
    if args.trials is not None:
        search_args.append(f"hydra.sweeper.n_trials={args.trials}")
    print(f"[cil tune] search: {' '.join(search_args)}", flush=True)
    started = time.time()
    try:
        write_json_atomic(out / TUNE_FILE, record)  # from here the folder says the search has not finished
    except OSError as err:
        print(f"error: cannot write {os_error_text(err, out / TUNE_FILE)}", file=sys.stderr)
        return 2
    code = run_hydra(search_args)
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):  # stopped: the trials so far are kept, nothing runs on test
        record.update(status="search stopped", search_exit=code)
        _save(out, record)
        print(
            f"[cil tune] the search was stopped (exit code {code}) before all its trials ran: no final phase; the same "
            "command continues it (finished trials are skipped)",
            file=sys.stderr,
        )
        return code
    try:
        best_params, best_value, trial = best_trial(search_dir, started)
    except RuntimeError as err:
        record.update(status="search failed", search_exit=code)
        _save(out, record)
        print(f"error: {err}", file=sys.stderr)
        return code or 1
    if trial is None:
        record.update(status="search failed", search_exit=code)
        _save(out, record)
        print(
            f"error: no trial of the search in {search_dir} completed; nothing to run on the test set", file=sys.stderr
        )
        return code or 1
    record.update(best_params=best_params, best_value=best_value, search_exit=code, status="final phase")
    if not _save(out, record):
        return 2
    print(f"[cil tune] best on validation: {best_value:.2f}% with {best_params}", flush=True)

    final_args = [
        "-m",
        *final_overrides(
            overrides, best_params, trial["config"]["method"]["name"], ",".join(map(str, seeds)), final_dir
        ),
    ]
    print(f"[cil tune] final: {' '.join(final_args)}", flush=True)
    final_code = run_hydra(final_args)
    stopped = final_code in (EXIT_PREEMPTED, EXIT_INTERRUPTED)
    record.update(
        final_command="python -m cil " + " ".join(final_args),
        final_exit=final_code,
        status="final phase stopped" if stopped else "complete",
    )
    if not _save(out, record):
        return 2
    if stopped:
        print(f"[cil tune] the final phase was stopped (exit code {final_code}): the same command continues it")
        return final_code
    print(f"[cil tune] done: python -m cil report {out}")
    return final_code or code


def _save(out: Path, record: dict[str, Any]) -> bool:
    """tune.json; False (and the error on stderr) when it cannot be written."""
    try:
        write_json_atomic(out / TUNE_FILE, record)
        return True
    except OSError as err:
        print(f"error: cannot write {os_error_text(err, out / TUNE_FILE)}", file=sys.stderr)
        return False
