"""Add-ons: extra loss terms and extra state (EMA teachers, a peer learner) on top of any method's step.

An add-on is one module of this package: a config dataclass (subclass `AddonConfig`, its fields are the
`addon.<name>.*` keys) and an `Addon` subclass with `name` and `Config`, decorated with `@register`. The runner
builds the add-ons a run selects (`addon=mkd`, `addon=[mkd,ccl_dc]`) after the method and hands them to
`Method.addons`; the method calls their hooks (cil.core.methods.base), never imports them:

- `begin_observe(method, batch)`: an incoming batch arrives (before the method's `iters` updates).
- `main_pass(method, inputs, logits, raw)`: the method declares its main supervised pass (`Method.distill_pass`).
- `extra_loss(method) -> Tensor | None`: terms added to the method's loss before backward (`Method.step`).
- `after_step(method)`: after `optimizer.step()` (the EMA teachers follow the model here).
- `on_task_start(method, task, classes)`.
- `eval_logits(method, x, head) -> Tensor | None`: the logits of evaluation head `head` (None: the run's main
  head) when this add-on owns it; `eval_heads()`: the extra heads the learner evaluates into their own accuracy
  matrix (results.json `heads`).
- `state_dict()` / `load_state_dict(state)` (saved inside the method's state: resume is bit-identical),
  `log_values()` (per-term loss values, at log intervals), `extra_results()`.

An add-on with `weight: 0` does nothing at all (no forward pass, no buffer draw, no random draw, no teacher or peer
update; the run's evaluation head is the method's own and no extra head is reported), so such a run is the base
method bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from cil.core.data.stream import Batch
from cil.core.methods.base import Method
from cil.core.objectives.common import mask_logits
from cil.errors import require

_T = TypeVar("_T")


@dataclass
class AddonConfig:
    name: str = "base"
    weight: float = 1.0  # multiplies the add-on's whole loss; 0: the add-on is off (the base method, bit for bit)
    seen_only: bool = True  # softmaxes (CE and distillation) over the seen classes; false: every head unit (official)

    def key(self, field: str) -> str:
        return f"addon.{self.name}.{field}"

    def validate(self) -> None:
        require(self.weight >= 0, self.key("weight"), self.weight, "use a number >= 0 (0 turns the add-on off)")


class Addon:
    name: ClassVar[str] = "base"
    Config: ClassVar[type[AddonConfig]] = AddonConfig

    def __init__(self, cfg: AddonConfig, method: Method, **context: Any) -> None:
        self.cfg = cfg
        self.last: dict[str, torch.Tensor] = {}  # detached loss terms of the last step (log_values)

    @property
    def active(self) -> bool:
        return self.cfg.weight > 0

    # -- hooks (all optional) --------------------------------------------------------------------------------
    def begin_observe(self, method: Method, batch: Batch) -> None:
        pass

    def main_pass(self, method: Method, inputs: torch.Tensor, logits: torch.Tensor, raw: torch.Tensor | None) -> None:
        pass

    def extra_loss(self, method: Method) -> torch.Tensor | None:
        return None

    def after_step(self, method: Method) -> None:
        pass

    def on_task_start(self, method: Method, task: int, classes: torch.Tensor) -> None:
        pass

    def eval_logits(self, method: Method, x: torch.Tensor, head: str | None) -> torch.Tensor | None:
        return None

    def eval_heads(self) -> list[str]:
        return []

    # -- what a run keeps and reports ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return {f"{self.name}/{k}": float(v) for k, v in self.last.items()}

    def extra_results(self) -> dict[str, Any]:
        return {}

    # -- helpers ---------------------------------------------------------------------------------------------
    def softmax_mask(self, method: Method) -> torch.Tensor | None:
        return method.seen if self.cfg.seen_only else None

    @staticmethod
    def masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return logits if mask is None else mask_logits(logits, mask)


def in_eval_mode(module: nn.Module, fn: Callable[[], _T]) -> _T:
    """fn() with `module` in eval mode, its mode restored afterwards."""
    was = module.training
    module.eval()
    try:
        return fn()
    finally:
        module.train(was)


ADDONS: dict[str, type[Addon]] = {}
_AddonClass = TypeVar("_AddonClass", bound=type[Addon])


def register(cls: _AddonClass) -> _AddonClass:
    """Class decorator: make an add-on available by its `name` (`addon=<name>`)."""
    if cls.name in ADDONS and ADDONS[cls.name] is not cls:
        raise ValueError(f"two add-ons are named {cls.name!r}: {ADDONS[cls.name]} and {cls}")
    ADDONS[cls.name] = cls
    return cls
