"""The metrics the online-CL literature reports, from an accuracy matrix in percent.

acc[i][j] is the accuracy on task j's test set after training on tasks 0..i (entries j > i are recorded but
unused: those classes are not seen yet).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _square(acc: Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] > a.shape[1]:
        raise ValueError(f"accuracy matrix must be [tasks_done, n_tasks], got shape {a.shape}")
    return a


def final_average_accuracy(acc) -> float:
    """Mean accuracy over all tasks trained so far, after the last one: mean_j acc[T-1][j], j <= T-1."""
    a = _square(acc)
    t = a.shape[0]
    return float(a[t - 1, :t].mean())


def average_incremental_accuracy(acc) -> float:
    """Mean over i of the average accuracy on tasks 0..i after task i (Rebuffi et al., iCaRL)."""
    a = _square(acc)
    return float(np.mean([a[i, :i + 1].mean() for i in range(a.shape[0])]))


def average_forgetting(acc) -> Optional[float]:
    """Chaudhry et al. (2018): mean over tasks j < T-1 of max_{l < T-1} acc[l][j] - acc[T-1][j].

    None with a single task, where forgetting is undefined.
    """
    a = _square(acc)
    t = a.shape[0]
    if t < 2:
        return None
    drops = [a[j:t - 1, j].max() - a[t - 1, j] for j in range(t - 1)]
    return float(np.mean(drops))


def anytime_accuracy(curve: Sequence[float]) -> Optional[float]:
    """Mean of the average accuracy over seen tasks measured at regular points through the stream."""
    return float(np.mean(curve)) if len(curve) else None
