"""Several runs of the paper-scale queue trained as one pack in one process (`cil gpu-queue --runs-per-pack K`).

`python -m cil.run.queue_pack SPEC.json`: SPEC holds `runs`, each the overrides of one queue run (what the queue would
pass to `python -m cil`) and its folder. Each run's config is composed from conf/ as the command line composes it,
its folder gets the command line's record of it (.hydra/config.yaml, overrides.yaml, hydra.yaml) once it is
accepted, and it is set up as a sweep job (cil.run.sweep.sweep_job_stages: a complete folder is skipped, a
checkpoint resumed, a failure written to failed.json); then the runs that can share a step train as one pack
(cil.run.packed_sweep.Pack, cil.core.packed), the others one after another. SIGTERM checkpoints every run in
training at the same batch and the process exits 75, as a pre-empted run of the command line does; the same spec
resumes them. Exit 0 when every run is complete, 1 when one failed, 2 for a spec or config that cannot be read.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict

from cil.errors import EXIT_PREEMPTED, CilError, Preempted
from cil.schema import RunConfig


def record_config(run_dir: Path, dcfg: DictConfig, overrides: list[str], hydra_node: DictConfig) -> None:
    """The command line's record of an accepted run (cil.run.cli._record_config), from the composed config."""
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(dcfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), folder / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_node}), folder / "hydra.yaml")


def read_spec(path: Path) -> list[tuple[list[str], Path]]:
    """(overrides, run folder) of each run of a spec file; CilError naming what is wrong."""
    try:
        spec = json.loads(Path(path).read_text())
        runs = [([str(o) for o in run["overrides"]], Path(run["run_dir"])) for run in spec["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CilError(f"{path}: not a pack spec ({type(err).__name__}: {err}); the queue writes it") from None
    if not runs:
        raise CilError(f"{path}: a pack spec with no runs")
    return runs


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cil.run.config import validate
    from cil.run.config_errors import describe, unknown_keys
    from cil.run.hydra_conf import CONF_DIR, register_schemas
    from cil.run.packed_sweep import Pack
    from cil.run.sweep import sweep_job_stages

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cil.run.queue_pack SPEC.json", file=sys.stderr)
        return 2
    pack = Pack()
    results: list[dict[str, Any]] = []
    try:
        runs = read_spec(Path(args[0]))
        register_schemas()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for overrides, run_dir in runs:
                try:
                    dcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
                    hydra_node = dcfg.hydra
                    with open_dict(dcfg):
                        del dcfg["hydra"]
                    unknown_keys(dcfg)
                    cfg = cast(RunConfig, OmegaConf.to_object(dcfg))
                    validate(cfg)
                except CilError as err:
                    raise CilError(f"{run_dir}: {err}") from None
                except Exception as err:  # noqa: BLE001 - Hydra's and OmegaConf's errors, said in one line
                    raise CilError(f"{run_dir}: {describe(err)}") from None
                resolved = cast(dict[str, Any], OmegaConf.to_container(dcfg, resolve=True))
                run_dir.mkdir(parents=True, exist_ok=True)
                on_start = functools.partial(record_config, run_dir, dcfg, overrides, hydra_node)
                stages = sweep_job_stages(cfg, run_dir, resolved, overrides, on_start, sweep_dir=run_dir.parent)
                done = pack.add(stages, ",".join(overrides), str(run_dir))
                if done.get("status") != "packed":
                    results.append(done)
        GlobalHydra.instance().clear()
    except CilError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        results += pack.run()
    except (Preempted, KeyboardInterrupt):  # every run of the pack in training has written its checkpoint
        return EXIT_PREEMPTED
    return 0 if all(r.get("status") in ("complete", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
