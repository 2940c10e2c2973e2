"""`python -m cil` / `cil`: the command line (the only module that imports hydra).

`cil <overrides>` runs an experiment: Hydra composes conf/ against the typed schema (cil.run.config, and for
the `method` group each method's own config dataclass), so wrong types and unknown keys fail here, naming the
key; then `run_experiment` does the work in the Hydra run directory. `cil report|plots|bench|gpu-check|demo ...` run the
other tools (a Hydra override always holds `=`, so a bare word is never one).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cil.errors import EXIT_PREEMPTED, CilError, Preempted
from cil.run.checkpoint import note_stop
from cil.run.config_errors import describe, unknown_keys
from cil.run.folder import LOCK
from cil.run.hydra_conf import CONF_DIR, register_schemas
from cil.schema import RunConfig

log = logging.getLogger("cil")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


register_schemas()  # also in launcher workers, which import this module to run the job


def _tidy_failed_run(out_dir: Path) -> None:
    """A run refused before it started leaves no folder that looks like a run: the folder goes only when Hydra's
    log is all it holds (this invocation made it). Nothing else is ever deleted."""
    try:
        entries = list(out_dir.iterdir())
        if all(e.is_file() and (e.suffix == ".log" or e.name == LOCK) for e in entries):
            for e in entries:
                e.unlink()
            out_dir.rmdir()
    except OSError:
        pass


def _record_config(out_dir: Path, dcfg: DictConfig) -> None:
    """.hydra/config.yaml, overrides.yaml and hydra.yaml of an accepted run (Hydra's own writing is off:
    hydra.output_subdir=null, so a refused run cannot overwrite the folder's record of what it ran)."""
    folder = out_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(dcfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), folder / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), folder / "hydra.yaml")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        unknown_keys(dcfg)  # keys added with `+key=value` that the schema does not know
    except CilError as err:
        print(f"error: {err}", file=sys.stderr)
        _tidy_failed_run(out_dir)
        sys.exit(2)
    # typed as any container: the schema makes them a RunConfig and a dict
    cfg = cast(RunConfig, OmegaConf.to_object(dcfg))
    resolved = cast(dict[str, Any], OmegaConf.to_container(dcfg, resolve=True))
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweep job: skip if complete, record a failure, go on
        from cil.run.sweep import run_sweep_job, search_score

        searching = HydraConfig.get().sweeper._target_ != BASIC_SWEEPER  # Optuna & co. ask for one number
        if searching and cfg.eval.split != "validation":
            print(
                f"error: hydra/sweeper={HydraConfig.get().sweeper._target_.rsplit('.', 1)[-1]} with "
                f"eval.split={cfg.eval.split}: a search must not score its trials on the test set; set "
                "eval.split=validation (the search spaces of conf/search/ do)",
                file=sys.stderr,
            )
            _tidy_failed_run(out_dir)
            sys.exit(2)
        result = run_sweep_job(
            cfg,
            out_dir,
            resolved,
            list(HydraConfig.get().overrides.task),
            on_start=lambda: _record_config(out_dir, dcfg),
        )
        return search_score(result, out_dir) if searching else result
    from cil.run.experiment import run_experiment  # after Hydra has parsed the command line: `--help` stays fast

    try:
        results = run_experiment(cfg, out_dir, resolved_config=resolved, on_start=lambda: _record_config(out_dir, dcfg))
    except CilError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        _tidy_failed_run(out_dir)
        sys.exit(2)
    summary = (
        f"final average accuracy {results['final_avg_acc']:.2f}%, forgetting "
        f"{results['avg_forgetting'] if results['avg_forgetting'] is None else round(results['avg_forgetting'], 2)}"
        f"%, anytime {results['anytime_acc']:.2f}%, {results['samples_per_s']:.0f} samples/s"
    )
    if results.get("a_auc") is not None:  # a blurry stream's metrics (docs/streams.md)
        summary += f", A_AUC {results['a_auc']:.2f}%, A_last {results['a_last']:.2f}%"
    log.info("%s", summary)
    print(f"{cfg.method.name} on {cfg.dataset.name}: {summary}\nrun folder: {out_dir}")
    return results


def _tool(name: str) -> Callable[[list[str]], int]:
    """The `main(argv) -> exit code` of a subcommand, imported only when asked for."""
    tool: Callable[[list[str]], int]
    if name == "report":
        from cil.analysis.report import main as tool
    elif name == "plots":
        from cil.analysis.plots import main as tool
    elif name == "bench":
        from cil.run.bench.main import main as tool
    elif name == "gpu-check":
        from cil.run.gpu_check import main as tool
    elif name == "gpu-queue":
        from cil.run.gpu_queue import main as tool
    elif name == "tune":
        from cil.run.tune import main as tune_main

        return lambda argv: tune_main(argv, run_hydra)
    else:
        from cil.run.demo import main as tool
    return tool


SUBCOMMANDS = ("report", "plots", "bench", "gpu-check", "gpu-queue", "demo", "tune")


def cli() -> None:
    """`python -m cil` and the `cil` script: config errors found while Hydra composes the config (wrong type,
    unknown key or group option, bad override syntax) print one `error: ...` line and exit 2, like CilError;
    a run (or sweep) stopped by SIGTERM exits EXIT_PREEMPTED after writing its checkpoint."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(_tool(sys.argv[1])(sys.argv[2:]))
    # SIGTERM outside a run's loop is noted, not fatal: a run being set up stops at its first batch, one that
    # has finished ends with its own exit code. A file-size limit makes writes fail (one clear error) instead of
    # killing the process.
    signal.signal(signal.SIGTERM, note_stop)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        _hydra_command()
    finally:
        # Python gives signals their default action back while it shuts down: a late SIGTERM would then turn
        # this exit code into -15. Nothing is left to stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _hydra_command() -> None:
    """Hydra's command line (sys.argv) in this process: a run or a sweep; errors as one line and an exit code."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra re-raises instead of printing its own report
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        sys.exit(2)
    except CilError as err:  # raised outside a run, e.g. by a launcher (hydra/launcher=ray without Ray)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:  # Hydra's own check of `group=null` (a config group needs an option's name)
        if "Config group override must be" not in str(err):
            raise
        nulls = [a for a in sys.argv[1:] if a.partition("=")[2].lower() in ("null", "~")]
        print(
            f"error: {', '.join(nulls) or 'a config group'} is not an option: a config group takes an option's "
            "name (for no add-on: addon=none)",
            file=sys.stderr,
        )
        sys.exit(2)
    except Preempted as stop:
        log.warning("pre-empted: %s", stop)
        print(f"pre-empted: {stop}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


def run_hydra(args: list[str]) -> int:
    """`python -m cil <args>` (a run, or a sweep with -m) inside this process (cil tune's phases); its exit code."""
    saved = sys.argv
    sys.argv = [saved[0], *args]
    try:
        signal.signal(signal.SIGTERM, note_stop)
        _hydra_command()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()  # the next command initialises Hydra afresh


if __name__ == "__main__":
    cli()
