"""`MethodPlugin`: one of our online methods (cil.core.methods) inside an Avalanche supervised strategy, and its
named forms `DERPPPlugin`, `PCRPlugin`, `OCMPlugin` and `OnProPlugin`.

The plugin builds the method object our learner builds (`method_class(name)(model, optimizer, buffer, cfg, ...)`,
the same seeds: buffer seed + 1, method seed + 2) on the strategy's model and optimizer, and calls the very
`observe` and `remember` our learner calls, so the loss, the augmentations, the replay draws and what is stored
are the method's own code. Only the optimizer step is the strategy's:

- `before_training_exp`: builds the method on the first experience (sample shape, device); a new task index
  (a classic experience, or an online sub-experience's `origin_experience` when the stream grants boundaries)
  calls `method.on_task_start`.
- `before_backward`: `method.observe(batch)` on the mini-batch, with the method's `step` captured: the loss it
  would have backpropagated (its add-ons' terms included) replaces `strategy.loss`; the strategy then runs its
  own backward and optimizer step.
- `after_update`: the add-ons' `after_step` (CCL-DC's peer steps here, as in `Method.step`).
- `after_training_iteration`: `method.remember` (the mini-batch, and DER++'s logits, enter the reservoir), in the
  first epoch only.
- evaluation: where the method's evaluation head is not `strategy.model(x)` (PCR's cosine proxies, CCL-DC's
  ensemble, inputs normalised by the plugin, or `eval_classes="seen"`), `method.eval_logits` is swapped in as
  `strategy.model` for each evaluation experience and swapped back after it (as MKDPlugin swaps its head).

Initialisation: our builder seeds torch, makes the model, then the method, whose own modules (OCM's and OnPro's
projection heads; a CCL-DC peer's) draw from torch's global RNG; the plugin builds its method later (at the first
experience, after Avalanche has drawn from that RNG for its loaders), so it draws them from the global RNG state
saved when the plugin was made: made right after the model, the plugin's method starts as our learner's.

Inputs: the mini-batches must be images scaled to [0, 1] as `ToTensor` gives them (Avalanche's SplitMNIST
does); the plugin stores them as uint8, as our learner stores its stream, which is exact for `ToTensor` output
(other values are rounded to the nearest 1/255). Normalisation belongs to the plugin (`normalize=(mean, std)`,
applied after the method's augmentation, as `dataset.normalize` is), not to the benchmark's transforms: a batch
outside [0, 1] is one `ConfigError` naming that fix.

The strategy's own forward pass on the raw mini-batch still runs before the loss (Avalanche's template); its
output only feeds Avalanche's training metrics. With batch norm it also moves the running statistics, which our
learner's step does not do: bit-for-bit parity with our learner holds for models without batch norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cil.avalanche.eval_swap import EvalHeadSwap
from cil.avalanche.plugin import GSAPlugin, has_boundaries
from cil.core.addons.base import Addon
from cil.core.buffer import POLICIES, ReplayBuffer
from cil.core.data.stream import Batch
from cil.core.methods import Method, method_class
from cil.core.objectives.common import mask_logits
from cil.errors import ConfigError

# Method config keys that are not plugin options, with the reason.
NOT_OPTIONS = {
    "name": "the plugin names its method",
    "iters": "an Avalanche strategy takes one optimizer step per mini-batch; method.iters has no counterpart there",
}
# Methods that reach into the model: features(x), a linear `head` (PCR's proxies, OCM's and OnPro's projections).
BACKBONE_METHODS = ("pcr", "ocm", "onpro")
EVAL_CLASSES = ("all", "seen")


def is_backbone(model: nn.Module) -> bool:
    return callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Linear)


class EvalHead(nn.Module):
    """The method's evaluation logits as a module: what `strategy.model` is while Avalanche evaluates. Takes
    [0, 1] images (the strategy's inputs), in eval mode (the method's model and owned modules, restored after)."""

    def __init__(self, host: MethodPlugin):
        super().__init__()
        self.host = [host]  # a list: not a submodule, so Avalanche's .to() / .eval() leave the method alone

    def forward(self, x: Tensor) -> Tensor:
        return self.host[0].logits(x)


class MethodPlugin(EvalHeadSwap, SupervisedPlugin):
    """Our method `method` (a `method=<name>` of the runner: derpp, pcr, ocm, onpro, er, er_ace, naive, gsa) as an
    Avalanche plugin. Use it with `Naive`: it replaces the strategy's loss with the method's.

    mem_size: the reservoir's size (our `buffer.size`; 0: no memory). num_classes: the head's width (default: the
    model's `head.out_features`). seed: our run seed (buffer seed + 1, method seed + 2, CCL-DC's peer seed + 5, as
    the runner seeds them). normalize: (mean, std) per channel, applied after the method's augmentation (our
    `dataset.normalize`). eval_classes: "all" (Avalanche's argmax over every head unit) or "seen" (unseen classes
    masked, our learner's default `eval.classes`). buffer_policy: reservoir | class_balanced. Every other keyword
    is a key of the method's config dataclass (`python -m cil method=<name> --cfg job` lists them), with the same
    defaults; `iters` is not one (NOT_OPTIONS says why).

    Make it right after the model, as our builder makes the method: modules the method owns (OCM's and OnPro's
    projection heads) are initialised from torch's global RNG as it was when the plugin was made.
    """

    def __init__(
        self,
        method: str,
        mem_size: int = 500,
        num_classes: int | None = None,
        seed: int = 0,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        eval_classes: str = "all",
        buffer_policy: str = "reservoir",
        **options: Any,
    ):
        super().__init__()
        self.method_cls = method_class(method)
        fields = {f.name for f in dataclasses.fields(self.method_cls.Config)}
        refused = sorted(set(options) & set(NOT_OPTIONS))
        unknown = sorted(set(options) - fields - set(NOT_OPTIONS))
        if refused or unknown:
            why = "; ".join(f"{k}: {NOT_OPTIONS[k]}" for k in refused)
            raise ConfigError(
                f"{self.plugin_name} got option(s) {refused + unknown} it does not take"
                f"{' (' + why + ')' if why else ''}; its options are {sorted(fields - set(NOT_OPTIONS))}"
            )
        if eval_classes not in EVAL_CLASSES:
            raise ConfigError(f"{self.plugin_name}(eval_classes={eval_classes!r}): choose one of {EVAL_CLASSES}")
        if buffer_policy not in POLICIES:
            raise ConfigError(f"{self.plugin_name}(buffer_policy={buffer_policy!r}): choose one of {POLICIES}")
        self.cfg = self.method_cls.Config(name=method, **options)
        self.cfg.validate()
        self.mem_size, self.num_classes, self.seed = int(mem_size), num_classes, int(seed)
        if self.method_cls.uses_buffer and self.mem_size > 0:  # the runner's check: a draw larger than the memory
            for key, n in self.cfg.buffer_draws().items():
                if self.mem_size < n:
                    raise ConfigError(
                        f"{self.plugin_name}(mem_size={self.mem_size}) is smaller than {key.split('.')[-1]}={n}: "
                        f"{method} draws that many samples from the memory at once; raise mem_size or lower it"
                    )
        self.normalize, self.eval_classes, self.buffer_policy = normalize, eval_classes, buffer_policy
        self.method: Method | None = None
        self.task: int | None = -1  # the current task (None: the stream grants no boundaries)
        self.step = 0  # mini-batches observed (our Batch.step)
        self.step_in_task = 0
        self._input_shape: tuple[int, ...] | None = None
        self._width = 0  # head units (set when the method is built)
        self._loss: Tensor | None = None  # the loss the method's step handed over (see _capture)
        self._last: tuple[Batch, Any] | None = None  # (batch, StepOutput) of the current iteration
        self._checked_range = False
        self._init_rng = torch.get_rng_state()  # see _build

    @property
    def plugin_name(self) -> str:
        return type(self).__name__ if type(self) is not MethodPlugin else f"MethodPlugin({self.method_cls.name!r})"

    # -- construction ----------------------------------------------------------------------------------------
    def new_method(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        buffer: ReplayBuffer | None,
        seed: int,
        device: torch.device,
    ) -> Method:
        """A method of this plugin's kind and config on `model` (CCL-DC's peer is one too)."""
        shape = self._input_shape
        return self.method_cls(
            model,
            optimizer,
            buffer,
            self.cfg,
            self._width,
            device,
            seed=seed,
            input_shape=tuple(shape) if shape is not None and len(shape) == 3 else None,  # type: ignore[arg-type]
            normalize=self.normalize,
        )

    def _build(self, strategy) -> None:
        model = strategy.model
        name = self.method_cls.name
        if name in BACKBONE_METHODS and not is_backbone(model):
            raise ConfigError(
                f"{self.plugin_name} needs a model with features(x) and a linear `head` (the method reads the "
                f"features and the head's weights); got {type(model).__name__}: build it with "
                "cil.core.models.build_model, or give your model those two"
            )
        head = getattr(getattr(model, "head", None), "out_features", None)
        if self.num_classes is not None and head is not None and head != self.num_classes:
            raise ConfigError(
                f"{self.plugin_name}(num_classes={self.num_classes}) but the model's head has {head} units: "
                "leave num_classes out (the head's width is used) or pass the head's width"
            )
        width = self.num_classes or head
        if width is None:
            raise ConfigError(
                f"{self.plugin_name} needs the number of classes: pass num_classes= (the model has no `head`)"
            )
        self._width = int(width)
        x0 = torch.as_tensor(strategy.experience.dataset[0][0])
        self._input_shape = tuple(x0.shape)
        device = torch.device(strategy.device)
        buffer = None
        if self.method_cls.uses_buffer and self.mem_size > 0:
            buffer = ReplayBuffer(
                self.mem_size,
                self._input_shape,
                device=device,
                policy=self.buffer_policy,
                seed=self.seed + 1,
                extras=self.method_cls.buffer_extras(self.cfg, self._width),
            )
        # Modules the method owns (OCM's and OnPro's projection heads; a CCL-DC peer's) draw their initialisation
        # from torch's global RNG as it was when the plugin was made: our builder makes them right after the model
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._init_rng)
            method = self.new_method(model, strategy.optimizer, buffer, self.seed + 2, device)
            method.step = self._capture  # type: ignore[method-assign]  # the strategy takes the optimizer step
            self.method = method
            # add-on plugins (CCL-DC) attach their add-on to this method, in the strategy's plugin order
            method.addons = [p.make_addon(self, method) for p in strategy.plugins if hasattr(p, "make_addon")]
        if self.owns_eval_head():
            from cil.avalanche.mkd_plugin import MKDPlugin

            if any(isinstance(p, MKDPlugin) for p in strategy.plugins):
                raise ConfigError(
                    f"MKDPlugin cannot stack on {self.plugin_name}'s evaluation head ({self._head_reason()}): "
                    "MKDPlugin distils and evaluates strategy.model's own outputs; drop MKDPlugin, or run "
                    f"method={name} addon=mkd through our runner"
                )

    def _capture(self, loss: Tensor) -> None:
        """Method.step without the optimizer: the add-ons' terms join the loss (Method.step's order), the
        diagnostics see it, and the strategy backpropagates it."""
        assert self.method is not None  # set before it can be called
        for addon in self.method.addons:
            extra = addon.extra_loss(self.method)
            if extra is not None:
                loss = loss + extra
        if self.method.diagnostics is not None:
            self.method.diagnostics.before_backward(loss)
        self._loss = loss

    # -- the task ----------------------------------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        self.restore(strategy)
        hosts = [p for p in strategy.plugins if isinstance(p, (MethodPlugin, GSAPlugin))]
        if len(hosts) > 1:
            raise ConfigError(
                f"one strategy got {len(hosts)} method plugins ({', '.join(type(p).__name__ for p in hosts)}); "
                "each replaces the loss: keep one"
            )

    def before_training_exp(self, strategy, **kwargs):
        self.restore(strategy)
        if self.method is None:
            self._build(strategy)
        assert self.method is not None  # built above
        if strategy.model is not self.method.model or strategy.optimizer is not self.method.optimizer:
            raise ConfigError(
                f"{self.plugin_name}: the strategy replaced its model or optimizer after the method was built on "
                "them (e.g. GDumb re-initialises its model); use it with Naive"
            )
        experience = strategy.experience
        if not has_boundaries(experience):
            if self.method_cls.boundaries_needed(self.cfg):
                raise ConfigError(
                    f"{self.plugin_name} needs task boundaries ({self.method_cls.name} reads the current task): "
                    "make the online stream with split_online_stream(..., access_task_boundaries=True), or use a "
                    "task-free method (DERPPPlugin, PCRPlugin)"
                )
            self.task = None  # a task-free method never reads it
            return
        origin = getattr(experience, "origin_experience", experience)
        classes = getattr(origin, "classes_in_this_experience", None)
        if classes is None:
            raise ConfigError(
                f"{self.plugin_name} needs the current task's classes: the (origin) experience has no "
                "classes_in_this_experience; use Avalanche's class-incremental benchmarks (e.g. SplitMNIST) or "
                "decorate the benchmark with avalanche.benchmarks.scenarios.supervised.with_classes_timeline"
            )
        task = int(origin.current_experience)
        if task != self.task:  # a new task (an online stream calls this once per sub-experience)
            self.task, self.step_in_task = task, 0
            labels = torch.tensor(sorted(int(c) for c in classes), device=self.method.device)
            self.method.on_task_start(task, labels)

    # -- one mini-batch ----------------------------------------------------------------------------------------
    def stored(self, x: Tensor) -> Tensor:
        """[0, 1] images -> uint8, as our stream holds them (exact for ToTensor output)."""
        if not self._checked_range:  # one read-back, on the first mini-batch
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ConfigError(
                    f"{self.plugin_name} takes images scaled to [0, 1] (ToTensor's output); got values in "
                    f"[{lo:.3g}, {hi:.3g}]: drop Normalize from the benchmark's transforms and pass "
                    "normalize=(mean, std) to the plugin"
                )
            self._checked_range = True
        return x.mul(255).round_().to(torch.uint8)

    def before_backward(self, strategy, **kwargs):
        method = self.method
        assert method is not None  # built by before_training_exp
        y = strategy.mb_y
        batch = Batch(
            x=self.stored(strategy.mb_x),
            y=y,
            y_host=y.cpu(),
            task=self.task,
            step=self.step,
            step_in_task=None if self.task is None else self.step_in_task,
        )
        self._loss = None
        out = method.observe(batch)
        self._last = (batch, out)
        if self._loss is None:  # the method skipped its step (GSA's train_without_replay=false): no update
            strategy.loss = torch.zeros((), device=method.device, requires_grad=True)
        else:
            strategy.loss = self._loss

    def after_update(self, strategy, **kwargs):
        assert self.method is not None  # built by before_training_exp
        if self._loss is not None:
            for addon in self.method.addons:  # e.g. CCL-DC's peer takes its step (Method.step's order)
                addon.after_step(self.method)

    def after_training_iteration(self, strategy, **kwargs):
        assert self.method is not None and self._last is not None  # set by before_backward
        if strategy.clock.train_exp_epochs == 0:  # the mini-batch enters the memory once
            self.method.remember(*self._last)
        self._last = None
        self.step += 1
        self.step_in_task += 1

    # -- evaluation --------------------------------------------------------------------------------------------
    def _head_reason(self) -> str:
        assert self.method is not None  # built before anything asks
        if type(self.method).predict_logits is not Method.predict_logits:
            return f"{self.method_cls.name} evaluates its own head"
        if any(type(a).eval_logits is not Addon.eval_logits and getattr(a, "active", True) for a in self.method.addons):
            return "an add-on's evaluation head (CCL-DC's ensemble)"
        if self.normalize is not None:
            return "the plugin normalises the inputs"
        if self.eval_classes == "seen":
            return "eval_classes='seen' masks unseen classes"
        return ""

    def owns_eval_head(self) -> bool:
        """Whether evaluation needs the method's head in place of strategy.model(x)."""
        return self.method is not None and bool(self._head_reason())

    @torch.no_grad()
    def logits(self, x: Tensor, head: str | None = None) -> Tensor:
        """Evaluation logits of [0, 1] images `x`: the method's head (`Method.eval_logits`; `head`: an add-on's
        extra head such as 'ccl_dc_peer'), masked to the seen classes with eval_classes='seen', in eval mode."""
        method = self.method
        if method is None:
            raise ConfigError(f"{self.plugin_name}.logits: nothing trained yet (the method is built on training)")
        was = method.model.training
        method.model.eval()
        method.owned.eval()
        try:
            with method.autocast():
                out = method.eval_logits(method.from_unit(x), head).float()
        finally:
            method.model.train(was)
            method.owned.train(was)
        return mask_logits(out, method.seen) if self.eval_classes == "seen" else out

    def before_eval_exp(self, strategy, **kwargs):
        # after Avalanche's model adaptation for this experience (_before_eval_exp): swap the head in
        self.restore(strategy)
        if self.owns_eval_head():
            self.swap_in(strategy, EvalHead(self))

    def __getstate__(self) -> dict:
        raise ConfigError(
            f"{self.plugin_name} does not support Avalanche's save_checkpoint (its method holds the strategy's "
            "optimizer); GSAPlugin and MKDPlugin do. Run our learner (python -m cil method=...) for resumable runs"
        )


