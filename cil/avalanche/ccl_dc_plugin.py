"""`CCLDCPlugin`: the CCL-DC add-on (cil.core.addons.ccl_dc; docs/methods.md, "CCL-DC add-on") on the method of a
`MethodPlugin` in the same Avalanche strategy (`DERPPPlugin`, `PCRPlugin`, `OCMPlugin`, `OnProPlugin`, or
`MethodPlugin(name)` for any of our methods, GSA included).

It is the core add-on itself, attached to the method the host plugin drives, exactly as our runner attaches it:
the peer is a second method of the same kind and config (`make_peer`: the host's method class on `peer_model`
with its own optimizer, sharing the host's buffer, seeded with the run seed + 5); the collaborative term joins
the host's loss before the strategy's backward, the peer takes its own step after the strategy's optimizer step
(`after_update`), and Avalanche evaluates the add-on's `eval_head` (the ensemble by default) through the host.

Why a host plugin is needed: CCL-DC's peer runs *the same method* as the learner beside it. For one of our
methods that is the method class; an Avalanche strategy's own update rule (ER_ACE, DER, Naive with ReplayPlugin)
cannot be run a second time on another model and optimizer from a plugin. Without a host, training raises one
ConfigError that says so.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cil.core.addons.ccl_dc import CCLDC, CCLDCConfig
from cil.core.methods import Method
from cil.core.optim import optimizer_like
from cil.errors import ConfigError

if TYPE_CHECKING:
    from cil.avalanche.method_plugin import MethodPlugin

CCL_DC_OPTIONS = {f.name for f in dataclasses.fields(CCLDCConfig)} - {"name"}


def same_optimizer(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """A fresh optimizer of `optimizer`'s class and settings over `params` (our runner builds the peer's with the
    run's optimizer settings; cil.core.optim.optimizer_like)."""
    fix = "pass peer_optimizer= built over peer_model.parameters()"
    try:
        return optimizer_like(optimizer, params)
    except (TypeError, ValueError) as e:
        name = type(optimizer).__name__
        raise ConfigError(f"CCLDCPlugin cannot copy the strategy's optimizer ({name}: {e}); {fix}") from e


class CCLDCPlugin(SupervisedPlugin):
    """CCL-DC on the strategy's method plugin. peer_model: the peer's network (same architecture as the strategy's
    model, its own initialisation; our runner seeds it with seed + 7). peer_optimizer: None makes one of the
    strategy optimizer's class and settings. Keywords: the knobs of `CCLDCConfig` with its defaults (weight=1,
    kd_lambda=1, ce_weight=0.5, temperature=4, replay_batch_size=None (the method's), crop_scale=[0.6, 1],
    randaug_n=3, randaug_m=15, eval_head='ensemble', seen_only=True, report_heads=True)."""

    def __init__(self, peer_model: nn.Module, peer_optimizer: torch.optim.Optimizer | None = None, **options: Any):
        super().__init__()
        unknown = sorted(set(options) - CCL_DC_OPTIONS)
        if unknown:
            raise ConfigError(f"CCLDCPlugin got unknown option(s) {unknown}; its options are {sorted(CCL_DC_OPTIONS)}")
        self.cfg = CCLDCConfig(**options)
        self.cfg.validate()
        self.peer_model, self.peer_optimizer = peer_model, peer_optimizer
        self.addon: CCLDC | None = None

    def make_addon(self, host: MethodPlugin, method: Method) -> CCLDC:
        """The core add-on on the host's `method` (called by the host when it builds its method)."""
        if self.addon is not None:
            raise ConfigError("CCLDCPlugin is attached to one strategy's method already; make one plugin per strategy")

        def make_peer() -> Method:
            peer_model = self.peer_model.to(method.device)
            if peer_model is method.model:
                raise ConfigError("CCLDCPlugin(peer_model=...) is the strategy's own model: pass a second network")
            optimizer = self.peer_optimizer or same_optimizer(method.optimizer, peer_model.parameters())
            return host.new_method(peer_model, optimizer, method.buffer, host.seed + 5, method.device)

        self.addon = CCLDC(self.cfg, method, make_peer=make_peer)
        return self.addon

    def before_training(self, strategy, **kwargs):
        from cil.avalanche.method_plugin import MethodPlugin

        if not any(isinstance(p, MethodPlugin) for p in strategy.plugins):
            others = [type(p).__name__ for p in strategy.plugins if type(p).__name__ == "GSAPlugin"]
            hint = " (GSAPlugin drives GSA's step, not our GSA method: use MethodPlugin('gsa', ...))" if others else ""
            raise ConfigError(
                f"CCLDCPlugin needs one of our method plugins in the same strategy{hint}: CCL-DC's peer runs the "
                "learner's own method, and an Avalanche strategy's update rule cannot run on a second model from a "
                "plugin. Add DERPPPlugin, PCRPlugin, OCMPlugin, OnProPlugin or MethodPlugin(name) to plugins"
            )

    @property
    def peer(self) -> Method | None:
        """The peer method (its `model`, `optimizer`), once the host has built it."""
        return None if self.addon is None else self.addon.peer

    def log_values(self) -> dict[str, float]:
        """The last step's terms (ccl_dc/ce, ccl_dc/kd, ccl_dc/peer_ce, ccl_dc/peer_kd)."""
        return {} if self.addon is None else self.addon.log_values()
