"""Where a run's numbers go while it runs: metrics.csv always (long format: step, task, key, value), and
TensorBoard and Weights & Biases when enabled (the loop's MetricsLog). Values arrive already on the host; nothing
here touches the device. Also the diagnostics' files at the end of a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from cil.core.learner import MetricsLog
from cil.errors import StorageError
from cil.run.folder import write
from cil.runfolder import METRICS

HEADER = ["step", "task", "key", "value"]


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
        write(self.out_dir, lambda p: p.mkdir(parents=True, exist_ok=True))
        self._path = self.out_dir / METRICS
        self._rows: list[list[Any]] = []  # written at each flush, the file opened only then: none is left open
        if not resume:
            write(self._path, self._start)
        else:  # a resumed run appends; a file lost or emptied since the checkpoint gets its header back first
            write(self._path, self._header_back)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: it is slow to load

            # purge_step: a resumed run hides the events an interrupted attempt logged after its checkpoint
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)

    @staticmethod
    def _start(path: Path) -> None:
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(HEADER)

    @classmethod
    def _header_back(cls, path: Path) -> None:
        header = ",".join(HEADER)
        try:
            with open(path, newline="") as f:
                head = f.read(len(header) + 2)
        except FileNotFoundError:
            head = ""
        if head.startswith((header + "\n", header + "\r\n")):
            return
        if header.startswith(head.rstrip("\r\n")):  # empty, or cut inside the header: the header alone
            cls._start(path)
            return
        with open(path, newline="") as f:  # rows without a header above them (cut from the top): put it back
            text = f.read()
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(HEADER)
            f.write(text)

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
        """Append the rows logged since the last flush; a full disk or a lost folder is a StorageError naming
        metrics.csv (the rows are dropped: the run fails, and a resume rewrites them from its checkpoint)."""
        if self._rows:
            rows, self._rows = self._rows, []

            def append(path: Path) -> None:
                with open(path, "a", newline="") as f:
                    csv.writer(f).writerows(rows)

            write(self._path, append)
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
    write(path, lambda p: p.write_text(json.dumps(series)))
    written = [path]
    if plots:
        from cil.analysis.diagnostics_plots import plot_run  # matplotlib only when plotting

        try:
            written += plot_run(series, Path(out_dir))
        except OSError as err:
            raise StorageError(Path(err.filename or out_dir), err) from None
    return written
