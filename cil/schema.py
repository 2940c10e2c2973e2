"""The run's typed config: one plain dataclass per config group (no torch, no hydra).

It is the Hydra schema of `conf/` (so a wrong type or an unknown key fails at start with the key named) and
the format of the `config` that every results.json records, so both the runner and the analysis read it. The
`method` group's schema is each method's own config dataclass, declared in its module (cil.core.methods.<name>,
cil.avalanche.peers). Ranges and combinations are checked by cil.run.config.validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DatasetConfig:
    name: str = "mnist"
    root: str | None = None  # None: $CIL_DATA_ROOT, else ./data
    path: str | None = None  # imagefolder: the folder holding train/ and test/
    image_size: int | None = None  # imagefolder: resize every image to this square size
    download: bool = True  # let torchvision download missing files (writes into the data root)
    verify: bool = True  # check md5 sums of files whose canonical sums are known
    normalize: bool = False  # standardise inputs per channel (published CIFAR values, else the training set's)


@dataclass
class StreamConfig:
    n_tasks: int = 5
    batch_size: int = 10
    # "natural" (0..K-1), "random" (torch permutation seeded by `seed`), "numpy_shuffle" (numpy's legacy generator
    # seeded by `seed` shuffles 0..K-1, as mkd_ocl, CCL-DC and PCR draw it) or an explicit list of class labels
    class_order: Any = "random"
    samples_per_class: int | None = None  # train on a seeded subset of this many samples per class (null: all)
    # disjoint (tasks of disjoint classes) | iblurry | siblurry (blurry, boundaries hidden from methods:
    # docs/streams.md)
    kind: str = "disjoint"
    disjoint_class_pct: int = 50  # blurry streams: N, the share of classes (percent) that appear in one task only
    blurry_sample_pct: int = 10  # blurry streams: M, the share of blurry classes' samples (percent) spread over tasks


@dataclass
class BufferConfig:
    size: int = 500
    policy: str = "reservoir"  # reservoir | class_balanced


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [400, 400])  # mlp only
    nf: int | None = None  # resnets: base width; None keeps the architecture's own (20 reduced, 64 full)
    # resnets' final pooling: global (8nf features at any input size) | avg4 (a fixed 4x4 window, as mkd_ocl's and
    # CCL-DC's ResNet: the same on 32x32 inputs, 4 x 8nf = 2048 features on 64x64 TinyImageNet)
    pool: str = "global"


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw (Adam with decoupled weight decay)
    lr: float = 0.1
    momentum: float = 0.0  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    weight_decay: float = 0.0  # sgd, adam: L2 added to the gradient; adamw: decoupled, p <- p - lr * wd * p


@dataclass
class EvalConfig:
    batch_size: int = 256  # rows per evaluation forward pass (the choice: docs/performance.md)
    anytime_every: int = 100  # stream batches between anytime evaluations; 0 turns them off
    anytime_samples: int = 500  # size of the fixed, seeded test subsample used for anytime accuracy
    # stream samples between evaluations on the whole test set of the classes seen so far (A_AUC, as in i-Blurry);
    # null: 100 on blurry streams, off on disjoint ones; 0: off
    anytime_every_samples: int | None = None
    # test | validation: train on the training set minus a held-out part of every class and evaluate on that part
    # (hyperparameter search: the test set is dropped before the stream is built, so a trial never sees it)
    split: str = "test"
    validation_fraction: float = 0.1  # share of every class's training samples held out when split=validation
    # seen: every prediction's argmax spans the classes seen so far | all: every head unit (mkd_ocl, CCL-DC, OCM,
    # OnPro, PCR); for every evaluation (task ends, anytime, A_AUC, the add-ons' heads) and online accuracy
    classes: str = "seen"


@dataclass
class LogConfig:
    every: int = 50  # stream batches between reading losses back from the device
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False
    wandb: bool = False  # Weights & Biases (README "Weights & Biases"; needs `pip install 'cil[wandb]'`)
    wandb_project: str = "cil"
    wandb_entity: str | None = None  # None: the logged-in user's default entity
    wandb_tags: list[str] = field(default_factory=list)
    wandb_group: str | None = None  # None: a sweep job's group is its sweep folder; a single run has none
    # online | offline (files only, `wandb sync` later) | disabled; None: W&B's own choice ($WANDB_MODE, else online)
    wandb_mode: str | None = None


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
class ComputeConfig:
    """Compute accounting (cil/core/compute.py, docs/compute.md): results.json `flops`."""

    flops: bool = True  # count training-step FLOPs with PyTorch's FlopCounterMode on sampled steps
    flops_every: int = 100  # count one trained batch in every this many (a counted step is ~4x slower on the MLP)


@dataclass
class RealtimeConfig:
    """Real-time evaluation (Ghunaim et al., CVPR 2023; docs/compute.md): the stream moves at the reference
    method's pace, and a method k times as costly trains on every k-th batch only."""

    enabled: bool = False
    reference: str = "er"  # the native method whose training step sets the stream's rate (its default config)
    delay: int | None = None  # k by hand; None: ceil(FLOPs(method step) / FLOPs(reference step)), measured


@dataclass
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    method: Any = None  # a method's own config (cil.core.methods.<name>.Config), chosen by `method=<name>`
    # add-ons on the method's step (cil.core.addons): {name: its config}, chosen by `addon=mkd` / `addon=[mkd,ccl_dc]`
    addon: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    # fp32 | bf16 (autocast) | fp16 (CUDA: autocast float16 and a GradScaler per optimizer) | auto (bf16 where the
    # device has it natively, else fp32)
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (opt-in)
    # none | default | reduce-overhead: the ER / ER-ACE / GSA step compiled whole, reduce-overhead as CUDA graphs
    # (cil.core.compiled_step; docs/performance.md, "The compiled step")
    compile_step: str = "none"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (1 per run in sweeps)
    deterministic: bool = False  # CUDA: deterministic kernels (cil.run.determinism); CPU runs are deterministic anyway
    experiment: str | None = None  # name of the protocol, set by conf/experiment/*
