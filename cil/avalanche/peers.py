"""`method=avalanche_<name>`: Avalanche's own strategy implementations as peers on our streams.

The learner, the stream, the model (cil.core.models.build_model), the optimizer settings, the evaluation and
results.json are ours; only the update rule is Avalanche's. Each task becomes one Avalanche experience whose
dataset is the task's training samples as float tensors *in our stream's order* (with
`classes_in_this_experience`), so Avalanche sees exactly our batches:

- online strategies (naive, replay, er_ace, er_aml, scr, mir, der): `split_online_stream(task, batch_size,
  shuffle=False)` (with `access_task_boundaries=True` only for GSAPlugin, which reads the task); each of our
  batches is one sub-experience, trained with `strategy.train(sub_exp)` (one pass, train_mb_size = batch size) -
  Avalanche's online-CL recipe.
- task strategies (gdumb, agem, lwf): their memory or teacher is updated once per experience
  (`after_training_exp`), which per mini-batch would be a different method (LwF distilling from the model one
  batch ago, A-GEM storing every batch). They get the whole task as one experience at the task's last batch,
  with train_mb_size = batch size, shuffle=False and one epoch: the same batches in the same order.
See docs/avalanche.md for every knob and what maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from cil.avalanche.mkd_options import MKD_NOT_OPTIONS
from cil.core.data.stream import Batch, ClassIncrementalStream
from cil.core.methods.base import Method, MethodConfig, StepOutput, to_float
from cil.core.methods.gsa import GSAConfig
from cil.core.models import Backbone
from cil.errors import ConfigError

if TYPE_CHECKING:
    from cil.avalanche.mkd_plugin import MKDPlugin

ONLINE = ("gsa", "naive", "replay", "er_ace", "er_aml", "scr", "mir", "der")
PER_TASK = ("gdumb", "agem", "lwf")
STRATEGIES = ONLINE + PER_TASK

# method.params each strategy accepts, with defaults (Avalanche's own unless docs/avalanche.md says otherwise)
PARAMS: dict[str, dict[str, Any]] = {
    "gsa": {},  # GSA's knobs are the method config's own (conf/method/avalanche_gsa.yaml mirrors gsa.yaml)
    "naive": {},
    "replay": {"storage": "reservoir"},
    "er_ace": {},
    "er_aml": {"temp": 0.1, "base_temp": 0.07, "same_task_neg": True},
    "scr": {"temperature": 0.1, "projection_dim": 128},
    "mir": {"subsample": 50},
    "der": {"alpha": 0.1, "beta": 0.5},
    "gdumb": {"train_epochs": 10},
    "agem": {},
    "lwf": {"alpha": 1.0, "temperature": 2.0},
}


# replay_batch_size where Avalanche's own default differs from ER's 10 (A-GEM's sample_size, SCR's batch_size_mem)
REPLAY_DEFAULTS = {"agem": 64, "scr": 100}


@dataclass
class AvalancheConfig(MethodConfig):
    """`method=avalanche_<name>`: the strategy's knobs go in `params` (PARAMS lists them with their defaults)."""

    replay_batch_size: int = 10  # batch_size_mem / sample_size where the strategy has one
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AvalancheGSAConfig(GSAConfig):
    """`method=avalanche_gsa`: our GSAPlugin inside Avalanche's Naive, with every knob of `method=gsa`."""

    name: str = "avalanche_gsa"

    def validate(self) -> None:
        super().validate()
        for key in ("fresh_head_rows", "freeze_head_after_first_task"):
            if getattr(self, key):
                raise ConfigError(
                    f"method.{key}=true is not available with method=avalanche_gsa: the strategy owns "
                    f"the model and the optimizer; use method=gsa"
                )
        if not self.train_without_replay:
            raise ConfigError(
                "method.train_without_replay=false is not available with method=avalanche_gsa: the strategy's "
                "loop takes every optimizer step; use method=gsa"
            )


# Peers MKD does not fit, and why.
MKD_REFUSED = {
    "gdumb": "GDumb retrains a freshly initialised model on its memory at every experience: an EMA across "
    "re-initialisations is no teacher",
    "scr": "SCR's training forward gives projection features, not class logits, so there is nothing to distil",
}


