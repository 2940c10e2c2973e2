"""`python -m cil -m ... hydra/launcher=ray`: each job of a sweep is one Ray task.

With `address: null` the launcher starts a local Ray instance (`num_cpus` CPUs, all of the machine's when null) and
stops it at the end; with `address: auto` or `ray://host:10001` it joins a running cluster (`ray start --head`),
whose nodes need cil installed and the sweep folder on a shared file system. Each task asks Ray for
`cpus_per_job` CPUs and `gpus_per_job` GPUs and runs torch with `cpus_per_job` threads (the `threads` key still
wins), so `num_cpus / cpus_per_job` jobs run at a time.

The jobs behave as with the other launchers (cil/run/sweep.py does the work inside the job): a complete run folder
is skipped, a job that raises writes failed.json and the sweep goes on, and the SweepSummary callback (in this,
the driver process) exits 1 when a run failed. A task whose worker dies (out of memory, killed) gets a failed.json
written here. SIGTERM to the driver (pre-emption) cancels the jobs not yet started and asks the running ones to
stop: each writes its checkpoint and stops, and the command exits 75; the same command with the same
`hydra.sweep.dir` resumes them.

Ray is imported only when a sweep is launched: Hydra imports every plugin module on each start.
"""

import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
PREEMPTED = "preempted"  # what a task returns when it stopped on the driver's request after its checkpoint


@dataclass
class CilRayLauncherConf:
    _target_: str = "hydra_plugins.cil_ray_launcher.ray_launcher.CilRayLauncher"
    address: str | None = None  # null: start a local Ray instance; auto or ray://host:10001: join a cluster
    num_cpus: int | None = None  # CPUs of the local instance (null: all of this machine's); unused with an address
    include_dashboard: bool = False  # the local instance's web dashboard (needs ray[default])
    cpus_per_job: float = 1  # CPUs Ray reserves per job; also torch's thread count in the job
    gpus_per_job: float = 0  # GPUs per job (Ray sets CUDA_VISIBLE_DEVICES); use with device=cuda
    max_retries: int = 0  # Ray re-runs a job whose worker died this many times (a rerun resumes its checkpoint)


# A distinct name: conf/hydra/launcher/ray.yaml selects it, so hydra/launcher=ray stays cil's even where
# another package registers a launcher called `ray`.
ConfigStore.instance().store(
    group="hydra/launcher", name="cil_ray", node=CilRayLauncherConf, provider="cil_ray_launcher"
)


def _import_ray() -> Any:
    from cil.errors import ConfigError

    try:
        import ray
    except ImportError as err:
        raise ConfigError(f"hydra/launcher=ray needs Ray ({err}): pip install 'cil[ray]'") from None
    return ray


def _ask_checkpoint_and_stop(_signum, _frame) -> None:
    """ray.cancel interrupts a running task with SIGINT: turn it into the SIGTERM that makes a run checkpoint."""
    signal.raise_signal(signal.SIGTERM)


