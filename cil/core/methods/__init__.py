"""Online methods by name: every module of this package registers its method (`@register`), so a new method is
one module here and nothing else. Avalanche's strategies run through `cil.avalanche` (method=avalanche_<name>)."""

import importlib
import pkgutil

from cil.core.methods.base import METHODS, ClassSets, Method, MethodConfig, ReplayConfig, StepOutput, register
from cil.errors import ConfigError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(
            f"method.name={name!r} is unknown; choose one of {sorted(METHODS)} "
            "or avalanche_<strategy> (see docs/avalanche.md)"
        )
    return METHODS[name]


__all__ = ["METHODS", "ClassSets", "Method", "MethodConfig", "ReplayConfig", "StepOutput", "method_class", "register"]