def check_peer_addon(method_name: str, addon) -> None:
    """Refuse, with the reason, an add-on that cannot run on Avalanche peer `method_name` (validate())."""
    key = f"addon={addon.name} with method.name={method_name!r}"
    if addon.name == "ccl_dc":
        raise ConfigError(
            f"{key}: CCL-DC trains a second learner with its own model and optimizer beside the first and distils "
            "between the two at every step; an Avalanche strategy's training loop has one model and one optimizer, "
            "so there is no place for the peer. Use a native method with addon=ccl_dc, or drop the add-on"
        )
    if addon.name != "mkd":
        raise ConfigError(f"{key}: only addon=mkd runs on Avalanche peers (as MKDPlugin); drop the add-on")
    name = strategy_name(method_name)
    if name in MKD_REFUSED:
        raise ConfigError(f"{key}: {MKD_REFUSED[name]}; use another peer or drop the add-on")
    from cil.core.addons.mkd import MKDConfig

    default = MKDConfig()
    for k, why in MKD_NOT_OPTIONS.items():
        value = getattr(addon, k)
        if k == "mode" and value in ("block", "main_pass"):
            continue  # block is only the default's value: the peer runs main_pass either way
        if value != getattr(default, k) and not (k == "crop_scale" and list(value) == list(default.crop_scale)):
            raise ConfigError(
                f"addon.mkd.{k}={value!r} is not available with method.name={method_name!r} "
                f"({why}); leave it at its default ({getattr(default, k)!r})"
            )


def mkd_plugin_options(addon) -> dict[str, Any]:
    """MKDPlugin's keywords from an `addon.mkd` config (every MKDConfig knob that is a plugin option)."""
    from dataclasses import fields

    return {f.name: getattr(addon, f.name) for f in fields(addon) if f.name != "name" and f.name not in MKD_NOT_OPTIONS}


def strategy_name(method_name: str) -> str:
    name = method_name[len("avalanche_") :]
    if name not in STRATEGIES:
        raise ConfigError(
            f"method.name={method_name!r}: Avalanche strategy {name!r} is not wired; choose one of "
            f"{['avalanche_' + s for s in STRATEGIES]} (docs/avalanche.md)"
        )
    return name


def peer_config_class(method_name: str) -> type[MethodConfig]:
    return AvalancheGSAConfig if strategy_name(method_name) == "gsa" else AvalancheConfig


def peer_configs() -> dict[str, MethodConfig]:
    """The default config of every `method=avalanche_<name>` option."""
    out: dict[str, MethodConfig] = {}
    for s in STRATEGIES:
        name = f"avalanche_{s}"
        out[name] = (
            AvalancheGSAConfig()
            if s == "gsa"
            else AvalancheConfig(name=name, replay_batch_size=REPLAY_DEFAULTS.get(s, 10), params=dict(PARAMS[s]))
        )
    return out


def strategy_params(cfg) -> dict[str, Any]:
    name = strategy_name(cfg.method.name)
    given = dict(getattr(cfg.method, "params", None) or {})
    unknown = sorted(set(given) - set(PARAMS[name]))
    if unknown:
        raise ConfigError(
            f"method.params {unknown} are not knobs of {cfg.method.name}; it takes "
            f"{sorted(PARAMS[name]) or 'none'} (docs/avalanche.md)"
        )
    return {**PARAMS[name], **given}


class Features(nn.Module):
    """Our backbone without its head (`model.features`), for strategies that need a feature extractor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(Backbone, self.model).features(x)  # one of our models (cil.core.models)


class StrategyModel(nn.Module):
    """Evaluation view of a strategy's *current* model (GDumb swaps in a fresh copy each experience), with the
    outputs padded by -inf up to the benchmark's classes (SCR's NCM classifier only has columns up to the
    largest class it holds a mean for)."""

    def __init__(self, strategy, num_classes: int):
        super().__init__()
        self.strategy, self.num_classes = strategy, num_classes  # a plain attribute: not a submodule

    def train(self, mode: bool = True):
        self.training = mode
        self.strategy.model.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.strategy.model(x)
        if out.shape[1] < self.num_classes:
            out = nn.functional.pad(out, (0, self.num_classes - out.shape[1]), value=float("-inf"))
        return out


def er_aml_class():
    """Avalanche 0.6's ER_AML with one fix: it cycles a `drop_last=True` DataLoader of batch train_mb_size over
    each class's memory; a class holding fewer samples (every new class right after its first batch) yields no
    batch and `avalanche.training.utils.cycle` then spins forever. Here those loaders keep the last, smaller
    batch (`drop_last=False`); nothing else changes."""
    from avalanche.training import ER_AML
    from avalanche.training.utils import cycle
    from torch.utils.data import DataLoader

    class ER_AML_NoHang(ER_AML):
        def _before_training_exp(self, **kwargs):
            super()._before_training_exp(**kwargs)
            if self.replay_loader is not None:
                self.pos_neg_loaders = [
                    cycle(DataLoader(group.buffer, batch_size=self.train_mb_size, shuffle=True, drop_last=False))
                    for group in self.storage_policy.buffer_groups.values()
                ]

    return ER_AML_NoHang


def task_experiences(stream: ClassIncrementalStream, to_input: Callable[[torch.Tensor], torch.Tensor] = to_float):
    """One Avalanche experience per task: float inputs in [0, 1] (what our models take) in our stream order."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    datasets = []
    for task in stream.tasks:
        idx = task.train_idx_host
        x = to_input(stream.dataset.train_x[idx].to(stream.device)).cpu()
        y = stream.dataset.train_y[idx].long()
        datasets.append(tensor_dataset(x, y, task_labels=0, targets=y.tolist()))
    return list(with_classes_timeline(benchmark_from_datasets(train=datasets)).train_stream)


