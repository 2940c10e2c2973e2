"""Weights & Biases for a run (`log.wandb=true`): the scalars RunLogger gets (the same keys as metrics.csv and
TensorBoard, W&B's step = the stream step), the accuracy matrix after each task as a table and a heatmap, the
resolved config, and at the end results.json's numbers as the run's summary and the run's plots as images.

W&B's files go under the run folder (`<run>/wandb/`), so an offline run (`log.wandb_mode=offline`) is synced
later with `wandb sync <run>/wandb/offline-run-*`. The W&B run id is kept in `<run>/wandb_run_id.txt`: a run
resumed from its checkpoint continues the same W&B run (`resume="allow"`). W&B keeps one value per key and step
and refuses steps lower than the last one it holds, so the steps that an interrupted attempt logged after its
checkpoint are not sent again by the resumed attempt (they are skipped here, quietly); on CPU the resumed run
recomputes them bit for bit, so nothing differs. The other way round, steps before the checkpoint that W&B never
received (a killed process loses W&B's unwritten buffer) are sent from metrics.csv when the run resumes. Offline,
the last step an earlier attempt wrote is read back from its own `.wandb` file.

Only imported when log.wandb is on; `wandb` itself is imported here and nowhere else.
"""

from __future__ import annotations

import logging
import secrets
import string
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from cil.errors import EXIT_PREEMPTED, ConfigError, Preempted
from cil.schema import RunConfig

log = logging.getLogger("cil")

RUN_ID_FILE = "wandb_run_id.txt"
INSTALL = "pip install 'cil[wandb]'"


def new_run_id() -> str:
    """8 random lowercase letters and digits, as W&B's own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            f"log.wandb=true needs the wandb package, which is not installed ({err}): {INSTALL}, or set log.wandb=false"
        ) from None
    return wandb


# -- reading W&B's own files (the offline record of earlier attempts; tests) --------------------------------------
_BLOCK = 32768  # a .wandb file is a LevelDB-style log: 32 KiB blocks of records with a 7-byte header each
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[Any]:
    """The `wandb.proto` Records of a `.wandb` file, in order; a record cut short by a kill ends the scan."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, chunks = 7, []  # ":W&B", a 2-byte magic and a version byte
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:  # zeros: padding or a write that never happened
            pos += left
            continue
        body = data[pos + 7 : pos + 7 + length]
        if len(body) < length:
            return
        pos += 7 + length
        chunks.append(body)
        if kind in (_FULL, _LAST):
            record = pb.Record()  # type: ignore[attr-defined]  # protobuf builds its classes at import: no stub
            try:
                record.ParseFromString(b"".join(chunks))
            except Exception:  # noqa: BLE001 - a torn record: what came before is all there is
                return
            chunks = []
            yield record


def history_steps(path: Path) -> list[int]:
    """The `_step` of every history row in a `.wandb` file."""
    steps = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            steps.append(record.history.step.num)
    return steps


def _logged_before(wandb_dir: Path, run_id: str) -> int:
    """One past the highest step that earlier offline attempts of run `run_id` wrote (0: none)."""
    top = -1
    for path in wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        try:
            top = max([top, *history_steps(path)])
        except (OSError, ValueError):
            continue
    return top + 1


