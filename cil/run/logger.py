"""Where a run's numbers go while it runs: metrics.csv always (long format: step, task, key, value), and
TensorBoard and Weights & Biases when enabled (the loop's MetricsLog). Values arrive already on the host; nothing
here touches the device. Also the diagnostics' files at the end of a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from cil.core.learner import MetricsLog
from cil.runfolder import METRICS


class RunLogger(MetricsLog):
    def __init__(
        self,
        out_dir: Path,
        tensorboard: bool = False,
        resume: bool = False,
        purge_step: int | None = None,
        wandb: Any | None = None,
    ):
        self.wandb = wandb  # a started cil.run.wandb_log.WandbSink (the runner finishes it), or None
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.out_dir / METRICS
        self._rows: list[list[Any]] = []  # written at each flush, the file opened only then: none is left open
        if not (resume and self._path.exists()):
            with open(self._path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "task", "key", "value"])
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: it is slow to load

            # purge_step: a resumed run hides the events an interrupted attempt logged after its checkpoint
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def scalar(self, key: str, value: float, step: int, task: int | None = None) -> None:
        self._rows.append([step, "" if task is None else task, key, f"{value:.6g}"])
        if self._tb is not None:
            self._tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.scalar(key, value, step)

    def accuracy_matrix(self, matrix: list[list[float]], step: int) -> None:
        if self.wandb is not None:
            self.wandb.accuracy_matrix(matrix, step)
        if self._tb is None:
            return
        rows = [
            "| after task | " + " | ".join(f"T{j}" for j in range(len(matrix[0]))) + " |",
            "|---" * (len(matrix[0]) + 1) + "|",
        ]
        rows += [f"| {i} | " + " | ".join(f"{a:.1f}" for a in row) + " |" for i, row in enumerate(matrix)]
        self._tb.add_text("acc_matrix", "\n".join(rows), step)
        from cil.analysis.plots import accuracy_matrix_figure, figure_to_rgb  # matplotlib only when TensorBoard is on

        image = figure_to_rgb(accuracy_matrix_figure(matrix, f"accuracy matrix after task {len(matrix) - 1}"))
        self._tb.add_image("acc_matrix", image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._rows:
            with open(self._path, "a", newline="") as f:
                csv.writer(f).writerows(self._rows)
            self._rows.clear()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()


def save_diagnostics(series: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write diagnostics.json (cil.core.diagnostics.Diagnostics.series) and, with `plots`, its PNGs into the run
    folder; returns the files written."""
    path = Path(out_dir) / "diagnostics.json"
    path.write_text(json.dumps(series))
    written = [path]
    if plots:
        from cil.analysis.diagnostics_plots import plot_run  # matplotlib only when plotting

        written += plot_run(series, Path(out_dir))
    return written
