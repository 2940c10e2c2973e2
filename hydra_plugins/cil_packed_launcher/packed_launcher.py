"""`python -m cil -m ... hydra/launcher=packed`: the sweep's jobs, `runs_per_pack` at a time, trained together in
this process (cil.run.packed_sweep): runs of a method with a packable step that differ only in settings the packed
step allows (seeds, memory sizes, replay batch sizes, class orders, optimizer settings) share one vmapped step on the
device (cil.core.packed), so a GPU that one batch-10 run leaves waiting on the host does K runs' arithmetic per
launch; each run's own optimizer steps its slice. Jobs that cannot be packed
(other methods, add-ons, compile_step, the real-time mode...) run one after another, as with the basic launcher.

Each job keeps its own folder and files, as with the other launchers: a complete one is skipped, a failed one
writes failed.json and the others go on, SIGTERM makes every run in training write its checkpoint (the command
exits 75; the same command resumes the pack), and the SweepSummary callback reports the sweep. The training-time
log lines of a pack go to its last job's log file (and the console).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class CilPackedLauncherConf:
    _target_: str = "hydra_plugins.cil_packed_launcher.packed_launcher.CilPackedLauncher"
    runs_per_pack: int = 8  # jobs set up together; those that can share a step train as one pack


ConfigStore.instance().store(
    group="hydra/launcher", name="cil_packed", node=CilPackedLauncherConf, provider="cil_packed_launcher"
)


class CilPackedLauncher(Launcher):
    def __init__(self, runs_per_pack: int = 8) -> None:
        from cil.errors import require

        require(runs_per_pack >= 1, "hydra.launcher.runs_per_pack", runs_per_pack, "at least 1 job per pack")
        self.runs_per_pack = runs_per_pack
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from pathlib import Path

        from cil.run.packed_sweep import Pack
        from cil.run.sweep import search_score

        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        searching = self.config.hydra.sweeper._target_ != "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
        log.info(f"Launching {len(job_overrides)} jobs, up to {self.runs_per_pack} trained together")
        runs: list[JobReturn] = []
        for start in range(0, len(job_overrides), self.runs_per_pack):
            pack = Pack()
            returns: list[JobReturn] = []
            with pack.collecting():
                for idx, overrides in enumerate(job_overrides[start : start + self.runs_per_pack], initial_job_idx):
                    idx += start
                    log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                    sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                    with open_dict(sweep_config):
                        sweep_config.hydra.job.id = idx
                        sweep_config.hydra.job.num = idx
                    returns.append(
                        run_job(
                            hydra_context=self.hydra_context,
                            task_function=self.task_function,
                            config=sweep_config,
                            job_dir_key="hydra.sweep.dir",
                            job_subdir_key="hydra.sweep.subdir",
                        )
                    )
            pack.run()  # raises Preempted once every run of the pack has recorded it
            for ret in returns:  # the placeholders of the jobs set up for the pack: their final results
                value = ret.return_value if ret.status == JobStatus.COMPLETED else None
                if isinstance(value, dict) and value.get("status") == "packed":
                    result = pack.results[value["pack_index"]] or {}
                    ret.return_value = search_score(result, Path(value["run_dir"])) if searching else result
            runs.extend(returns)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs
