"""The typed run configuration: one dataclass per config group, plus the checks types cannot express.

Hydra uses these dataclasses as the schema of `conf/` (so a wrong type or an unknown key fails at start with the
key named); `validate` then checks ranges and combinations. Nothing here imports hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from cil.errors import ConfigError


@dataclass
class DatasetConfig:
    name: str = "mnist"
    root: Optional[str] = None  # None: $CIL_DATA_ROOT, else ./data
    path: Optional[str] = None  # imagefolder: the folder holding train/ and test/
    image_size: Optional[int] = None  # imagefolder: resize every image to this square size
    download: bool = True  # let torchvision download missing files (writes into the data root)
    verify: bool = True  # check md5 sums of files whose canonical sums are known


@dataclass
class StreamConfig:
    n_tasks: int = 5
    batch_size: int = 10
    # "natural" (0..K-1), "random" (seeded permutation) or an explicit list of class labels
    class_order: Any = "random"
    samples_per_class: Optional[int] = None  # train on a seeded subset of this many samples per class (null: all)


@dataclass
class BufferConfig:
    size: int = 500
    policy: str = "reservoir"  # reservoir | class_balanced


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [400, 400])  # mlp only
    nf: Optional[int] = None  # resnets: base width; None keeps the architecture's own (20 reduced, 64 full)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.0  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    weight_decay: float = 0.0


@dataclass
class MethodConfig:
    """One flat set of method knobs; each method reads the ones it documents (see docs/methods.md)."""

    name: str = "er"
    replay_batch_size: int = 10
    iters: int = 1  # updates per incoming batch
    # GSA (../shared/gsa.md): each of the paper's choices can be switched off for ablations
    current_task_replay: int = 22
    warmup_batches: int = 5
    buffer_loss_weight: float = 2.0
    adaptive_weights: bool = True  # False: w_c = 1 (plain CE on the replay batch)
    balanced_replay: bool = True  # False: replay batch drawn uniformly from the whole buffer
    task_only_new_loss: bool = True  # False: new-data loss over all seen classes
    two_views: bool = True  # [A(x), hflip(A(x))]; False: one augmented view
    independent_views: bool = False  # True: [A(x), hflip(A'(x))], two draws, as the official code does
    augment: bool = True  # random grayscale + random resized crop
    new_branch_augment: bool = True  # the official code's extra augmentation pass on the new-data branch
    crop_scale: List[float] = field(default_factory=lambda: [0.6, 1.0])
    grayscale_p: float = 0.2
    # methods run through Avalanche (method=avalanche_<name>) take their own knobs here
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    batch_size: int = 256  # on a CPU a ResNet evaluates ~1.7x faster in 100-256 batches than in 1000 (performance.md)
    anytime_every: int = 100  # stream batches between anytime evaluations; 0 turns them off
    anytime_samples: int = 500  # size of the fixed, seeded test subsample used for anytime accuracy (500: the
    # evaluations then cost under a tenth of an ER run on the CPU, see docs/performance.md)


@dataclass
class LogConfig:
    every: int = 50  # stream batches between reading losses back from the device
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False


@dataclass
class CheckpointConfig:
    every: int = 0  # stream batches between checkpoints; 0: only at task ends (if at_task_end)
    at_task_end: bool = True
    resume: bool = True  # continue from the run directory's checkpoint when one exists
    keep: bool = False  # keep checkpoint.pt after a complete run


@dataclass
class DiagnosticsConfig:
    """Gradient-imbalance diagnostics (cil/diagnostics.py, README "Diagnostics"); training is unchanged."""

    enabled: bool = False
    every: int = 50  # stream batches between parameter-gradient measurements and statistics snapshots
    plots: bool = True  # write the PNGs into the run folder at the end


@dataclass
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (opt-in)
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default (1 per run in sweeps)
    deterministic: bool = False  # CUDA: deterministic kernels (cil.determinism); CPU runs are deterministic anyway
    experiment: Optional[str] = None  # name of the protocol, set by conf/experiment/*


PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adam")
BUFFER_POLICIES = ("reservoir", "class_balanced")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: RunConfig, num_classes: Optional[int] = None) -> None:
    """Check ranges and combinations. With `num_classes` (known once the dataset is loaded), check the split too."""
    _require(cfg.stream.n_tasks >= 1, "stream.n_tasks", cfg.stream.n_tasks, "use an integer >= 1")
    _require(cfg.stream.batch_size >= 1, "stream.batch_size", cfg.stream.batch_size, "use an integer >= 1")
    _require(cfg.buffer.size >= 0, "buffer.size", cfg.buffer.size, "use an integer >= 0")
    _require(cfg.buffer.policy in BUFFER_POLICIES, "buffer.policy", cfg.buffer.policy,
             f"choose one of {BUFFER_POLICIES}")
    _require(all(h >= 1 for h in cfg.model.hidden), "model.hidden", list(cfg.model.hidden),
             "use a list of layer widths >= 1 ([] for a linear model)")
    _require(cfg.model.nf is None or cfg.model.nf >= 1, "model.nf", cfg.model.nf, "use null or an integer >= 1")
    _require(cfg.method.iters >= 1, "method.iters", cfg.method.iters, "use an integer >= 1")
    _require(cfg.method.replay_batch_size >= 0, "method.replay_batch_size", cfg.method.replay_batch_size,
             "use an integer >= 0")
    _require(cfg.method.current_task_replay >= 0, "method.current_task_replay", cfg.method.current_task_replay,
             "use an integer >= 0")
    _require(cfg.method.warmup_batches >= 0, "method.warmup_batches", cfg.method.warmup_batches, "use an integer >= 0")
    _require(cfg.method.buffer_loss_weight >= 0, "method.buffer_loss_weight", cfg.method.buffer_loss_weight,
             "use a number >= 0")
    _require(0.0 <= cfg.method.grayscale_p <= 1.0, "method.grayscale_p", cfg.method.grayscale_p, "use 0 <= p <= 1")
    scale = list(cfg.method.crop_scale)
    _require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "method.crop_scale", scale,
             "use [lo, hi] with 0 < lo <= hi <= 1")
    _require(cfg.optimizer.name in OPTIMIZERS, "optimizer.name", cfg.optimizer.name, f"choose one of {OPTIMIZERS}")
    _require(cfg.optimizer.lr > 0, "optimizer.lr", cfg.optimizer.lr, "use a learning rate > 0")
    _require(cfg.optimizer.momentum >= 0, "optimizer.momentum", cfg.optimizer.momentum, "use a value >= 0")
    betas = list(cfg.optimizer.betas)
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optimizer.betas", betas,
             "use [beta1, beta2] with 0 <= beta < 1")
    _require(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", cfg.optimizer.weight_decay, "use a value >= 0")
    _require(cfg.precision in PRECISIONS, "precision", cfg.precision, f"choose one of {PRECISIONS}")
    _require(cfg.threads is None or cfg.threads >= 1, "threads", cfg.threads,
             "use null (torch's default) or an integer >= 1 (1 when several runs share the machine)")
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "use an integer >= 1")
    _require(cfg.eval.anytime_every >= 0, "eval.anytime_every", cfg.eval.anytime_every, "use 0 (off) or an integer >= 1")
    _require(cfg.eval.anytime_samples >= 1, "eval.anytime_samples", cfg.eval.anytime_samples, "use an integer >= 1")
    _require(cfg.log.every >= 1, "log.every", cfg.log.every, "use an integer >= 1")
    _require(cfg.diagnostics.every >= 1, "diagnostics.every", cfg.diagnostics.every, "use an integer >= 1")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "use 0 (task ends only) or >= 1")
    order = cfg.stream.class_order
    if isinstance(order, str):
        _require(order in ("natural", "random"), "stream.class_order", order,
                 "use 'natural', 'random' or a list of class labels")
    uses_replay = cfg.method.name not in ("naive",) and not cfg.method.name.startswith("avalanche_")
    if uses_replay and cfg.buffer.size < cfg.method.replay_batch_size:
        raise ConfigError(
            f"buffer.size={cfg.buffer.size} is smaller than method.replay_batch_size={cfg.method.replay_batch_size}: "
            f"method {cfg.method.name!r} replays that many samples per step; raise buffer.size or lower "
            "method.replay_batch_size")
    if num_classes is not None:
        if not isinstance(order, str):
            order = list(order)
            if sorted(order) != list(range(num_classes)):
                raise ConfigError(
                    f"stream.class_order={order} must be a permutation of the dataset's labels 0..{num_classes - 1}")
        if num_classes % cfg.stream.n_tasks != 0:
            divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
            raise ConfigError(
                f"stream.n_tasks={cfg.stream.n_tasks} does not divide the {num_classes} classes of dataset "
                f"{cfg.dataset.name!r} evenly; choose one of {divisors}")
