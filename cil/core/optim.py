"""A fresh optimizer of another one's class and settings, over other parameters."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch


def optimizer_like(optimizer: torch.optim.Optimizer, params: Iterable[Any]) -> torch.optim.Optimizer:
    """`type(optimizer)` over `params` with `optimizer`'s settings. Settings in `defaults` that the constructor does
    not take are ones the class records itself (torch's AdamW keeps decoupled_weight_decay=True there but takes no
    such argument): they are left to it. TypeError or ValueError when no copy with equal `defaults` can be made."""
    cls = type(optimizer)
    accepted = inspect.signature(cls).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    settings = {k: v for k, v in optimizer.defaults.items() if any_keyword or k in accepted}
    fresh = cls(params, **settings)
    if fresh.defaults != optimizer.defaults:
        raise ValueError(f"a copy made from its settings has defaults {fresh.defaults}, not {optimizer.defaults}")
    return fresh
