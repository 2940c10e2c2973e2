"""Build a run from its config and execute it: dataset -> stream -> model, optimizer, buffer, method -> learner.

Hydra-free: `cil.run.cli` resolves the config and calls `run_experiment`; tests and scripts may call it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from cil import __version__
from cil.core.addons import build_addons
from cil.core.buffer import ReplayBuffer
from cil.core.compiled_step import StepCompiler
from cil.core.data import ImageDataset, holdout_validation, load_dataset
from cil.core.data.blurry import BlurryStream
from cil.core.data.stream import ClassIncrementalStream
from cil.core.diagnostics import Diagnostics
from cil.core.learner import Learner
from cil.core.methods import method_class
from cil.core.models import build_model
from cil.errors import CilError, ConfigError, Preempted, StorageError
from cil.run.checkpoint import Checkpointer, config_differences, slurm_requeue
from cil.run.config import uses_replay as method_uses_buffer
from cil.run.config import validate
from cil.run.determinism import enable_determinism
from cil.run.folder import RunFolder, UnwritableFolder
from cil.run.logger import RunLogger, save_diagnostics
from cil.run.machine import machine_info
from cil.runfolder import RESULTS, read_json
from cil.schema import RunConfig

log = logging.getLogger("cil")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: on a CPU, the AVX512-BF16 or AMX-BF16 instructions
    (without them PyTorch emulates bf16, several times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((ln.split() for ln in info if ln.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(name: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, before anything is built or written: fp16 (float16 autocast with
    a GradScaler) is for CUDA devices."""
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            "precision=fp16 needs a CUDA device (autocast float16 with a GradScaler, as the official code trains); "
            "on this CPU use precision=fp32 or precision=bf16"
        )


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device has native bf16, else fp32; bf16 on a device without it is kept (a run
    must do what it says) with a warning; fp16 off CUDA is refused (check_precision)."""
    check_precision(name, device)
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and not native_bf16(device):
        log.warning(
            "precision=bf16 on %s, which has no native bfloat16 (no AVX512-BF16/AMX flag): PyTorch emulates "
            "it, several times slower than fp32; use precision=auto (bf16 only where native) or fp32",
            "this CPU" if device.type == "cpu" else device,
        )
    return name


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
        return torch.optim.Adam(params, lr=o.lr, betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay)
    if o.name == "adamw":  # decoupled weight decay (CCL-DC's optimizer): p <- p - lr * wd * p, then Adam's step
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay)
    raise ConfigError(f"optimizer.name={o.name!r} is unknown: choose sgd, adam or adamw")


def load_run_dataset(cfg: RunConfig) -> ImageDataset:
    """The run's data; with eval.split=validation its test set is a held-out part of the training set instead."""
    d = cfg.dataset
    dataset = load_dataset(d.name, d.root, download=d.download, verify=d.verify, image_size=d.image_size, path=d.path)
    if cfg.eval.split == "validation":
        dataset = holdout_validation(dataset, cfg.eval.validation_fraction)
    return dataset


def check_buffer_memory(size: int, sample_shape: tuple, device: torch.device) -> None:
    """Refuse a memory that cannot fit, before allocating it (an allocation error names nothing)."""
    per_sample = math.prod(sample_shape) + 32  # uint8 image; label and task id on the device and on the host
    needed = (size + 1) * per_sample
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > free:
        raise ConfigError(
            f"buffer.size={size} needs {needed / 2**30:.1f} GiB on {device} ({per_sample} bytes a "
            f"sample) but {free / 2**30:.1f} GiB are free there: lower buffer.size"
        )


