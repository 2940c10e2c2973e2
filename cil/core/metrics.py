"""The metrics the online-CL literature reports, from an accuracy matrix in percent.

acc[i][j] is the accuracy on task j's test set after training on tasks 0..i (entries j > i are recorded but
unused: those classes are not seen yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt


class ScalarLog(Protocol):
    """Where scalars go (the learner's MetricsLog, the runner's RunLogger): what the diagnostics write to."""

    def scalar(self, key: str, value: float, step: int, task: int | None = None) -> None: ...


def _square(acc: Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] > a.shape[1]:
        raise ValueError(f"accuracy matrix must be [tasks_done, n_tasks], got shape {a.shape}")
    return a


def final_average_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks trained so far, after the last one: mean_j acc[T-1][j], j <= T-1."""
    a = _square(acc)
    t = a.shape[0]
    return float(a[t - 1, :t].mean())


def average_incremental_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Mean over i of the average accuracy on tasks 0..i after task i (Rebuffi et al., iCaRL)."""
    a = _square(acc)
    return float(np.mean([a[i, : i + 1].mean() for i in range(a.shape[0])]))


def average_forgetting(acc: Sequence[Sequence[float]]) -> float | None:
    """Chaudhry et al. (2018): mean over tasks j < T-1 of max_{l < T-1} acc[l][j] - acc[T-1][j].

    None with a single task, where forgetting is undefined.
    """
    a = _square(acc)
    t = a.shape[0]
    if t < 2:
        return None
    drops = [a[j : t - 1, j].max() - a[t - 1, j] for j in range(t - 1)]
    return float(np.mean(drops))


def anytime_accuracy(curve: Sequence[float]) -> float | None:
    """Mean of the average accuracy over seen tasks measured at regular points through the stream."""
    return float(np.mean(curve)) if len(curve) else None


def confusion_matrix(targets: npt.ArrayLike, preds: npt.ArrayLike, num_classes: int) -> np.ndarray:
    """counts[i, j] = test samples of class i predicted as class j (labels are head indices)."""
    t, p = np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def error_breakdown(confusion: np.ndarray, class_task: Sequence[int], tasks_seen: int) -> dict[str, float]:
    """Where the test samples of the seen tasks go, in percent of them (the four parts add up to 100):
    ``correct``; ``within_task`` (a wrong class of the same task); ``to_newer_task`` (a class of a later task:
    the recency bias that GSA's cross-task balancing targets); ``to_older_task`` (a class of an earlier task).

    ``class_task[c]`` is the task of class c (-1: in no task; such rows are left out and such predictions
    cannot occur, since only seen classes are predicted)."""
    task = np.asarray(class_task, dtype=np.int64)
    rows = (task >= 0) & (task < tasks_seen)
    c = confusion[rows]
    true_task, pred_task = task[rows][:, None], task[None, :]
    total = max(int(c.sum()), 1)
    correct = int(np.trace(confusion[np.ix_(rows, rows)]))
    same = int(c[np.broadcast_to(true_task == pred_task, c.shape)].sum()) - correct
    newer = int(c[np.broadcast_to(pred_task > true_task, c.shape)].sum())
    older = int(c[np.broadcast_to((pred_task < true_task) & (pred_task >= 0), c.shape)].sum())
    return {
        "correct": 100.0 * correct / total,
        "within_task": 100.0 * same / total,
        "to_newer_task": 100.0 * newer / total,
        "to_older_task": 100.0 * older / total,
    }


# -- blurry streams (i-Blurry, Si-Blurry): docs/streams.md ----------------------------------------------------------


def area_under_accuracy(samples: Sequence[int], acc: Sequence[float]) -> float | None:
    """A_AUC (Koh et al., ICLR 2022): the area under the curve of accuracy against stream samples seen, divided by
    the samples the curve covers: sum_i acc_i * (n_i - n_{i-1}) / n_last with n_0 = 0, each accuracy standing for
    the samples seen since the point before it. With points every Δn samples this is the mean of the accuracies,
    which is what the official i-Blurry and Si-Blurry code reports. None without points."""
    n = np.asarray(samples, dtype=np.float64)
    a = np.asarray(acc, dtype=np.float64)
    if len(n) == 0:
        return None
    if len(n) != len(a) or np.any(np.diff(n) <= 0) or n[0] <= 0:
        raise ValueError("anytime curve: need increasing positive sample counts, one accuracy each")
    widths = np.diff(np.concatenate([[0.0], n]))
    return float((a * widths).sum() / n[-1])


def class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Accuracy in percent of every class (row) of a confusion matrix; NaN for a class without test samples."""
    c = np.asarray(confusion, dtype=np.float64)
    total = c.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * np.diag(c) / total, np.nan)


def seen_accuracy(confusion: np.ndarray, seen: Iterable[int]) -> float | None:
    """Accuracy in percent over the test samples of the classes `seen` (every sample counts once: A_last when
    taken after the last task). None when those classes have no test samples."""
    c = np.asarray(confusion, dtype=np.float64)
    rows = np.asarray(sorted(seen), dtype=np.int64)
    total = c[rows].sum() if len(rows) else 0.0
    return float(100.0 * c[rows, rows].sum() / total) if total > 0 else None


def class_forgetting(class_acc: Sequence[Sequence[float]]) -> float | None:
    """F_last per class (as the Si-Blurry code computes it): rows are the per-class accuracies after each task
    (NaN: not seen yet, or no test samples); for every class whose best accuracy before the last row is above 0,
    that best minus its last accuracy; their mean. None with fewer than two rows or no such class."""
    a = np.asarray(class_acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        return None
    before = np.where(np.isnan(a[:-1]), -np.inf, a[:-1]).max(0)
    last = np.nan_to_num(a[-1], nan=0.0)
    drops = (before - last)[before > 0]
    return float(drops.mean()) if len(drops) else None