def build_strategy(
    name: str, params: dict, cfg, model: nn.Module, num_classes: int, make_optimizer: Callable, device: torch.device
):
    """One Avalanche strategy with our batch size, buffer size and replay batch size where it has them."""
    from avalanche.training import AGEM, DER, ER_ACE, MIR, SCR, GDumb, LwF, Naive
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer, ExperienceBalancedBuffer, ReservoirSamplingBuffer

    mb, mem, rb = cfg.stream.batch_size, cfg.buffer.size, cfg.method.replay_batch_size
    common = dict(train_mb_size=mb, train_epochs=1, eval_mb_size=cfg.eval.batch_size, device=device, evaluator=None)
    ce = nn.CrossEntropyLoss()
    if name in ("replay", "er_ace", "er_aml", "scr", "mir", "der", "gdumb", "agem") and mem < 1:
        raise ConfigError(f"buffer.size={mem}: avalanche_{name} needs a memory; use buffer.size >= 1")
    if name == "gsa":  # our GSAPlugin inside Avalanche's Naive: the plugin-vs-learner parity check
        from cil.avalanche.plugin import GSA_OPTIONS, GSAPlugin

        plugin = GSAPlugin(
            mem_size=mem, num_classes=num_classes, seed=cfg.seed, **{k: getattr(cfg.method, k) for k in GSA_OPTIONS}
        )
        return Naive(model=model, optimizer=make_optimizer(model), criterion=ce, plugins=[plugin], **common)
    if name == "naive":
        return Naive(model=model, optimizer=make_optimizer(model), criterion=ce, **common)
    if name == "replay":
        policies = {
            "reservoir": ReservoirSamplingBuffer,
            "class_balanced": ClassBalancedBuffer,
            "experience_balanced": ExperienceBalancedBuffer,
        }
        if params["storage"] not in policies:
            raise ConfigError(f"method.params.storage={params['storage']!r}: choose one of {sorted(policies)}")
        policy = policies[params["storage"]](max_size=mem)
        plugin = ReplayPlugin(mem_size=mem, batch_size=mb, batch_size_mem=rb, storage_policy=policy)
        return Naive(model=model, optimizer=make_optimizer(model), criterion=ce, plugins=[plugin], **common)
    if name == "er_ace":
        return ER_ACE(
            model=model, optimizer=make_optimizer(model), criterion=ce, mem_size=mem, batch_size_mem=rb, **common
        )
    if name == "er_aml":
        return er_aml_class()(
            model=model,
            feature_extractor=Features(model),
            optimizer=make_optimizer(model),
            criterion=ce,
            mem_size=mem,
            batch_size_mem=rb,
            temp=params["temp"],
            base_temp=params["base_temp"],
            same_task_neg=params["same_task_neg"],
            **common,
        )
    if name == "scr":
        from avalanche.models import SCRModel

        if not hasattr(model, "features") or not hasattr(model, "feature_dim"):
            raise ConfigError(f"model.name={cfg.model.name!r} has no features(); avalanche_scr needs a backbone")
        d = cast(Backbone, model).feature_dim  # checked just above
        projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, params["projection_dim"]))
        scr_model = SCRModel(feature_extractor=Features(model), projection=projection).to(device)
        return SCR(
            model=scr_model,
            optimizer=make_optimizer(scr_model),
            mem_size=mem,
            batch_size_mem=rb,
            temperature=params["temperature"],
            **common,
        )
    if name == "mir":
        return MIR(
            model=model,
            optimizer=make_optimizer(model),
            criterion=ce,
            mem_size=mem,
            subsample=params["subsample"],
            batch_size_mem=rb,
            **common,
        )
    if name == "der":
        return DER(
            model=model,
            optimizer=make_optimizer(model),
            criterion=ce,
            mem_size=mem,
            batch_size_mem=rb,
            alpha=params["alpha"],
            beta=params["beta"],
            **common,
        )
    if name == "gdumb":
        return GDumb(
            model=model,
            optimizer=make_optimizer(model),
            criterion=ce,
            mem_size=mem,
            **{**common, "train_epochs": params["train_epochs"]},
        )
    if name == "agem":
        # A-GEM keeps patterns_per_exp samples of every experience: buffer.size spread over the tasks.
        return AGEM(
            model=model,
            optimizer=make_optimizer(model),
            criterion=ce,
            patterns_per_exp=max(1, mem // cfg.stream.n_tasks),
            sample_size=rb,
            **common,
        )
    if name == "lwf":
        return LwF(
            model=model,
            optimizer=make_optimizer(model),
            criterion=ce,
            alpha=params["alpha"],
            temperature=params["temperature"],
            **common,
        )
    raise AssertionError(name)


class AvalanchePeer(Method):
    """Our Method interface around an Avalanche strategy: `observe(batch)` hands the batch to Avalanche."""

    uses_buffer = False  # Avalanche keeps its own memory

    def __init__(
        self, strategy, name: str, stream: ClassIncrementalStream, cfg, device: torch.device, seed: int, normalize=None
    ):
        super().__init__(
            StrategyModel(strategy, stream.num_classes),
            strategy.optimizer,
            None,
            cfg.method,
            stream.num_classes,
            device,
            seed=seed,
            input_shape=stream.dataset.input_shape,
            normalize=normalize,
        )
        self.strategy, self.strategy_name = strategy, name
        self.online = name in ONLINE
        # `shuffle` also reaches the loaders Avalanche builds over its memory (ReplayPlugin, GDumb): False there
        # would replay the same first memory rows at every step. An online sub-experience is one batch, so
        # shuffling only permutes rows inside it. Kept False where our exact order matters: GSA (parity with our
        # learner) and the per-task strategies that train on our batches (LwF, A-GEM: same batches in order).
        self.shuffle = name not in ("gsa", "lwf", "agem")
        self.stream = stream
        self.experiences = task_experiences(stream, self.to_input)
        self.sub_experiences: Iterator[Any] | None = None  # online: the current task's sub-experiences
        self.params: dict[str, Any] = {}
        self.mkd: MKDPlugin | None = None  # the MKDPlugin of `addon=mkd` (its eval head is the run's main head)
        # Avalanche resets strategy.loss when train() ends: the loss is read where it is computed
        self.loss_probe = loss_probe()
        strategy.plugins.append(self.loss_probe)

    def on_task_start(self, task: int, classes: torch.Tensor) -> None:
        super().on_task_start(task, classes)
        if self.online:
            from avalanche.benchmarks.scenarios.online import split_online_stream

            # Only GSAPlugin reads the task boundary (origin_experience); exposing it costs the other strategies
            # ~40% of their time (measured on avalanche_replay, Split MNIST) and none of them uses it.
            self.sub_experiences = iter(
                split_online_stream(
                    [self.experiences[task]],
                    experience_size=self.stream.batch_size,
                    shuffle=False,
                    access_task_boundaries=self.strategy_name == "gsa",
                )
            )

    @torch.no_grad()
    def _online_logits(self, batch: Batch) -> torch.Tensor:
        """Prediction on the incoming batch before it is learned (eval mode; SCR: its NCM classifier)."""
        was = self.model.training
        self.model.eval()
        try:
            logits = self.model(self.to_input(batch.x)).float()
        except (AssertionError, RuntimeError, ValueError, IndexError):  # SCR's NCM before any class mean
            logits = torch.zeros(len(batch.y), self.num_classes, device=self.device)
        self.model.train(was)
        return logits

    def observe(self, batch: Batch) -> StepOutput:
        assert batch.task is not None and batch.step_in_task is not None  # peers need boundaries (cil.run.config)
        self.classes.mark_seen(batch.y, batch.y_host)
        logits = self._online_logits(batch)
        if self.online:
            assert self.sub_experiences is not None  # made by on_task_start
            sub = next(self.sub_experiences)
            if batch.step_in_task == 0 and list(sub.dataset.targets) != batch.y_host.tolist():
                raise AssertionError("Avalanche sub-experience differs from our batch")  # order is the contract
            self.strategy.train(sub, shuffle=self.shuffle)
        elif batch.step_in_task + 1 == self.stream.batches_per_task[batch.task]:
            self.strategy.train(self.experiences[batch.task], shuffle=self.shuffle)
        return StepOutput(self.loss_probe.take(self.device), logits)

    def update(self, batch):  # not used: observe hands the batch to Avalanche
        raise NotImplementedError

    def eval_logits(self, x: torch.Tensor, head=None) -> torch.Tensor:
        """With addon=mkd: MKDPlugin's eval_head (head None) or extra head (mkd_teacher...), padded like the
        student's (StrategyModel)."""
        if self.mkd is None:
            return super().eval_logits(x, head)
        from cil.core.addons.mkd import EXTRA_HEADS

        out = self.mkd.head_logits(self.strategy, x, None if head is None else EXTRA_HEADS[head])
        if out.shape[1] < self.num_classes:
            out = nn.functional.pad(out, (0, self.num_classes - out.shape[1]), value=float("-inf"))
        return out

    def eval_heads(self) -> list[str]:
        return [] if self.mkd is None else self.mkd.eval_heads()

    def log_values(self) -> dict[str, float]:
        return {} if self.mkd is None else self.mkd.log_values()

    def extra_results(self) -> dict:
        out = {
            "avalanche": {
                "strategy": type(self.strategy).__name__,
                "mode": "online" if self.online else "task",
                "params": self.params,
            }
        }
        gsa = [p for p in self.strategy.plugins if type(p).__name__ == "GSAPlugin"]
        if gsa:
            out["gsa"] = gsa[0].summary()
        if self.mkd is not None:
            out.update(self.mkd.extra_results())
        return out

    def state_dict(self) -> dict:
        raise ConfigError(
            f"method.name={self.cfg.name!r}: Avalanche peers do not checkpoint inside our learner; "
            "run them with checkpoint.at_task_end=false and checkpoint.every=0"
        )


def loss_probe():
    """An Avalanche plugin keeping the mean training loss of the iterations since it was last read (on the device:
    no read-back); `take(device)` returns it and starts over."""
    from avalanche.core import SupervisedPlugin

    class LossProbe(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.total, self.count = None, 0

        def after_backward(self, strategy, **kwargs):
            loss = strategy.loss.detach().float().reshape(-1)[0]
            self.total = loss if self.total is None else self.total + loss
            self.count += 1

        def take(self, device) -> torch.Tensor:
            mean = torch.zeros((), device=device) if self.total is None else self.total / self.count
            self.total, self.count = None, 0
            return mean

    return LossProbe()


def build_peer(
    cfg,
    model: nn.Module,
    stream: ClassIncrementalStream,
    device: torch.device,
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    normalize=None,
) -> AvalanchePeer:
    name = strategy_name(cfg.method.name)
    params = strategy_params(cfg)
    strategy = build_strategy(
        name, params, cfg, model, stream.num_classes, lambda m: make_optimizer(m.parameters()), device
    )
    peer = AvalanchePeer(strategy, name, stream, cfg, device, seed=cfg.seed + 2, normalize=normalize)
    peer.params = params
    from cil.core.addons import addon_configs

    for addon in addon_configs(cfg.addon).values():  # validate() refused all but addon=mkd on a fitting peer
        check_peer_addon(cfg.method.name, addon)
        from cil.avalanche.mkd_plugin import MKDPlugin

        peer.mkd = MKDPlugin(**mkd_plugin_options(addon))
        strategy.plugins.append(peer.mkd)  # after GSAPlugin (avalanche_gsa): it adds to the loss GSA set
    return peer
