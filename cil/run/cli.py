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
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cil.errors import EXIT_INTERRUPTED, CilError, Preempted, os_error_text
from cil.run.checkpoint import note_stop
from cil.run.config_errors import describe, unknown_keys
from cil.run.folder import LOCK
from cil.run.hydra_conf import CONF_DIR, register_schemas
from cil.schema import RunConfig

log = logging.getLogger("cil")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


register_schemas()  # also in launcher workers, which import this module to run the job

# The run folder as it was before this command's Hydra made it: {absolute path: {entry name: size in bytes (-1 for a
# folder)}, or None when it did not exist}. Noted by RunFolderBefore: a refused run leaves the folder as it was.
FOLDER_BEFORE: dict[Path, dict[str, int] | None] = {}


class RunFolderBefore(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): notes what the run folder holds before Hydra makes it
    and opens its log there, so that a refused run removes only what it created (`_tidy_failed_run`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            path = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
            FOLDER_BEFORE[path] = (
                {e.name: e.stat().st_size if e.is_file() else -1 for e in path.iterdir()} if path.is_dir() else None
            )
        except Exception:  # noqa: BLE001 - an unresolvable or unreadable path: nothing noted, nothing removed
            pass


def _tidy_failed_run(out_dir: Path) -> None:
    """A run refused before it started leaves the folder as it found it: what this invocation created there
    (Hydra's log, the lock) is removed, a log file that was there gets back its length (the refusal's lines
    appended to it go; they are on the terminal), and the folder goes when the invocation made it. Nothing else is
    touched, and nothing at all when the run got as far as writing its own files (they say what happened), when
    another run holds the folder, or when what was there before is not known (a sweep job)."""
    key = out_dir.absolute()
    if key not in FOLDER_BEFORE:
        return
    noted = FOLDER_BEFORE.pop(key)
    before = noted or {}
    try:
        entries = {e.name: e for e in out_dir.iterdir()}
        created = {name: e for name, e in entries.items() if name not in before}
        if any(not (e.is_file() and (e.suffix == ".log" or name == LOCK)) for name, e in created.items()):
            return
        if LOCK in entries and not _lock_is_free(out_dir / LOCK):
            return  # another run is in the folder (and may have made these files)
        root = logging.getLogger()
        for handler in list(root.handlers):  # this run's log file: closed, so no later record reopens it
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == key:
                root.removeHandler(handler)
                handler.close()
                name = Path(handler.baseFilename).name
                if before.get(name, -1) >= 0 and name in entries:  # the user's file: the appended lines go
                    os.truncate(entries[name], before[name])
        for e in created.values():
            e.unlink()
        if noted is None:  # this invocation made the folder
            out_dir.rmdir()
    except OSError:
        pass


def _lock_is_free(lock: Path) -> bool:
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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
            sweep_dir=Path(HydraConfig.get().sweep.dir),
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
        # this exit code into -15, a late Ctrl-C print a traceback. Nothing is left to stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


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
        why = "interrupted" if stop.exit_code == EXIT_INTERRUPTED else "pre-empted"
        log.warning("%s: %s", why, stop)
        print(f"{why}: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside a run's loop (composing, loading data, between sweep jobs)
        print(
            "interrupted: Ctrl-C before a checkpoint could be written; nothing of a run in progress is lost "
            f"beyond its last checkpoint: the same command resumes it (exit code {EXIT_INTERRUPTED})",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    except OSError as err:  # a path the user gave (run or sweep folder, working directory) that cannot be used
        print(f"error: {_os_error_line(err)}", file=sys.stderr)
        sys.exit(2)


def _os_error_line(err: OSError) -> str:
    try:
        os.getcwd()
    except FileNotFoundError:
        return f"the working directory no longer exists ({err.strerror or err}); cd into an existing folder"
    if err.filename is None:
        return f"{err.strerror or err}; check the run folder (hydra.run.dir, hydra.sweep.dir) and the disk"
    return f"cannot use {os_error_text(err)} (the run folder: hydra.run.dir; a sweep: hydra.sweep.dir)"


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
