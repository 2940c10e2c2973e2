"""What every online method shares: its typed config, the seen and current-task classes, the forward pass in the
chosen precision, one update.

A method's `observe(batch)` does its `iters` updates on one incoming batch and returns the last loss and the
incoming batch's logits from before the first update (for online accuracy), both detached and left on the
device: nothing here reads a value back to the host, except that under precision=fp16 the GradScaler reads its
inf/nan flag once per optimizer step (as the official code's GradScaler does).

A method lives in one module of this package: its config dataclass (`Config`, validated by `validate`), its
needs (`uses_buffer`, `needs_task_boundaries`, `buffer_extras`) and its step, registered with `@register`.
Hooks a method may override beyond `update`: `remember` (what goes into the buffer after a step), `own`
(extra trained modules such as a projection head: optimised with the model, saved with the method) and
`predict_logits` (the evaluation head), `distill_pass` (declares the step's main supervised pass to add-ons). The
runner offers
every registered method as a `method=<name>` option with the config's fields as its keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, Unpack, cast

import torch
from torch import nn

from cil.core.buffer import ReplayBuffer, SampleFilters
from cil.core.compiled_step import StepCompiler
from cil.core.data.stream import Batch
from cil.core.metrics import ScalarLog
from cil.core.models import Backbone
from cil.errors import require

T = TypeVar("T")


@dataclass
class MethodConfig:
    """Keys every method has. A method's own config subclasses this (or ReplayConfig) and adds its knobs."""

    name: str = "naive"
    iters: int = 1  # updates per incoming batch

    def validate(self) -> None:
        """Check ranges and combinations the types cannot express (raise ConfigError naming the key)."""
        require(self.iters >= 1, "method.iters", self.iters, "use an integer >= 1")

    def buffer_draws(self) -> dict[str, int]:
        """Buffer samples drawn at once per step, by key (none of them may exceed the buffer's size)."""
        return {}


@dataclass
class ReplayConfig(MethodConfig):
    replay_batch_size: int = 10  # buffer samples replayed per update

    def validate(self) -> None:
        super().validate()
        require(self.replay_batch_size >= 0, "method.replay_batch_size", self.replay_batch_size, "use an integer >= 0")

    def buffer_draws(self) -> dict[str, int]:
        return {"method.replay_batch_size": self.replay_batch_size}


BALANCE_RULES = ("cumulative", "ema", "task_reset", "window", "constant", "magnitude")


@dataclass
class BalancedReplayConfig(ReplayConfig):
    """A replay method whose replay term can be balanced (cil.core.objectives.balance; docs/methods.md,
    "Balancing rules"). `balance_rules` lists the rules the method can use."""

    balance: str = "cumulative"  # replay balancing rule: cumulative | ema | task_reset | window | constant | magnitude
    balance_momentum: float = 0.99  # ema: S <- m S + s_batch (m = 1 is cumulative)
    balance_window: int = 100  # window: the statistics of the last K replay batches
    balance_ratio: float = 1.0  # magnitude: target |replay logit gradient| / |new-data logit gradient|

    balance_rules: ClassVar[tuple[str, ...]] = BALANCE_RULES

    def validate(self) -> None:
        super().validate()
        require(
            self.balance in BALANCE_RULES, "method.balance", self.balance, f"choose one of {', '.join(BALANCE_RULES)}"
        )
        require(
            self.balance in self.balance_rules,
            "method.balance",
            self.balance,
            f"method {self.name} takes only {', '.join(self.balance_rules)} (docs/methods.md, Balancing rules)",
        )
        require(
            0.0 < self.balance_momentum <= 1.0,
            "method.balance_momentum",
            self.balance_momentum,
            "use 0 < m <= 1 (m = 1 is the cumulative rule)",
        )
        require(self.balance_window >= 1, "method.balance_window", self.balance_window, "use an integer >= 1")
        require(self.balance_ratio > 0, "method.balance_ratio", self.balance_ratio, "use a number > 0")

    def balance_rule(self) -> str:
        """The rule in effect (GSA's old `adaptive_weights=false` maps to constant)."""
        return self.balance


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, detached
    logits: torch.Tensor  # [B, num_classes] logits of the incoming batch before the update, detached