def build_stream(cfg: RunConfig, dataset: ImageDataset) -> ClassIncrementalStream:
    """The run's stream on its device. What only the data can tell is refused here, before anything is trained
    or written: a bad split, class order or device, a task without test images, a memory that cannot fit."""
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    if method_uses_buffer(cfg.method.name):
        check_buffer_memory(cfg.buffer.size, dataset.input_shape, device)
    if cfg.stream.kind != "disjoint":  # i-Blurry / Si-Blurry (docs/streams.md)
        return BlurryStream(
            dataset,
            cfg.stream.n_tasks,
            cfg.stream.batch_size,
            cfg.stream.class_order,
            seed=cfg.seed,
            device=device,
            samples_per_class=cfg.stream.samples_per_class,
            kind=cfg.stream.kind,
            disjoint_class_pct=cfg.stream.disjoint_class_pct,
            blurry_sample_pct=cfg.stream.blurry_sample_pct,
        )
    return ClassIncrementalStream(
        dataset,
        cfg.stream.n_tasks,
        cfg.stream.batch_size,
        cfg.stream.class_order,
        seed=cfg.seed,
        device=device,
        samples_per_class=cfg.stream.samples_per_class,
    )


def anytime_every_samples(cfg: RunConfig) -> int:
    """eval.anytime_every_samples with null resolved: every 100 samples on a blurry stream (the i-Blurry
    protocol), off on a disjoint one (its results stay as they were)."""
    every = cfg.eval.anytime_every_samples
    return every if every is not None else (0 if cfg.stream.kind == "disjoint" else 100)


def build_learner(
    cfg: RunConfig,
    out_dir: Path,
    dataset: ImageDataset | None = None,
    resume_step: int | None = None,
    stream: ClassIncrementalStream | None = None,
    wandb_sink=None,
) -> Learner:
    """Everything a run needs, in the order that keeps runs reproducible from the seed. `resume_step`: the run
    continues from a checkpoint at that stream position (logs are appended to, not started over). `stream`: one
    already made from `dataset` by build_stream. `wandb_sink`: a started cil.run.wandb_log.WandbSink."""
    validate(cfg)
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # several runs on few cores: torch's default oversubscribes them
    if cfg.deterministic:
        enable_determinism()
    dataset = dataset or load_run_dataset(cfg)
    stream = stream or build_stream(cfg, dataset)
    torch.manual_seed(cfg.seed)  # model initialisation
    kwargs: dict[str, Any] = (
        {"hidden": tuple(cfg.model.hidden)}
        if cfg.model.name == "mlp"
        else {**({"nf": cfg.model.nf} if cfg.model.nf else {}), "pool": cfg.model.pool}
    )
    model = build_model(cfg.model.name, dataset.input_shape, dataset.num_classes, **kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model.parameters())
    if cfg.compile:
        model = cast(nn.Module, torch.compile(model))  # an OptimizedModule; torch types it as a plain callable
    normalize = dataset.normalization() if cfg.dataset.normalize else None
    realtime: dict[str, Any] | None = None  # results.json `realtime` (without the delay), when the real-time mode is on
    if cfg.method.name.startswith("avalanche_"):  # Avalanche's own strategies as peers (docs/avalanche.md)
        from cil.avalanche.peers import build_peer

        if cfg.diagnostics.enabled:
            raise ConfigError(
                f"diagnostics.enabled=true with method.name={cfg.method.name!r}: diagnostics hook into "
                "our methods' updates, which Avalanche peers do not use; set diagnostics.enabled=false"
            )
        method = build_peer(cfg, model, stream, device, lambda params: build_optimizer(cfg, params), normalize)
        if cfg.compile_step != "none":
            StepCompiler(cfg.compile_step).fall_back(f"{cfg.method.name} is Avalanche's own step")
    else:
        if cfg.realtime.enabled and cfg.realtime.delay is None:  # before the run's method exists: no state shared
            from cil.run.realtime import measure_delay

            realtime = measure_delay(
                cfg,
                model,
                dataset,
                stream,
                device,
                normalize,
                lambda method_cfg, addon, m: build_native_method(
                    cfg, method_cfg, addon, m, dataset, device, normalize, kwargs
                ),
            )
        method = build_native_method(
            cfg, cfg.method, cfg.addon, model, dataset, device, normalize, kwargs, optimizer=optimizer
        )
        if cfg.diagnostics.enabled:
            method.diagnostics = Diagnostics.for_stream(cfg.diagnostics.every, stream, model)
        if cfg.compile_step != "none":  # after the add-ons and diagnostics, which rule it out
            method.use_compiled_step(StepCompiler(cfg.compile_step, device_type=device.type))
    logger = RunLogger(
        out_dir,
        tensorboard=cfg.log.tensorboard,
        resume=resume_step is not None,
        purge_step=resume_step,
        wandb=wandb_sink,
    )
    if cfg.realtime.enabled and cfg.realtime.delay is not None:
        realtime = {"reference": cfg.realtime.reference, "delay_source": "set"}
    delay = 1
    if cfg.realtime.enabled:
        assert realtime is not None  # measured above, or set by hand
        delay = cfg.realtime.delay or realtime["delay"]
    return Learner(
        stream,
        method,
        logger,
        seed=cfg.seed,
        eval_batch_size=cfg.eval.batch_size,
        anytime_every=cfg.eval.anytime_every,
        anytime_samples=cfg.eval.anytime_samples,
        log_every=cfg.log.every,
        progress=cfg.log.progress,
        auc_every_samples=anytime_every_samples(cfg),
        eval_classes=cfg.eval.classes,
        flops_every=cfg.compute.flops_every if cfg.compute.flops else 0,
        delay=delay,
        realtime=None if realtime is None else {k: v for k, v in realtime.items() if k != "delay"},
    )


