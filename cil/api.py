"""The Python API: experiments from notebooks and scripts, no Hydra in the user's code.

    from cil import api
    results = api.run({"dataset": "digits", "method": "gsa", "buffer": {"size": 200}}, out_dir="runs/gsa")
    learner = api.build({"dataset": "digits", "method": "er"}, out_dir="runs/mine")   # drive your own loop

A config is given as a dict (nested, or with dotted keys: {"buffer.size": 200}), as Hydra override strings
(["method=gsa", "buffer.size=200"]) or both; config groups (dataset, model, method, optimizer, addon, experiment)
take an option's name. It is composed from conf/ and checked exactly as on the command line, so a wrong key or
value raises one ConfigError naming it. docs/api.md has the examples (run by tests/test_docs.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cil.core.learner import Learner
from cil.errors import ConfigError, StorageError
from cil.run.config_errors import describe, unknown_keys
from cil.run.experiment import build_learner, run_experiment
from cil.run.hydra_conf import CONF_DIR, register_schemas
from cil.schema import RunConfig

__all__ = ["config", "overrides", "run", "build"]

Config = Mapping[str, Any] | Iterable[str] | RunConfig | None
GROUPS = ("dataset", "model", "method", "optimizer", "addon", "experiment")
_PLAIN = re.compile(r"^[\w./:+-]+$")


def _value(v: Any) -> str:
    """A Python value in Hydra's override syntax."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str) and not _PLAIN.match(v):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def overrides(cfg: Mapping[str, Any] | Iterable[str] | None = None) -> list[str]:
    """Hydra override strings for a dict (nested or dotted keys) or a list of override strings. A key given twice
    (`{"buffer.size": 100, "buffer": {"size": 200}}`) is refused: which one would win is not for Hydra to guess."""
    if cfg is None:
        return []
    if isinstance(cfg, (str, bytes)):
        raise ConfigError(f"config {cfg!r} is a string: give a dict or a list of overrides, e.g. [{cfg!r}]")
    if not isinstance(cfg, Mapping):
        if not isinstance(cfg, Iterable):
            raise ConfigError(
                f"config {cfg!r} (of type {type(cfg).__name__}) is not a config: give a dict, a list of overrides or a "
                "RunConfig"
            )
        bad = [o for o in cfg if not isinstance(o, str)]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not a string: give overrides as 'key=value' strings")
        out = list(cfg)
    else:
        out = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                if prefix in GROUPS and "name" in value:  # {"method": {"name": "gsa", ...}}: the option, then its keys
                    out.append(f"{prefix}={_value(value['name'])}")
                    value = {k: v for k, v in value.items() if k != "name"}
                for k, v in value.items():
                    if not isinstance(k, str):
                        raise ConfigError(f"config key {k!r} under {prefix or 'the top'} is not a string")
                    walk(f"{prefix}.{k}" if prefix else k, v)
            elif prefix in GROUPS and not (
                isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
            ):
                raise ConfigError(
                    f"{prefix}={value!r}: a config group takes an option's name (a string)"
                    + (", for no add-on: 'none'" if prefix == "addon" else "")
                )
            else:
                out.append(f"{prefix}={_value(value)}")

        walk("", cfg)  # Hydra applies group choices before values, whatever the order
    seen: dict[str, str] = {}
    for o in out:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in seen:
            raise ConfigError(f"{key} is given twice ({seen[key]} and {o}): give each key once")
        seen[key] = o
    return out


def config(cfg: Config = None) -> RunConfig:
    """The typed run config: conf/ composed with `cfg`, checked like the command line's."""
    if isinstance(cfg, RunConfig):
        return cfg
    args = overrides(cfg)
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            dcfg = compose(config_name="config", overrides=args)
        unknown_keys(dcfg)
        return cast(RunConfig, OmegaConf.to_object(dcfg))  # typed as any container; the schema makes it a RunConfig
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(describe(err)) from None
    except (ValueError, TypeError) as err:  # Hydra's own checks of an override's value (`group=null`, ...)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{err} (in {args})") from None
    finally:
        GlobalHydra.instance().clear()


def _default_dir(cfg: RunConfig) -> Path:
    return (
        Path("outputs")
        / time.strftime("%Y-%m-%d")
        / (f"{time.strftime('%H-%M-%S')}_{cfg.dataset.name}_{cfg.method.name}_m{cfg.buffer.size}_s{cfg.seed}")
    )


def _record(out_dir: Path, cfg: RunConfig, args: list[str]) -> None:
    """.hydra/config.yaml and overrides.yaml, as a command-line run writes them (the report reads them)."""
    folder = out_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(args), folder / "overrides.yaml")


def _out_dir(out_dir: Any, cfg: RunConfig) -> Path:
    """`out_dir` as a folder path (None: the default); anything else that is not one is a ConfigError."""
    if out_dir is None:
        return _default_dir(cfg)
    if not isinstance(out_dir, (str, os.PathLike)) or isinstance(out_dir, bytes):
        raise ConfigError(
            f"out_dir={out_dir!r} (of type {type(out_dir).__name__}) is not a path: give a folder (str or Path)"
        )
    if not str(out_dir).strip():
        raise ConfigError("out_dir='' names no folder: give a folder path, or None for the default")
    path = Path(out_dir)
    for part in (path, *path.parents):  # an existing file where the folder, or a folder above it, would be
        if part.exists() and not part.is_dir():
            raise ConfigError(
                f"out_dir={str(out_dir)!r}: {part} is a file, not a folder; move it away or choose another out_dir"
            )
    return path


def run(cfg: Config = None, out_dir: str | Path | None = None) -> dict:
    """Run one experiment into `out_dir` (default outputs/<date>/<time>_<dataset>_<method>_m<M>_s<seed>) and return
    its results (results.json's content). As on the command line, a folder holding a checkpoint of the same config
    is resumed, and one holding the complete run just returns its results. A bad `cfg` or `out_dir` raises
    ConfigError; a file the run cannot write, StorageError."""
    args = overrides(cfg) if not isinstance(cfg, RunConfig) else []
    run_cfg = config(cfg)
    out = _out_dir(out_dir, run_cfg)
    return run_experiment(
        run_cfg, out, resolved_config=dataclasses.asdict(run_cfg), on_start=lambda: _record(out, run_cfg, args)
    )


def build(cfg: Config = None, out_dir: str | Path | None = None) -> Learner:
    """The parts of a run, to drive one's own loop: the Learner with its `.stream` (iterate it for batches),
    `.method` (its `.model`, `.buffer`, `.optimizer`) and `.train_batch(batch)` / `.evaluate_all(tasks_seen)`.
    Its metrics.csv goes to `out_dir` (default: as for run). Nothing is checkpointed."""
    run_cfg = config(cfg)
    out = _out_dir(out_dir, run_cfg)
    try:
        return build_learner(run_cfg, out)
    except StorageError as err:  # out_dir cannot be made or written: a bad argument, as for run
        raise ConfigError(str(err)) from None