class WandbSink:
    """One W&B run for one cil run folder; RunLogger passes it the values it writes to metrics.csv."""

    def __init__(self, run, wandb, first_step: int = 0):
        self.run, self.wandb = run, wandb
        self.first_step = first_step  # W&B already holds every step below this one (an earlier attempt)
        self._row: dict[str, Any] = {}
        self._row_step: int | None = None
        self.last_step = -1
        self.dropped = 0  # values at a step below one already sent (W&B would refuse them)
        self.finished = False

    @classmethod
    def start(cls, cfg: RunConfig, out_dir: Path, config: dict, resuming: bool, group: str | None = None) -> WandbSink:
        """Start (or, `resuming` from a checkpoint, continue) the run folder's W&B run."""
        wandb = import_wandb()
        out_dir = Path(out_dir)
        id_file = out_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else None
        run_id = run_id or new_run_id()
        mode = cfg.log.wandb_mode
        before = _logged_before(out_dir / "wandb", run_id) if resuming else 0
        try:
            run = wandb.init(
                project=cfg.log.wandb_project,
                entity=cfg.log.wandb_entity,
                group=cfg.log.wandb_group or group,
                tags=list(cfg.log.wandb_tags) or None,
                name=out_dir.name,
                config=config,
                dir=str(out_dir),
                id=run_id,
                resume="allow",
                mode=mode,
                reinit="finish_previous",
            )
        except Exception as err:  # noqa: BLE001 - no login, no network, a server that refuses: one clear error
            raise ConfigError(
                f"log.wandb=true: W&B could not start a run ({type(err).__name__}: {err}); log in "
                "with `wandb login`, or set log.wandb_mode=offline (sync later with `wandb sync`) "
                "or log.wandb=false"
            ) from None
        id_file.write_text(run.id + "\n")
        first = max(before, getattr(run, "starting_step", 0) or 0)
        if resuming:
            log.info("W&B run %s continued from step %d", run.id, first)
        return cls(run, wandb, first)

    # -- what RunLogger passes on ------------------------------------------------------------------------------
    def _put(self, key: str, value: Any, step: int) -> None:
        if step < self.first_step or step < self.last_step:
            self.dropped += step >= self.first_step
            return
        if self._row_step is not None and step != self._row_step:
            self._commit()
        self._row_step = step
        self.last_step = step
        self._row[key] = value

    def _commit(self) -> None:
        if self._row:
            self.run.log(self._row, step=self._row_step, commit=True)  # the row is whole: write it now
        self._row = {}

    def scalar(self, key: str, value: float, step: int) -> None:
        self._put(key, value, step)

    def accuracy_matrix(self, matrix: list[list[float]], step: int) -> None:
        if step < self.first_step:
            return
        from cil.analysis.plots import accuracy_matrix_figure, figure_to_rgb  # matplotlib only when W&B is on

        n = len(matrix[0])
        table = self.wandb.Table(
            columns=["after_task", *(f"T{j}" for j in range(n))],
            data=[[i, *map(float, row)] for i, row in enumerate(matrix)],
        )
        title = f"accuracy matrix after task {len(matrix) - 1}"
        self._put("acc_matrix", table, step)
        self._put(
            "acc_matrix_heatmap",
            self.wandb.Image(figure_to_rgb(accuracy_matrix_figure(matrix, title)), caption=title),
            step,
        )

    def replay(self, metrics_csv: Path, acc_matrix: list[list[float]]) -> None:
        """A resumed run: send what the checkpoint already holds but W&B does not (steps from `first_step` on).
        W&B writes its offline file every 15 s and a killed process loses what was not written yet, so the W&B
        run may end before the checkpoint: metrics.csv (already cut back to the checkpoint) and the checkpoint's
        accuracy matrix fill the gap."""
        import csv

        if not Path(metrics_csv).exists():
            return
        task_ends = 0
        with open(metrics_csv, newline="") as f:
            for row in csv.DictReader(f):
                step = int(row["step"])
                self.scalar(row["key"], float(row["value"]), step)
                if row["key"] == "avg_acc_seen" and task_ends < len(acc_matrix):  # logged once per task end
                    task_ends += 1
                    self.accuracy_matrix(acc_matrix[:task_ends], step)
        self._commit()

    # -- the end -------------------------------------------------------------------------------------------------
    def complete(self, results: dict, out_dir: Path) -> None:
        """A finished run: the run's plots are logged, results.json's numbers become the summary, then finish.
        results.json is already written: a W&B failure here is a warning, not a failed run."""
        try:
            with tempfile.TemporaryDirectory(prefix=".cil-plots-", dir=out_dir) as tmp:
                step = max(self.last_step, self.first_step)
                for path in run_plots(Path(out_dir), Path(tmp)):  # W&B copies each image when the row goes out
                    self._put(f"plots/{path.stem}", self.wandb.Image(str(path)), step)
                self._commit()
            summary: dict[str, Any] = {
                k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            summary["status"] = results.get("status")
            self.run.summary.update(summary)
            self._finish(0)
        except Exception as err:  # noqa: BLE001
            log.warning(
                "W&B run %s: the end of the run could not be logged (%s: %s)", self.run.id, type(err).__name__, err
            )
            if not self.finished:
                self.finished = True
                self.run.finish(exit_code=0)

    def __exit__(self, exc_type, err, tb) -> Literal[False]:
        """The run stops before it completes (pushed on the runner's ExitStack): pre-empted (resumable, marked
        so, exit code 75) or failed (exit code 1). The run's own error propagates."""
        if err is None or self.finished:
            return False
        try:
            self._commit()
            if isinstance(err, Preempted):
                self.run.mark_preempting()
                self._finish(EXIT_PREEMPTED)
            else:
                self._finish(1)
        except Exception as late:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("W&B could not finish run %s cleanly: %s", self.run.id, late)
        return False

    def _finish(self, exit_code: int) -> None:
        self.finished = True
        if self.dropped:
            log.warning(
                "W&B: %d value(s) logged at a step below an earlier one were not sent (W&B keeps steps increasing)",
                self.dropped,
            )
        self.run.finish(exit_code=exit_code)


def run_plots(out_dir: Path, tmp: Path) -> list[Path]:
    """The PNGs the run folder holds (the diagnostics' plots when on), and what `cil plots <run folder>` draws of
    it (accuracy matrix, anytime curve, GSA's statistics), drawn into `tmp`."""
    paths = sorted(out_dir.glob("*.png"))
    try:
        from cil.analysis.plots import plot_sections
        from cil.analysis.report import collect_sections

        paths += plot_sections(collect_sections([out_dir]), tmp)
    except Exception as err:  # noqa: BLE001 - a plot that cannot be drawn must not fail a finished run
        log.warning("W&B: the run's plots could not be drawn (%s: %s)", type(err).__name__, err)
    return paths
