"""Build a run from its config and execute it: dataset -> stream -> model, optimizer, buffer, method -> learner.

Hydra-free: `cil.__main__` resolves the config and calls `run_experiment`; tests and scripts may call it directly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from cil import __version__
from cil.buffer import ReplayBuffer
from cil.config import RunConfig, validate
from cil.data.datasets import ImageDataset, load_dataset
from cil.data.stream import ClassIncrementalStream
from cil.diagnostics import Diagnostics
from cil.errors import ConfigError
from cil.learner import Learner
from cil.logger import RunLogger
from cil.methods import method_class
from cil.models import build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device name: use cpu, cuda, cuda:N or auto ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available on this machine: use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r} is not supported: use cpu, cuda, cuda:N or auto")
    return device


def build_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    raise ConfigError(f"optimizer.name={o.name!r} is unknown: choose sgd or adam")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_run_dataset(cfg: RunConfig) -> ImageDataset:
    d = cfg.dataset
    return load_dataset(d.name, d.root, download=d.download, verify=d.verify, image_size=d.image_size, path=d.path)


def build_learner(cfg: RunConfig, out_dir: Path, dataset: Optional[ImageDataset] = None) -> Learner:
    """Everything a run needs, in the order that keeps runs reproducible from the seed."""
    validate(cfg)
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dataset = dataset or load_run_dataset(cfg)
    validate(cfg, dataset.num_classes)
    stream = ClassIncrementalStream(dataset, cfg.stream.n_tasks, cfg.stream.batch_size, cfg.stream.class_order,
                                    seed=cfg.seed, device=device, samples_per_class=cfg.stream.samples_per_class)
    torch.manual_seed(cfg.seed)  # model initialisation
    kwargs = {"hidden": tuple(cfg.model.hidden)} if cfg.model.name == "mlp" else (
        {"nf": cfg.model.nf} if cfg.model.nf else {})
    model = build_model(cfg.model.name, dataset.input_shape, dataset.num_classes, **kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model.parameters())
    if cfg.compile:
        model = torch.compile(model)
    cls = method_class(cfg.method.name)
    buffer = ReplayBuffer(cfg.buffer.size, dataset.input_shape, device=device, policy=cfg.buffer.policy,
                          seed=cfg.seed + 1) if cls.uses_buffer and cfg.buffer.size > 0 else None
    method = cls(model, optimizer, buffer, cfg.method, dataset.num_classes, device, precision=cfg.precision,
                 channels_last=cfg.channels_last, seed=cfg.seed + 2, input_shape=dataset.input_shape)
    if cfg.diagnostics.enabled:
        method.diagnostics = Diagnostics.for_stream(cfg.diagnostics.every, stream, model)
    logger = RunLogger(out_dir, tensorboard=cfg.log.tensorboard)
    return Learner(cfg, stream, method, logger)


def run_experiment(cfg: RunConfig, out_dir: str | os.PathLike, resolved_config: Optional[dict] = None) -> dict:
    """Run one experiment into `out_dir` and return (and write) its results.json content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    learner = build_learner(cfg, out_dir)
    try:
        results = learner.run()
    finally:
        learner.logger.close()
    if learner.diagnostics is not None:
        learner.diagnostics.save(out_dir, plots=cfg.diagnostics.plots)
    results = {
        "status": "complete",
        "config": resolved_config if resolved_config is not None else dataclasses.asdict(cfg),
        **results,
        "wall_time_s": time.time() - started,
        "versions": {"cil": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(learner.device),
    }
    write_json_atomic(out_dir / "results.json", results)
    return results
