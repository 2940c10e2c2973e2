"""Evaluation through a plugin's own head: while Avalanche evaluates an experience, `strategy.model` is the head
(MethodPlugin's method head, MKDPlugin's teacher or averaged model) and the trained model is put back after."""

from __future__ import annotations

from torch import nn


class EvalHeadSwap:
    """Mixin for a SupervisedPlugin: `swap_in(strategy, head)` in `before_eval_exp` (after Avalanche's model
    adaptation for the experience) puts `head` in eval mode as strategy.model; every train() and eval() callback
    the plugin routes through `restore` puts the model and the head's mode back. Avalanche calls no plugin when
    evaluation raises: the next train() or eval() call (its first callback) restores before anything runs."""

    _swap: tuple[nn.Module, nn.Module, bool] | None = None  # (the strategy's model, the head, the head's mode)

    def swap_in(self, strategy, head: nn.Module) -> None:
        self._swap = (strategy.model, head, head.training)
        head.eval()
        strategy.model = head

    def restore(self, strategy) -> None:
        if self._swap is not None:
            model, head, mode = self._swap
            self._swap = None
            head.train(mode)
            if strategy.model is head:
                strategy.model = model

    def before_eval(self, strategy, **kwargs):
        self.restore(strategy)

    def after_eval_exp(self, strategy, **kwargs):
        self.restore(strategy)

    def after_eval(self, strategy, **kwargs):
        self.restore(strategy)
