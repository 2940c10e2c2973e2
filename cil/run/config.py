"""The checks a run's config gets before anything is built (the types are cil.schema's), and each method's
config with its defaults. Nothing here imports hydra."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from cil.errors import ConfigError, require
from cil.schema import RunConfig

if TYPE_CHECKING:
    from cil.core.methods.base import MethodConfig

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
OPTIMIZERS = ("sgd", "adam", "adamw")
MODEL_POOLS = ("global", "avg4")
EVAL_CLASSES = ("seen", "all")
BUFFER_POLICIES = ("reservoir", "class_balanced")
EVAL_SPLITS = ("test", "validation")
WANDB_MODES = ("online", "offline", "disabled")
STREAM_KINDS = ("disjoint", "iblurry", "siblurry")


def method_schema(name: str) -> type[MethodConfig]:
    """The config dataclass of method `name` (ours, or an Avalanche peer's)."""
    if name.startswith("avalanche_"):
        from cil.avalanche.peers import peer_config_class

        return peer_config_class(name)
    from cil.core.methods import method_class

    return method_class(name).Config


def method_defaults(name: str) -> MethodConfig:
    """A fresh config of method `name` with its defaults (what `method=<name>` starts from)."""
    if name.startswith("avalanche_"):
        from cil.avalanche.peers import peer_configs

        return peer_configs()[f"avalanche_{strategy_name(name)}"]
    from cil.core.methods import method_class

    return method_class(name).Config()


def default_config(method: str = "er", **sections) -> RunConfig:
    """The built-in defaults (conf/config.yaml with no protocol) with method `method`'s own; `sections`
    replace whole groups, e.g. default_config("gsa", dataset=DatasetConfig(name="digits"))."""
    return RunConfig(method=method_defaults(method), **sections)


def strategy_name(name: str) -> str:
    from cil.avalanche.peers import strategy_name as peer_strategy

    return peer_strategy(name)


def uses_replay(name: str) -> bool:
    if name.startswith("avalanche_"):
        return False  # Avalanche keeps its own memory (its strategies check their own sizes)
    from cil.core.methods import method_class

    return method_class(name).uses_buffer


def validate(cfg: RunConfig) -> None:
    """Check ranges and combinations before anything is built (the dataset's class count is checked by the
    stream: cil.core.data.stream)."""
    require(0 <= cfg.seed < 2**62, "seed", cfg.seed, "use an integer from 0 to 2**62")
    require(cfg.stream.n_tasks >= 1, "stream.n_tasks", cfg.stream.n_tasks, "use an integer >= 1")
    require(cfg.stream.batch_size >= 1, "stream.batch_size", cfg.stream.batch_size, "use an integer >= 1")
    require(
        cfg.stream.kind in STREAM_KINDS,
        "stream.kind",
        cfg.stream.kind,
        f"choose one of {STREAM_KINDS} (docs/streams.md)",
    )
    require(
        0 <= cfg.stream.disjoint_class_pct <= 100,
        "stream.disjoint_class_pct",
        cfg.stream.disjoint_class_pct,
        "use a percentage from 0 to 100",
    )
    require(
        0 <= cfg.stream.blurry_sample_pct <= 100,
        "stream.blurry_sample_pct",
        cfg.stream.blurry_sample_pct,
        "use a percentage from 0 to 100",
    )
    require(
        cfg.eval.anytime_every_samples is None or cfg.eval.anytime_every_samples >= 0,
        "eval.anytime_every_samples",
        cfg.eval.anytime_every_samples,
        "use null (100 on blurry streams, off on disjoint ones), 0 (off) or a number of stream samples",
    )
    require(cfg.buffer.size >= 0, "buffer.size", cfg.buffer.size, "use an integer >= 0")
    require(
        cfg.buffer.policy in BUFFER_POLICIES, "buffer.policy", cfg.buffer.policy, f"choose one of {BUFFER_POLICIES}"
    )
    require(
        all(h >= 1 for h in cfg.model.hidden),
        "model.hidden",
        list(cfg.model.hidden),
        "use a list of layer widths >= 1 ([] for a linear model)",
    )
    require(cfg.model.nf is None or cfg.model.nf >= 1, "model.nf", cfg.model.nf, "use null or an integer >= 1")
    require(cfg.model.pool in MODEL_POOLS, "model.pool", cfg.model.pool, f"choose one of {MODEL_POOLS}")
    require(
        cfg.model.pool == "global" or cfg.model.name != "mlp",
        "model.pool",
        cfg.model.pool,
        "the MLP has no pooling; avg4 is for model=resnet18 or reduced_resnet18 (use model.pool=global)",
    )
    require(cfg.optimizer.name in OPTIMIZERS, "optimizer.name", cfg.optimizer.name, f"choose one of {OPTIMIZERS}")
    require(cfg.optimizer.lr > 0, "optimizer.lr", cfg.optimizer.lr, "use a learning rate > 0")
    require(cfg.optimizer.momentum >= 0, "optimizer.momentum", cfg.optimizer.momentum, "use a value >= 0")
    betas = list(cfg.optimizer.betas)
    require(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        "optimizer.betas",
        betas,
        "use [beta1, beta2] with 0 <= beta < 1",
    )
    require(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", cfg.optimizer.weight_decay, "use a value >= 0")
    require(cfg.precision in PRECISIONS, "precision", cfg.precision, f"choose one of {PRECISIONS}")
    from cil.core.compiled_step import COMPILE_MODES

    require(cfg.compile_step in COMPILE_MODES, "compile_step", cfg.compile_step, f"choose one of {COMPILE_MODES}")
    require(
        not (cfg.compile and cfg.compile_step != "none"),
        "compile",
        cfg.compile,
        f"compile=true compiles the model alone, compile_step={cfg.compile_step} the whole step around it; "
        "choose one (compile=false)",
    )
    require(
        cfg.precision != "fp16" or not cfg.method.name.startswith("avalanche_"),
        "precision",
        cfg.precision,
        f"method={cfg.method.name} trains Avalanche's strategy in fp32 (no GradScaler there); use precision=fp32",
    )
    if not isinstance(cfg.stream.class_order, str):  # a list of labels: integers only (the stream checks the rest)
        from cil.core.data.stream import integer_labels

        integer_labels(cfg.stream.class_order)
    if cfg.stream.class_order == "numpy_shuffle":
        from cil.core.data.stream import NUMPY_SEED_FIX, NUMPY_SEEDS

        require(cfg.seed < NUMPY_SEEDS, "seed", cfg.seed, NUMPY_SEED_FIX)
    require(
        cfg.threads is None or cfg.threads >= 1,
        "threads",
        cfg.threads,
        "use null (torch's default) or an integer >= 1 (1 when several runs share the machine)",
    )
    require(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "use an integer >= 1")
    require(
        cfg.eval.classes in EVAL_CLASSES,
        "eval.classes",
        cfg.eval.classes,
        f"choose one of {EVAL_CLASSES} (seen: argmax over the classes seen so far; all: over every head unit)",
    )
    require(cfg.eval.anytime_every >= 0, "eval.anytime_every", cfg.eval.anytime_every, "use 0 (off) or an integer >= 1")
    require(cfg.eval.anytime_samples >= 1, "eval.anytime_samples", cfg.eval.anytime_samples, "use an integer >= 1")
    require(
        cfg.eval.split in EVAL_SPLITS,
        "eval.split",
        cfg.eval.split,
        f"choose one of {EVAL_SPLITS} (validation: a held-out part of the training set, for tuning)",
    )
    require(
        0 < cfg.eval.validation_fraction < 1,
        "eval.validation_fraction",
        cfg.eval.validation_fraction,
        "use a share between 0 and 1, e.g. 0.1",
    )
    require(cfg.log.every >= 1, "log.every", cfg.log.every, "use an integer >= 1")
    if cfg.log.wandb:
        require(
            cfg.log.wandb_mode in (None, *WANDB_MODES),
            "log.wandb_mode",
            cfg.log.wandb_mode,
            f"choose one of {WANDB_MODES} (or null: $WANDB_MODE, else online)",
        )
        require(bool(cfg.log.wandb_project), "log.wandb_project", cfg.log.wandb_project, "name a W&B project")
        if importlib.util.find_spec("wandb") is None:  # before anything is written, not at the first log call
            raise ConfigError(
                "log.wandb=true needs the wandb package, which is not installed: "
                "pip install 'cil[wandb]', or set log.wandb=false"
            )
    require(cfg.diagnostics.every >= 1, "diagnostics.every", cfg.diagnostics.every, "use an integer >= 1")
    require(
        cfg.compute.flops_every >= 1,
        "compute.flops_every",
        cfg.compute.flops_every,
        "use an integer >= 1 (compute.flops=false turns counting off)",
    )
    if cfg.realtime.enabled:
        require(
            cfg.realtime.delay is None or cfg.realtime.delay >= 1,
            "realtime.delay",
            cfg.realtime.delay,
            "use null (measured from FLOPs) or an integer >= 1 (1: train on every batch)",
        )
        ref = cfg.realtime.reference
        from cil.core.methods import METHODS

        require(
            ref in METHODS,
            "realtime.reference",
            ref,
            f"name a native method whose step sets the stream's rate: one of {sorted(METHODS)}",
        )
        if cfg.realtime.delay is None and cfg.method.name.startswith("avalanche_"):
            raise ConfigError(
                f"realtime.delay=null with method={cfg.method.name}: the delay is measured on our own "
                "methods' steps only; set realtime.delay=<k> by hand for an Avalanche peer"
            )
    require(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "use 0 (task ends only) or >= 1")
    schema = method_schema(cfg.method.name)
    if not isinstance(cfg.method, schema):
        raise ConfigError(
            f"method.name={cfg.method.name!r} needs its own config ({schema.__name__}); select the "
            f"method with method={cfg.method.name} rather than setting method.name"
        )
    cfg.method.validate()
    check_stream_method(cfg)
    from cil.core.addons import addon_configs
    from cil.core.methods import method_class

    for addon in addon_configs(cfg.addon).values():
        addon.validate()
        if cfg.method.name.startswith("avalanche_"):  # addon=mkd runs as MKDPlugin; the rest say why not
            from cil.avalanche.peers import check_peer_addon

            check_peer_addon(cfg.method.name, addon)
            continue
        if (
            getattr(addon, "mode", None) == "main_pass"
            and not cfg.method.name.startswith("avalanche_")
            and not method_class(cfg.method.name).declares_main_pass
        ):
            raise ConfigError(
                f"addon.{addon.name}.mode=main_pass with method={cfg.method.name}: this method does not "
                f"declare a main pass to distil on; use addon.{addon.name}.mode=block"
            )
        draw = getattr(addon, "replay_batch_size", None)
        if draw is not None and uses_replay(cfg.method.name) and cfg.buffer.size < draw:
            raise ConfigError(
                f"buffer.size={cfg.buffer.size} is smaller than addon.{addon.name}.replay_batch_size="
                f"{draw}; raise buffer.size or lower the draw"
            )
    if uses_replay(cfg.method.name):
        for key, n in cfg.method.buffer_draws().items():
            if cfg.buffer.size < n:
                raise ConfigError(
                    f"buffer.size={cfg.buffer.size} is smaller than {key}={n}: method "
                    f"{cfg.method.name!r} draws that many samples from the buffer at once; raise "
                    f"buffer.size or lower {key}"
                )


def check_stream_method(cfg: RunConfig) -> None:
    """A blurry stream hides task boundaries: a method that needs them is refused, with the fix."""
    kind = cfg.stream.kind
    if kind == "disjoint":
        return
    name = cfg.method.name
    if name.startswith("avalanche_"):
        raise ConfigError(
            f"method={name} with stream.kind={kind}: Avalanche peers train on one experience per task, "
            "which a blurry stream does not announce; use stream.kind=disjoint or one of our task-free "
            f"methods ({', '.join(task_free_methods())})"
        )
    from cil.core.methods import method_class

    if method_class(name).boundaries_needed(cfg.method):
        raise ConfigError(
            f"method={name} needs task boundaries; stream.kind={kind} hides them: use "
            f"stream.kind=disjoint or a task-free method ({', '.join(task_free_methods())})"
        )


def task_free_methods() -> list[str]:
    """Methods that run without task boundaries; one with a task-free switch is named with it (gsa)."""
    from cil.core.methods import METHODS

    names = []
    for n, cls in sorted(METHODS.items()):
        if not cls.needs_task_boundaries:
            names.append(n)
        elif "task_free" in cls.Config.__dataclass_fields__ and not cls.boundaries_needed(
            cls.Config(task_free=True)  # type: ignore[call-arg]  # only a Config with a task_free field gets here
        ):
            names.append(f"{n} with method.task_free=true")
    return names
