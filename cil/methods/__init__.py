"""Online methods by name. Avalanche's strategies run through `cil.avalanche` (method=avalanche_<name>)."""
from cil.errors import ConfigError
from cil.methods.base import Method, StepOutput
from cil.methods.er import ER
from cil.methods.er_ace import ERACE
from cil.methods.gsa import GSA
from cil.methods.naive import Naive

METHODS = {cls.name: cls for cls in (Naive, ER, ERACE, GSA)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is unknown; choose one of {sorted(METHODS)} "
                          "or avalanche_<strategy> (see docs/avalanche.md)")
    return METHODS[name]


__all__ = ["METHODS", "Method", "StepOutput", "method_class"]
