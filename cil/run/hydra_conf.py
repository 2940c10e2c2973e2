"""Where the Hydra configs are: the top-level `conf/` of a checkout (an editable install reads it there), else
the copy a built package ships as `conf` (pyproject maps `conf/` there), so a regular install works from any
folder."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from cil.avalanche.peers import STRATEGIES
from cil.core.addons import ADDONS
from cil.core.methods import METHODS
from cil.run.config import method_defaults
from cil.run.sweep import run_dirname
from cil.schema import RunConfig

PACKAGE = Path(__file__).resolve().parents[1]


def _config_dir() -> Path:
    checkout = PACKAGE.parent / "conf"
    # pyproject.toml beside the package: a checkout, not site-packages (where a stray conf/ could lie)
    if (PACKAGE.parent / "pyproject.toml").is_file() and (checkout / "config.yaml").is_file():
        return checkout
    return PACKAGE / "conf"


CONF_DIR = str(_config_dir())


def register_schemas() -> None:
    """The run schema, every method's config as an option of the `method` group (its fields are the keys), every
    add-on's, and the `cil_dirname` resolver of hydra.sweep.subdir (a job's folder name within the file-name
    limit, cil.run.sweep.run_dirname). Idempotent: the command line and the Python API both call it."""
    store = ConfigStore.instance()
    store.store(name="cil_schema", node=RunConfig)
    for name in [*METHODS, *(f"avalanche_{s}" for s in STRATEGIES)]:
        store.store(group="method", name=name, node=method_defaults(name))
    for name, cls in ADDONS.items():  # addon=<name> (or a list): the config lands at addon.<name>
        store.store(group="addon", name=name, node=cls.Config(), package=f"addon.{name}")
    store.store(group="addon", name="none", node={}, package="addon")  # addon=none: explicitly none (sweeps)
    if not OmegaConf.has_resolver("cil_dirname"):
        OmegaConf.register_new_resolver("cil_dirname", run_dirname)