def build_native_method(
    cfg: RunConfig,
    method_cfg,
    addon,
    model: torch.nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    normalize,
    model_kwargs: dict,
    optimizer=None,
):
    """One of our methods (config `method_cfg`, add-ons `addon`) on `model`, with its own buffer; `optimizer`:
    None builds one on the model's parameters (the real-time probe's copies)."""
    cls = method_class(method_cfg.name)
    optimizer = optimizer if optimizer is not None else build_optimizer(cfg, model.parameters())
    buffer = (
        ReplayBuffer(
            cfg.buffer.size,
            dataset.input_shape,
            device=device,
            policy=cfg.buffer.policy,
            seed=cfg.seed + 1,
            extras=cls.buffer_extras(method_cfg, dataset.num_classes),
        )
        if cls.uses_buffer and cfg.buffer.size > 0
        else None
    )
    method_kwargs = dict(
        precision=resolve_precision(cfg.precision, device),
        channels_last=cfg.channels_last,
        input_shape=dataset.input_shape,
        normalize=normalize,
    )
    method = cls(model, optimizer, buffer, method_cfg, dataset.num_classes, device, seed=cfg.seed + 2, **method_kwargs)

    def make_peer():
        """CCL-DC's peer: the same method with its own model (its own seeded initialisation) and optimizer."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 7)
            peer_model = build_model(cfg.model.name, dataset.input_shape, dataset.num_classes, **model_kwargs).to(
                device
            )
        if cfg.channels_last:
            peer_model = peer_model.to(memory_format=torch.channels_last)
        return cls(
            peer_model,
            build_optimizer(cfg, peer_model.parameters()),
            buffer,
            method_cfg,
            dataset.num_classes,
            device,
            seed=cfg.seed + 5,
            **method_kwargs,
        )

    build_addons(addon, method, make_peer)
    return method


def run_experiment(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    resolved_config: dict | None = None,
    on_start: Callable[[], None] | None = None,
    wandb_group: str | None = None,
    folder: RunFolder | None = None,
) -> dict:
    """Run one experiment into `out_dir` and return (and write) its results.json content.

    With checkpoint.resume (the default) a checkpoint in `out_dir` is continued, and a run folder that already
    holds a complete run of the same config just returns its results (a read-only one too). The folder has one
    writer at a time (cil.run.folder; `folder`: one the caller already holds, e.g. a sweep job). Everything that
    can refuse the run (a complete run of other settings, a checkpoint of other settings or other data, a folder
    where a run's file belongs) is checked before anything in the folder changes; then results.json says `running`
    and `on_start` is called (the CLI records the accepted config there). Raises Preempted (after writing a
    checkpoint) when SIGTERM or SIGINT arrives; a CilError (TrainingError when the loss becomes non-finite,
    StorageError when a file cannot be written, which any OSError of the run's files becomes) leaves a results.json
    that says `failed`, never one that looks complete. With log.wandb the run is also a W&B run, started once
    the folder is accepted, continued when the checkpoint is (`wandb_group` unless log.wandb_group is set)."""
    return drive(experiment_stages(cfg, out_dir, resolved_config, on_start, wandb_group, folder))


RunStages = Generator[Learner, dict[str, Any], dict]


def drive(stages: RunStages, train: Callable[[Learner], dict[str, Any]] = Learner.run) -> dict:
    """Runs a run's stages (`experiment_stages`) to their end: `train` trains the learner they yield and returns
    its `Learner.run()` results; what `train` raises goes back into the stages, which record it and raise it."""
    try:
        learner = next(stages)
    except StopIteration as done:  # nothing to train: a complete run's results
        return done.value
    try:
        results = train(learner)
    except BaseException as err:  # noqa: BLE001 - the stages record it and raise it again
        return finish_stages(stages, err)
    return finish_stages(stages, results)


def finish_stages(stages: RunStages, outcome: dict[str, Any] | BaseException) -> dict:
    """The stages after training: `outcome` is the learner's results, or what stopped its training (recorded in
    the run folder, then raised here unless the stages turn it into a return)."""
    try:
        if isinstance(outcome, BaseException):
            stages.throw(outcome)
        else:
            stages.send(outcome)
    except StopIteration as done:
        return done.value
    raise AssertionError("a run's stages yield one learner")


def experiment_stages(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    resolved_config: dict | None = None,
    on_start: Callable[[], None] | None = None,
    wandb_group: str | None = None,
    folder: RunFolder | None = None,
) -> RunStages:
    """`run_experiment` as a generator: everything before training (checks, folder, checkpoint, the learner), then
    it yields the learner and waits for its `Learner.run()` results (`send`) or what stopped it (`throw`), then
    everything after (results.json, the checkpoint's removal); returns the results. A caller can so train several
    runs' learners together (cil.run.packed_sweep) and each still writes its own folder as a lone run does."""
    out_dir = Path(out_dir)
    validate(cfg)  # before looking at what the run folder holds
    config = resolved_config if resolved_config is not None else dataclasses.asdict(cfg)
    with contextlib.ExitStack() as holding:
        if folder is None:
            try:
                folder = holding.enter_context(RunFolder(out_dir))
            except UnwritableFolder:
                done = completed_results(out_dir, cfg, config)  # read-only: a complete run can still be returned
                if done is None:
                    raise
                return done
        return (yield from _stages_in_folder(cfg, out_dir, folder, config, on_start, wandb_group))
    raise AssertionError("unreachable")  # mypy: the ExitStack could swallow an exception; it does not


def _stages_in_folder(
    cfg: RunConfig,
    out_dir: Path,
    folder: RunFolder,
    config: dict,
    on_start: Callable[[], None] | None,
    wandb_group: str | None,
) -> RunStages:
    done = completed_results(out_dir, cfg, config)
    if done is not None:
        return done
    folder.check_kinds()
    peer = cfg.method.name.startswith("avalanche_")  # Avalanche peers keep state we cannot checkpoint
    checkpointer = Checkpointer(out_dir, cfg, config, can_save=not peer)
    # from here on SIGTERM means "checkpoint at the next batch, then stop"; wandb_exit ends a W&B run that stops
    with checkpointer.stop_on_signals(), contextlib.ExitStack() as wandb_exit:
        state = checkpointer.load()
        dataset = load_run_dataset(cfg)
        stream = build_stream(cfg, dataset)
        checkpointer.check_data(state, dataset.fingerprint())
        sink = None
        if cfg.log.wandb:  # before the folder changes: a W&B that cannot start is one error, nothing lost
            from cil.run.wandb_log import WandbSink

            sink = WandbSink.start(cfg, out_dir, config, resuming=state is not None, group=wandb_group)
            wandb_exit.push(sink.__exit__)  # pre-empted or failed: the W&B run says so
        folder.mark_running(config)  # from here on the folder changes
        learner: Learner | None = None
        try:
            if on_start is not None:
                on_start()
            checkpointer.discard_stale()
            if state is not None:
                checkpointer.rewind_logs(state)
                if sink is not None:  # what W&B lost when the interrupted attempt died
                    sink.replay(out_dir / "metrics.csv", state["learner"]["acc_matrix"])
            learner = build_learner(
                cfg,
                out_dir,
                dataset,
                stream=stream,
                resume_step=None if state is None else state["learner"]["step"],
                wandb_sink=sink,
            )
            learner.checkpointer = checkpointer
            if state is not None:
                checkpointer.restore(learner, state)
            try:
                results = yield learner  # trained by the caller (`drive`)
            except subprocess.CalledProcessError as failed:  # raised by a signal handler: SLURM requeueing the job
                if not slurm_requeue(failed):
                    raise
                raise checkpointer.requeued(learner.step) from failed
            finally:
                learner.logger.close()
            if learner.diagnostics is not None:
                save_diagnostics(learner.diagnostics.series(), out_dir, plots=cfg.diagnostics.plots)
        except (Preempted, CilError, OSError) as caught:
            err: BaseException = caught
            if isinstance(caught, OSError) and not isinstance(caught, CilError):  # a file of the run, or of W&B
                err = StorageError(Path(caught.filename or out_dir), caught)
            step = learner.step if learner is not None else 0 if state is None else state["learner"]["step"]
            try:
                folder.write_results(
                    {
                        "status": "preempted" if isinstance(err, Preempted) else "failed",
                        "error": str(err),
                        "step": step,
                        "stream_batches": len(stream),
                        "checkpoint": str(checkpointer.path) if checkpointer.path.exists() else None,
                        "config": config,
                    }
                )
            except StorageError:
                if not isinstance(err, StorageError):
                    raise
            if err is caught:
                raise
            raise err from None
        results = {
            "status": "complete",
            "config": config,
            **results,
            "wall_time_s": checkpointer.wall_time(),
            "versions": {"cil": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "device": str(learner.device),
            "machine": machine_info(),
            "precision": learner.method.precision,  # what ran (precision=auto picks per machine)
        }
        try:
            folder.write_results(results)
        except StorageError as err:
            # The numbers must not be lost with the file: they go to the job's output, the checkpoint stays.
            print(json.dumps({k: v for k, v in results.items() if k != "confusion"}), file=sys.stderr)
            with contextlib.suppress(StorageError):  # a short record may still fit where the results did not
                folder.write_results(
                    {
                        "status": "failed",
                        "error": f"{err} (the results were printed to stderr)",
                        "step": learner.step,
                        "stream_batches": len(stream),
                        "checkpoint": str(checkpointer.path) if checkpointer.path.exists() else None,
                        "config": config,
                    }
                )
            raise
        checkpointer.finish()
        if sink is not None:
            sink.complete(results, out_dir)
    return results


def completed_results(out_dir: Path, cfg: RunConfig, config: dict) -> dict | None:
    """The results of a complete run of this config already in `out_dir` (resuming it has nothing to do)."""
    if not cfg.checkpoint.resume:
        return None
    previous = read_json(out_dir / RESULTS)  # unreadable: it cannot be a complete run's output (written atomically)
    if previous is None or previous.get("status") != "complete":
        return None
    diff = config_differences(previous.get("config", {}), config)
    if diff:
        raise ConfigError(
            f"{out_dir} already holds a complete run with other settings ({'; '.join(diff[:5])}); "
            "choose another hydra.run.dir, or set checkpoint.resume=false to overwrite it"
        )
    log.info("%s already holds a complete run of this config; nothing to do", out_dir)
    return previous
