"""`GradientMassMetric`: the logit-gradient masses of our diagnostics (cil.core.diagnostics, part 1) as an Avalanche
metric, for any strategy, logged through Avalanche's loggers:

    from avalanche.training.plugins import EvaluationPlugin
    masses = GradientMassMetric(every=50)
    strategy = Naive(..., evaluator=EvaluationPlugin(masses, loggers=[InteractiveLogger()]))

What it counts, per class c, per source ('new': rows of the incoming data; 'replay': rows from a memory) and per
kind, accumulated over the whole run (README "Diagnostics"):
- `mass`: every row counts 1: G+_c = sum over rows labelled c of 1 - p_c, G-_c = sum over the other rows of p_c,
  p the softmax over the term's classes (GSA's own statistics);
- `effective`: every row weighted by its coefficient in the loss: the negative (own class) and positive (other
  classes) parts of dLoss/dlogits, the logit gradient the optimiser follows.
Every `every` training iterations (and when a new task starts) it logs `diag/<kind>/<source>/<pos|neg>/class_<c>`
for the classes with mass; `result()` returns everything ({"<kind>/<source>": {"pos": [...], "neg": [...]}}).

Where the numbers come from:
1. With one of our methods in the strategy (`MethodPlugin` and its named forms, or `GSAPlugin`): the method reports
   its loss terms, as it does in our learner, to the very accounting our diagnostics use (a
   `cil.core.diagnostics.Diagnostics`: `report`, then `flush` into `GradientStats`). The terms are folded at the
   points where our learner folds them (every `every` mini-batches and at each task's end), so a run gives our
   diagnostics' numbers bit for bit.
2. Any other strategy: the logits the strategy computes (`strategy.mb_output`, and ER_ACE's `mb_buffer_out`) and
   the gradient of its final loss with respect to them, caught by a tensor hook during the strategy's own backward
   (no extra pass, nothing changed). `effective` is that gradient split per class; `mass` is the cross-entropy's
   over every head unit (Avalanche's criterion). A row is 'new' when its input equals a row of the current
   experience (an exact fingerprint of its float bits), else 'replay': exact for deterministic train transforms;
   with random augmentation in the benchmark's train transforms incoming rows are not recognised and count as
   replay. Rows that do not reach the loss (no gradient) are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from torch import Tensor

from cil.avalanche.method_plugin import MethodPlugin
from cil.avalanche.plugin import GSAPlugin, has_boundaries
from cil.core.diagnostics import KINDS, SOURCES, Diagnostics
from cil.core.objectives.gsa import GradientStats
from cil.errors import ConfigError

# (logits, inputs, labels) attributes a strategy may expose: every strategy's main pass, ER_ACE's replay pass
PASSES = (("mb_output", "mb_x", "mb_y"), ("mb_buffer_out", "mb_buffer_x", "mb_buffer_y"))


def fingerprints(x: Tensor) -> Tensor:
    """One int64 per row, a function of the row's exact float32 bits: sum_j bits_j * m_j with fixed odd
    multipliers, in wrapping int64 arithmetic (so independent of the summation order and the batch)."""
    bits = x.detach().float().reshape(len(x), -1).contiguous().view(torch.int32).long()
    g = torch.Generator().manual_seed(0x5EED)
    mult = torch.randint(1, 2**31, (bits.shape[1],), generator=g, dtype=torch.long).mul_(2).add_(1)
    return (bits * mult.to(bits.device)).sum(1)


class GradientMassMetric(PluginMetric[dict]):
    """Per-class positive / negative logit-gradient masses, new vs replay (module docstring). every: training
    iterations between logged values (our `diagnostics.every`)."""

    def __init__(self, every: int = 50):
        super().__init__()
        if int(every) < 1:
            raise ConfigError(f"GradientMassMetric(every={every!r}): use an integer >= 1 (our diagnostics.every)")
        self.every = int(every)
        self.iterations = 0
        self.diag: Diagnostics | None = None  # with one of our methods: their accounting
        self.stats = {(k, s): GradientStats() for k in KINDS for s in SOURCES}  # any other strategy
        self._task: Any = None
        self._current: Tensor | None = None  # fingerprints of the current experience's rows (sorted)
        self._caught: list[list[Any]] = []  # [logits, labels, new-row mask, gradient] of this iteration

    # -- what it reports -------------------------------------------------------------------------------------
    def _stats(self) -> dict[tuple[str, str], GradientStats]:
        if self.diag is not None:
            self.diag.flush()
            return self.diag.stats
        return self.stats

    def result(self) -> dict[str, dict[str, list[float]]]:
        """Everything so far. Mid-run it folds the pending terms early: later sums may then differ from our
        learner's in the last float64 bits (they are folded in other groups)."""
        return {
            f"{k}/{s}": {"pos": st.positive.cpu().tolist(), "neg": st.negative.cpu().tolist()}
            for (k, s), st in self._stats().items()
        }

    def reset(self) -> None:
        """The masses accumulate over the whole run, as our diagnostics' do: nothing to reset per phase."""

    def _values(self) -> list[MetricValue]:
        out = []
        stats = self._stats()
        width = max(st.num_classes for st in stats.values())
        for c in range(width):
            if not any(c < st.num_classes and float(st.positive[c] + st.negative[c]) > 0 for st in stats.values()):
                continue
            for (kind, source), st in stats.items():
                if c < st.num_classes:
                    for sign, v in (("pos", st.positive[c]), ("neg", st.negative[c])):
                        out.append(
                            MetricValue(self, f"diag/{kind}/{source}/{sign}/class_{c}", float(v), self.iterations)
                        )
        return out

    # -- where the terms come from ---------------------------------------------------------------------------
    def _attach(self, strategy) -> None:
        """With one of our methods: give it (or GSAPlugin's step) our diagnostics' accounting."""
        for p in strategy.plugins:
            if isinstance(p, MethodPlugin) and p.method is not None:
                if self.diag is None:
                    self.diag = Diagnostics(self.every, [0] * p.method.num_classes, p.method.model, p.method.device)
                p.method.diagnostics = self.diag
                self._task = ("task", p.task)
            elif isinstance(p, GSAPlugin) and p.gsa is not None:
                assert p.classes is not None  # built with the step
                if self.diag is None:
                    self.diag = Diagnostics(self.every, [0] * p.classes.num_classes, strategy.model, strategy.device)
                p.gsa.report = self.diag.report
                self._task = ("task", None if p.cfg.task_free else p.task)

    def before_training_exp(self, strategy) -> list[MetricValue] | None:
        # the evaluator's callbacks come after the strategy's plugins: the method plugins have built their method
        before = self._task
        self._attach(strategy)
        if self.diag is None:
            self._current = None
            exp = (
                getattr(strategy.experience, "origin_experience", None) if has_boundaries(strategy.experience) else None
            )
            self._task = ("exp", None if exp is None else exp.current_experience)
        if before is not None and self._task != before and self._task[1] is not None and self.iterations:
            return self._values()  # a task ended: our learner folds its statistics there too
        return None

    def _current_rows(self, strategy) -> Tensor:
        """Fingerprints of the current experience's rows as the strategy's loader gives them (train transforms)."""
        if self._current is None:
            dataset = strategy.adapted_dataset
            xs = [torch.as_tensor(dataset[i][0]) for i in range(len(dataset))]
            self._current = torch.sort(fingerprints(torch.stack(xs))).values.to(strategy.device)
        return self._current

    def before_backward(self, strategy) -> None:
        if self.diag is not None:
            return
        for out_name, x_name, y_name in PASSES:
            logits = getattr(strategy, out_name, None)
            if not isinstance(logits, Tensor) or logits.grad_fn is None:
                continue
            new = torch.isin(fingerprints(getattr(strategy, x_name)), self._current_rows(strategy))
            slot = [logits.detach(), getattr(strategy, y_name), new, None]
            logits.register_hook(lambda g, slot=slot: slot.__setitem__(3, g.detach()))
            self._caught.append(slot)

    @torch.no_grad()
    def after_backward(self, strategy) -> None:
        caught, self._caught = self._caught, []
        for logits, y, new, grad in caught:
            if grad is None:  # not part of the loss
                continue
            for source, rows in (("new", new), ("replay", ~new)):
                z, t, g = logits[rows], y[rows], grad[rows].double()
                if len(t) == 0:
                    continue
                self.stats["mass", source].update(z, t, None)  # softmax over every unit: Avalanche's criterion
                own = g.gather(1, t[:, None]).squeeze(1)
                width = g.shape[1]
                eff = self.stats["effective", source]
                eff.to(g.device).grow(width)
                own_sum = torch.zeros(width, dtype=g.dtype, device=g.device).index_add_(0, t, own)
                eff.positive[:width] -= own_sum  # the own class is pushed up by -dL/dz_y
                eff.negative[:width] += g.sum(0) - own_sum  # every other class down by dL/dz_c

    def after_training_iteration(self, strategy) -> list[MetricValue] | None:
        self.iterations += 1
        if self.iterations % self.every == 0:
            return self._values()
        return None
