"""Add-ons by name (`addon=<name>` or `addon=[a,b]`): every module of this package registers one (`@register`).
See cil.core.addons.base for the hooks; the runner builds them (`build_addons`) and sets `Method.addons`."""

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from cil.core.addons.base import ADDONS, Addon, AddonConfig, register
from cil.core.methods.base import Method
from cil.errors import ConfigError

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def addon_class(name: str) -> type[Addon]:
    if name not in ADDONS:
        raise ConfigError(f"addon={name!r} is unknown; choose one of {sorted(ADDONS)} (or a list, addon=[mkd,ccl_dc])")
    return ADDONS[name]


def addon_configs(selection: Any) -> dict[str, AddonConfig]:
    """The run's `addon` value -> {name: config}. Accepts None, a name, a list of names, or a mapping of name ->
    config (a config object, or a dict of its fields: what `make bench --set addon=...` can pass)."""
    if selection is None or selection in ("", "null", "none"):
        return {}
    if isinstance(selection, str):
        selection = [selection]
    if isinstance(selection, (list, tuple)):
        selection = dict.fromkeys(selection)
    if not isinstance(selection, dict):
        raise ConfigError(f"addon={selection!r}: use a name, a list of names or a mapping name -> settings")
    out: dict[str, AddonConfig] = {}
    for name, cfg in selection.items():
        cls = addon_class(name)
        if cfg is None:
            cfg = cls.Config()
        elif isinstance(cfg, dict):
            unknown = sorted(set(cfg) - set(cls.Config.__dataclass_fields__))
            if unknown:
                raise ConfigError(
                    f"addon.{name}.{unknown[0]} is not a setting of add-on {name!r}: it takes "
                    f"{', '.join(cls.Config.__dataclass_fields__)}"
                )
            cfg = cls.Config(**cfg)
        if not isinstance(cfg, cls.Config):
            raise ConfigError(f"addon.{name} needs the config of add-on {name!r} ({cls.Config.__name__})")
        if cfg.name != name:
            raise ConfigError(f"addon.{name}.name={cfg.name!r}: an add-on's name is its key; leave it as {name!r}")
        out[name] = cfg
    return out


def validate_addons(selection: Any) -> None:
    for cfg in addon_configs(selection).values():
        cfg.validate()


def build_addons(selection: Any, method: Method, make_peer: Callable[[], Method] | None = None) -> list[Addon]:
    """Build the selected add-ons on `method` (in the selection's order) and attach them (`method.addons`).
    `make_peer()`: a fresh method of the same kind with its own model and optimizer (CCL-DC's peer learner)."""
    addons = [addon_class(name)(cfg, method, make_peer=make_peer) for name, cfg in addon_configs(selection).items()]
    method.addons = addons
    return addons


__all__ = [
    "ADDONS",
    "Addon",
    "AddonConfig",
    "addon_class",
    "addon_configs",
    "build_addons",
    "register",
    "validate_addons",
]