def to_float(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (the online-CL code bases feed unnormalised [0, 1] inputs)."""
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


class AddonHooks(Protocol):
    """What a method (and the learner) call on an add-on: cil.core.addons.base.Addon, a layer above the methods,
    which never import it."""

    @property
    def name(self) -> str: ...

    def begin_observe(self, method: Method, batch: Batch) -> None: ...

    def main_pass(
        self, method: Method, inputs: torch.Tensor, logits: torch.Tensor, raw: torch.Tensor | None
    ) -> None: ...

    def extra_loss(self, method: Method) -> torch.Tensor | None: ...

    def after_step(self, method: Method) -> None: ...

    def on_task_start(self, method: Method, task: int, classes: torch.Tensor) -> None: ...

    def eval_logits(self, method: Method, x: torch.Tensor, head: str | None) -> torch.Tensor | None: ...

    def eval_heads(self) -> list[str]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def log_values(self) -> dict[str, float]: ...

    def extra_results(self) -> dict[str, Any]: ...


class DiagnosticsHooks(Protocol):
    """What a method and the learner call on the diagnostics: cil.core.diagnostics.Diagnostics, beside the
    methods in the layers, so neither imports the other."""

    def begin_batch(self, batch: Batch) -> None: ...

    def report(
        self,
        source: str,
        logits: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | str,
        scale: float = 1.0,
        class_weights: torch.Tensor | None = None,
    ) -> None: ...

    def before_backward(self, loss: torch.Tensor) -> None: ...

    def end_batch(self, logger: ScalarLog) -> None: ...

    def on_evaluation(self, task: int, acc_row: Sequence[float], logger: ScalarLog) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def series(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ClassSets:
    """The seen classes (labels observed in the stream so far) and the current task's classes (announced at a
    task start). Each is a bool mask over the head on the device (for the losses) and a set of labels on the host
    (for counting without a device read-back). A mask is replaced, never changed in place, so a mask handed out
    earlier (the learner keeps each step's until it counts online accuracy) stays as it was."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
        self.seen_labels: set[int] = set()
        self.task_mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
        self.task_labels: set[int] = set()
        self.task = -1

    def start_task(self, task: int, classes: torch.Tensor) -> None:
        self.task = task
        self.task_mask = torch.zeros_like(self.task_mask).index_fill_(0, classes.to(self.task_mask.device), True)
        self.task_labels = set(classes.tolist())

    def mark_seen(self, y: torch.Tensor, y_host: torch.Tensor) -> None:
        """Add labels (the same on the device and on the host) to the seen classes; only a batch with a new class
        costs tensor work."""
        labels = y_host.tolist()
        if self.seen_labels.issuperset(labels):
            return
        self.seen_labels.update(labels)
        self.seen = self.seen.index_fill(0, y, True)

    def grow(self, num_classes: int) -> None:
        """Widen the masks to `num_classes` head units (new units unseen, outside the task)."""
        pad = num_classes - self.num_classes
        if pad > 0:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(pad)])
            self.task_mask = torch.cat([self.task_mask, self.task_mask.new_zeros(pad)])
            self.num_classes = num_classes

    def current_share(self) -> float:
        """r = |seen classes of the current task| / |seen classes| (GSA's mixed-batch ratio)."""
        return len(self.seen_labels & self.task_labels) / max(len(self.seen_labels), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen.cpu(), "task_classes": self.task_mask.cpu(), "task": self.task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"].to(self.seen.device, copy=True)
        self.seen_labels = set(state["seen"].nonzero().squeeze(1).tolist())
        self.task_mask = state["task_classes"].to(self.task_mask.device, copy=True)
        self.task_labels = set(state["task_classes"].nonzero().squeeze(1).tolist())
        self.task = state["task"]


class Method:
    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    uses_buffer: ClassVar[bool] = True  # the learner adds each incoming batch to the buffer after `observe`
    needs_task_boundaries: ClassVar[bool] = False  # reads the current task's classes (on_task_start)
    declares_main_pass: ClassVar[bool] = False  # its update calls `distill_pass` (add-ons' main_pass mode)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        buffer: ReplayBuffer | None,
        cfg: MethodConfig,
        num_classes: int,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = False,
        seed: int = 0,
        input_shape: tuple[int, int, int] | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.buffer = buffer
        self.cfg = cfg
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.input_shape = input_shape
        self.seed = seed
        # (mean, std) per channel: inputs are normalised after scaling to [0, 1] (dataset.normalize)
        self.normalize = (
            None
            if normalize is None
            else tuple(torch.tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) for v in normalize)
        )
        self.classes = ClassSets(num_classes, self.device)
        # fp16 scales the loss so small gradients survive float16 (one scaler per optimizer, as the official code's)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        # Random choices of the method itself (augmentation), on the device so no copy happens per step.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # a cil.core.diagnostics.Diagnostics when diagnostics are on (set by the builder)
        self.diagnostics: DiagnosticsHooks | None = None
        self.owned = nn.ModuleDict()  # modules trained beside the model (see `own`)
        # Add-ons (cil.core.addons: MKD, CCL-DC): set by the builder; the method calls their hooks, never imports
        # them. Each has begin_observe / main_pass / extra_loss / after_step / on_task_start, state_dict and
        # eval_logits / eval_heads (duck-typed, see cil.core.addons.base.Addon).
        self.addons: Sequence[AddonHooks] = []
        # compile_step: runs the step's tensor function compiled (cil.core.compiled_step); None: eagerly
        self.compiler: StepCompiler | None = None

    @classmethod
    def boundaries_needed(cls, cfg: MethodConfig) -> bool:
        """Whether a run of this method with `cfg` needs task boundaries (GSA: not with method.task_free=true)."""
        return cls.needs_task_boundaries

    @classmethod
    def buffer_extras(cls, cfg: MethodConfig, num_classes: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What the buffer keeps per sample beyond image, label and task: {name: (shape, dtype)} (DER++: logits)."""
        return {}

    def own(self, name: str, module: nn.Module) -> nn.Module:
        """Train `module` (a projection head, proxies) with the model's optimizer, under the optimizer's default
        settings, and keep it in the method's state. Call in `__init__`, so a resumed run adds the same
        parameter groups before the optimizer's state is loaded."""
        module = module.to(self.device)
        self.owned[name] = module
        self.optimizer.add_param_group({"params": list(module.parameters())})
        return module

    @property
    def seen(self) -> torch.Tensor:
        return self.classes.seen

    # -- task boundaries -------------------------------------------------------------------------------------
    def on_task_start(self, task: int, classes: torch.Tensor) -> None:
        """Called before the first batch of each task with the task's class labels (a training-time boundary;
        no task id is used at test time)."""
        self.classes.start_task(task, classes)
        for addon in self.addons:
            addon.on_task_start(self, task, classes)

    def on_task_end(self, task: int) -> None:
        pass

    # -- one incoming batch ----------------------------------------------------------------------------------
    def observe(self, batch: Batch) -> StepOutput:
        self.begin_batch(batch)
        for addon in self.addons:
            addon.begin_observe(self, batch)
        first = None
        for _ in range(self.cfg.iters):
            loss, logits = self.update(batch)
            first = logits if first is None else first
        assert first is not None  # method.iters >= 1 (MethodConfig.validate)
        return StepOutput(loss.detach(), first.detach())

    def update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step. Returns (loss, logits of the incoming batch)."""
        raise NotImplementedError

    def begin_batch(self, batch: Batch) -> None:
        """What `observe` does with an incoming batch before its updates, also for a learner that is stepped with
        `update` alone (CCL-DC's peer) or by a pack (cil.core.packed): the batch's labels become seen, and a method
        that keeps anything per batch (PCR's augmented copy, task-free GSA's pseudo-task) starts it afresh."""
        self.classes.mark_seen(batch.y, batch.y_host)

    def remember(self, batch: Batch, out: StepOutput) -> None:
        """After the step: offer the incoming batch to the buffer (with the extras the method keeps)."""
        if self.uses_buffer and self.buffer is not None:
            self.buffer.add(batch.x, batch.y, batch.task)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits [B, num_classes] of model inputs (already converted by `to_input`), in eval mode."""
        logits: torch.Tensor = self.model(x)
        return logits

    def eval_logits(self, x: torch.Tensor, head: str | None = None) -> torch.Tensor:
        """The logits the learner evaluates: an add-on's head when it claims `head` (None: the run's main head,
        e.g. MKD's teacher or CCL-DC's ensemble), else `predict_logits`."""
        for addon in self.addons:
            out = addon.eval_logits(self, x, head)
            if out is not None:
                return out
        return self.predict_logits(x)

    def eval_heads(self) -> list[str]:
        """Names of the extra evaluation heads the add-ons report (each gets its own accuracy matrix)."""
        return [name for addon in self.addons for name in addon.eval_heads()]

    def distill_pass(self, inputs: torch.Tensor, logits: torch.Tensor, raw: torch.Tensor | None = None) -> None:
        """Declare the step's main supervised pass to the add-ons: the model inputs it ran on (float, as the model
        saw them), their logits (with graph) and, when `inputs` are augmented, the un-augmented inputs of the same
        rows (`raw`). Called by a method's `update` before `step`; a no-op without add-ons."""
        for addon in self.addons:
            addon.main_pass(self, inputs, logits, raw)

    # -- the compiled step (cil.core.compiled_step) -----------------------------------------------------------
    def use_compiled_step(self, compiler: StepCompiler) -> None:
        """Run the step's tensor function through `compiler` from now on, or say (once) why this run cannot."""
        reason = self.compile_blocker()
        if reason is not None:
            compiler.fall_back(reason)
            return
        self.compiler = compiler

    def compile_blocker(self) -> str | None:
        """Why this run's step cannot be compiled, or None: what stops splitting it (`split_blocker`), or fp16's
        GradScaler, which reads a flag back every step."""
        reason = self.split_blocker()
        if reason is None and self.scaler is not None:
            reason = "precision=fp16 reads the GradScaler's inf/nan flag back every step"
        return reason

    def split_blocker(self) -> str | None:
        """Why this run's step cannot be split into host work and one tensor function (`step_args` / `step_loss`,
        what the compiled and the packed steps run), or None. A method with such a split overrides this and calls
        `hooks_blocker` for what it shares with every method."""
        return f"method {self.name} has no compiled step (ER, ER-ACE and GSA have one)"

    def step_args(self, batch: Batch) -> tuple[object, ...] | None:
        """The host work of one update of a method with a packable step (cil.core.packed): the replay draw, the
        masks; returns the arguments of its tensor function `step_loss` (tensors, None, or host values that fix the
        step's shapes). None: the method has no such split."""
        return None

    def pack_blocker(self) -> str | None:
        """Why this run's split step cannot run in a pack beyond what `split_blocker` says, or None."""
        return None

    def packed_outputs(self, args: tuple[object, ...], outputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """(loss, logits of the incoming rows, then whatever `packed_commit` takes back) of `step_loss(*args)`'s
        outputs: what a packed step keeps of one run's step."""
        raise NotImplementedError(f"method {self.name} has no packable step")

    def packed_commit(self, kept: tuple[torch.Tensor, ...]) -> None:
        """Take back this run's share of a packed step's outputs beyond the loss and logits (`packed_outputs`): the
        state its tensor function updates (GSA's gradient statistics)."""

    def pack_settings(self) -> MethodConfig:
        """The method settings that runs of one pack share: all but the host draws' sizes (`buffer_draws`), which
        only change the shapes of a step's arguments."""
        draws: dict[str, Any] = {key.removeprefix("method."): 0 for key in self.cfg.buffer_draws()}
        return dataclasses.replace(self.cfg, **draws)

    def hooks_blocker(self) -> str | None:
        """What stops any method's split step: add-ons and diagnostics read the step's intermediate tensors."""
        if self.addons:
            return f"add-ons ({', '.join(a.name for a in self.addons)}) hook into the step's passes"
        if self.diagnostics is not None:
            return "diagnostics read every loss term of the step"
        return None

    def run_step(self, fn: Callable[..., T], *args: Any, once: bool = False) -> T:
        """`fn(*args)`: the step's tensor function, compiled when the run asks for it (compile_step). `once`: a form
        of the step that a run meets once (the first step, before the buffer holds a row) runs eagerly: a graph of
        its own would cost a compilation for one step."""
        return fn(*args) if self.compiler is None or once else cast(T, self.compiler(fn, *args))

    def first_step(self) -> bool:
        """The buffer exists and is still empty: the run's first step (`run_step`'s `once`)."""
        return self.buffer is not None and len(self.buffer) == 0

    # -- helpers ---------------------------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager[object]:
        """The forward passes' precision, in training and at evaluation alike: bf16 or fp16 autocast, else fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return nullcontext()

    def to_input(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Stored images (uint8) -> the model's float input: [0, 1], then normalised when dataset.normalize."""
        if self.normalize is None:
            return to_float(x_uint8, self.channels_last)
        return self.from_unit(x_uint8.float().div_(255.0))

    def from_unit(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] float images (e.g. after a method's own augmentation) -> the model's input: normalised when
        dataset.normalize, channels-last when asked."""
        x = x01 if self.normalize is None else (x01 - self.normalize[0]) / self.normalize[1]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits: torch.Tensor = self.model(self.to_input(x_uint8))
            return logits.float()

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_of(self.model, x)

    def logits_of(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits of float inputs through `model` (the run's model, an EMA teacher of it, weights averaged with
        them) with this method's head, in float32: the model's linear head; PCR: its cosine proxies. What MKD
        distils and evaluates, as mkd_ocl does per method."""
        with self.autocast():
            logits: torch.Tensor = model(x)
            return logits.float()

    def report(
        self,
        source: str,
        logits: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | str,
        scale: float = 1.0,
        class_weights: torch.Tensor | None = None,
        rows: slice | None = None,
    ) -> None:
        """Describe one term of the loss to the diagnostics (a no-op when they are off): the term is
        scale * mean_i(class_weights[y_i] * CE of row i, softmax over `mask`); source is 'new' or 'replay'.
        `rows`: the term covers only these rows of `logits` and `targets` (sliced here, only when needed)."""
        if self.diagnostics is not None:
            if rows is not None:
                logits, targets = logits[rows], targets[rows]
            self.diagnostics.report(source, logits, targets, mask, scale, class_weights)

    def step(self, loss: torch.Tensor) -> None:
        for addon in self.addons:  # add-ons' loss terms on the same graph (a term of weight 0 is not added)
            extra = addon.extra_loss(self)
            if extra is not None:
                loss = loss + extra
        if self.diagnostics is not None:
            self.diagnostics.before_backward(loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaled(loss).backward()
        self.optimizer_step()
        for addon in self.addons:  # e.g. the EMA teachers follow the updated model
            addon.after_step(self)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: under fp16 multiplied by the GradScaler's scale."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def optimizer_step(self) -> None:
        """Step the optimizer on the gradients of `scaled(loss)`: under fp16 the scaler unscales them, then steps
        unless one is inf/nan (reading that flag back: the one host sync of fp16), and adapts its scale."""
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()  # halves the scale after a skipped step, doubles it after growth_interval good ones

    @property
    def head(self) -> nn.Linear:
        return cast(Backbone, getattr(self.model, "_orig_mod", self.model)).head  # torch.compile wraps the model

    @torch.no_grad()
    def refresh_head_rows(self, labels: list[int], generator: torch.Generator) -> None:
        """Give the head rows of `labels` a fresh default initialisation (nn.Linear's: uniform in
        +-1/sqrt(fan_in), weight and bias), as a head that grows when a task arrives would have, and forget the
        optimizer's running state of those rows."""
        head, rows = self.head, torch.tensor(labels, device=self.head.weight.device)
        bound = 1.0 / head.in_features**0.5
        for p in (head.weight, head.bias):
            fresh = (torch.rand((len(labels), *p.shape[1:]), generator=generator) * 2 - 1) * bound
            p[rows] = fresh.to(p.device, p.dtype)
            for value in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value[rows] = 0

    def replay(
        self, n: int, **filters: Unpack[SampleFilters]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Up to n buffer samples (x, y, task), None when the buffer is missing or has none that match."""
        if self.buffer is None or n <= 0:
            return None
        x, y, t = self.buffer.sample(n, **filters)
        return (x, y, t) if len(y) else None

    def extra_results(self) -> dict[str, Any]:
        """Method-specific summaries for results.json."""
        return {}

    def log_values(self) -> dict[str, float]:
        """Method-specific scalars for metrics.csv / TensorBoard; called only at log intervals (may sync)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        state = {**self.classes.state_dict(), "generator": self.generator.get_state()}
        if len(self.owned):
            state["owned"] = {k: v.cpu() for k, v in self.owned.state_dict().items()}
        if self.addons:
            state["addons"] = {addon.name: addon.state_dict() for addon in self.addons}
        if self.scaler is not None:  # the loss scale and its growth counter: a resumed run scales as this one
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes.load_state_dict(state)
        self.generator.set_state(state["generator"])
        if len(self.owned):
            self.owned.load_state_dict(state["owned"])
        for addon in self.addons:
            addon.load_state_dict(state["addons"][addon.name])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


METHODS: dict[str, type[Method]] = {}
_MethodClass = TypeVar("_MethodClass", bound=type[Method])


def register(cls: _MethodClass) -> _MethodClass:
    """Class decorator: make a method available by its `name` (`method=<name>`)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}: {METHODS[cls.name]} and {cls}")
    METHODS[cls.name] = cls
    return cls