def _run_one(
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict,
    threads: int,
    cwd: str,
) -> Any:
    """One job inside a Ray worker (a process Ray reuses between tasks): Hydra's run_job, as the joblib launcher."""
    import torch

    from cil.errors import Preempted
    from cil.run.checkpoint import PENDING_STOP, note_stop

    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(config)
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the config mean what they mean on the command line
    torch.set_num_threads(threads)  # torch's default, one thread per core, oversubscribes a shared node
    PENDING_STOP.clear()  # a stop noted during an earlier task of this worker is not for this one
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, _ask_checkpoint_and_stop),
        signal.SIGTERM: signal.signal(signal.SIGTERM, note_stop),
    }  # before the loop: noted (cil.run.cli)
    try:
        return run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except Preempted as stop:
        log.warning("pre-empted: %s", stop)
        return PREEMPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class CilRayLauncher(Launcher):
    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        include_dashboard: bool = False,
        cpus_per_job: float = 1,
        gpus_per_job: float = 0,
        max_retries: int = 0,
    ) -> None:
        self.address, self.num_cpus, self.include_dashboard = address, num_cpus, include_dashboard
        self.cpus_per_job, self.gpus_per_job, self.max_retries = cpus_per_job, gpus_per_job, max_retries
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def _check(self) -> None:
        from cil.errors import require

        require(self.cpus_per_job > 0, "hydra.launcher.cpus_per_job", self.cpus_per_job, "a number of CPUs > 0")
        require(self.gpus_per_job >= 0, "hydra.launcher.gpus_per_job", self.gpus_per_job, "a number of GPUs >= 0")
        require(
            self.num_cpus is None or self.num_cpus >= self.cpus_per_job,
            "hydra.launcher.num_cpus",
            self.num_cpus,
            f"null (all CPUs) or at least cpus_per_job={self.cpus_per_job}",
        )
        require(self.max_retries >= 0, "hydra.launcher.max_retries", self.max_retries, "0 or more")

    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
            # resolved here, once: a worker would read ${now:...} at its own time, and relative to its own folder
            cfg.hydra.sweep.dir = str(Path(str(cfg.hydra.sweep.dir)).absolute())
            cfg.hydra.sweep.subdir = str(cfg.hydra.sweep.subdir)
        return cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from cil.run.checkpoint import PENDING_STOP, note_stop

        self._check()
        ray = _import_ray()
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        configs = [self._job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        log.info(
            "Ray launcher: %d jobs (%s CPU, %s GPU each), sweep output dir: %s",
            len(configs),
            self.cpus_per_job,
            self.gpus_per_job,
            sweep_dir,
        )
        for i, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))

        started_here = not ray.is_initialized()
        if started_here:
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=self.include_dashboard)
            else:
                ray.init(address=self.address)
        # ray.init installs a native SIGTERM handler that aborts the driver: SIGTERM goes back to cil's, which notes it
        signal.signal(signal.SIGTERM, note_stop)
        try:
            task = ray.remote(_run_one).options(
                num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job, max_retries=self.max_retries
            )
            threads = max(1, int(self.cpus_per_job))
            state = Singleton.get_state()
            refs = {
                task.remote(self.hydra_context, cfg, self.task_function, state, threads, os.getcwd()): i
                for i, cfg in enumerate(configs)
            }
            results: list[Any] = [None] * len(configs)
            pending, stopping = list(refs), False
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
                for ref in done:
                    results[refs[ref]] = self._outcome(ray, ref, configs[refs[ref]])
                if PENDING_STOP and not stopping:  # the driver got SIGTERM (cil.run.cli notes it)
                    stopping = True
                    log.warning("stop requested: cancelling %d job(s); running ones checkpoint first", len(pending))
                    for ref in pending:
                        ray.cancel(ref)
        finally:
            if started_here:
                ray.shutdown()  # a local instance goes with it; a cluster keeps running
        if stopping or any(r == PREEMPTED for r in results):
            from cil.errors import EXIT_PREEMPTED

            print(
                f"pre-empted: the running jobs wrote their checkpoints; to resume, run the same command again with "
                f"hydra.sweep.dir={sweep_dir.absolute()} (exit code {EXIT_PREEMPTED})",
                file=sys.stderr,
            )
            sys.exit(EXIT_PREEMPTED)
        return results

    @staticmethod
    def _outcome(ray: Any, ref: Any, cfg: DictConfig) -> Any:
        """The task's JobReturn; a task that Ray lost (its worker died) becomes failed.json and the sweep goes on."""
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return PREEMPTED
        except ray.exceptions.RayError as err:
            from cil.run.sweep import write_failure
            from cil.runfolder import run_status

            out_dir = Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir
            overrides = list(cfg.hydra.overrides.task)
            if run_status(out_dir) != "complete":
                out_dir.mkdir(parents=True, exist_ok=True)
                path = write_failure(out_dir, err, None, overrides)
                log.error("job %s failed in Ray: %s (details in %s)", ",".join(overrides), type(err).__name__, path)
            ret = JobReturn(overrides=overrides, cfg=cfg, status=JobStatus.COMPLETED)
            ret.return_value = {"status": "failed", "run_dir": str(out_dir), "error": type(err).__name__}
            return ret