class DERPPPlugin(MethodPlugin):
    """DER++ (cil.core.methods.derpp) as an Avalanche plugin; keywords as `MethodPlugin` plus DERPPConfig's knobs
    (replay_batch_size=64, alpha=0.2, beta=1.0, ce_classes='seen', augment=False, crop_padding=4,
    separate_passes=True, independent_draws=True). Task-free: runs without task boundaries."""

    def __init__(self, **kwargs: Any):
        super().__init__("derpp", **kwargs)


class PCRPlugin(MethodPlugin):
    """PCR (cil.core.methods.pcr) as an Avalanche plugin; keywords as `MethodPlugin` plus PCRConfig's knobs
    (replay_batch_size=10, temperature=0.09, augment=True, separate_passes=True). Needs a model with features(x)
    and a linear head; Avalanche evaluates its cosine head. Task-free: runs without task boundaries."""

    def __init__(self, **kwargs: Any):
        super().__init__("pcr", **kwargs)


class OCMPlugin(MethodPlugin):
    """OCM (cil.core.methods.ocm) as an Avalanche plugin; keywords as `MethodPlugin` plus OCMConfig's knobs
    (replay_batch_size=64, replay_per_class=7, temperature=0.07, proj_dim=128, sim_weight=0.5, ...). Needs a model
    with features(x) and a linear head, square images, and task boundaries."""

    def __init__(self, **kwargs: Any):
        super().__init__("ocm", **kwargs)


class OnProPlugin(MethodPlugin):
    """OnPro (cil.core.methods.onpro) as an Avalanche plugin; keywords as `MethodPlugin` plus OnProConfig's knobs
    (replay_batch_size=64, per_class_replay=7, proj_dim=128, apf=True, ...). Needs a model with features(x) and a
    linear head, square images of even size, and task boundaries."""

    def __init__(self, **kwargs: Any):
        super().__init__("onpro", **kwargs)
