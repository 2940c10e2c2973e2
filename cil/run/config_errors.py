"""Config mistakes caught while Hydra composes the config, said in one line: the key, the value, what is allowed.

OmegaConf's own messages ("Value 'abc' of type 'str' could not be converted to Integer / full_key: buffer.size /
reference_type=BufferConfig ...") name the key but not what the key takes, and Hydra suggests `+key=value` for an
unknown key, which would then be silently ignored. `describe` turns them into
`buffer.size='abc' is not allowed: buffer.size takes an integer`, and `unknown_keys` refuses keys that `+` added.
Used by cil.run.cli only (the schema is cil.run.config; nothing here imports hydra).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from cil.errors import ConfigError
from cil.schema import RunConfig

HELP = "`python -m cil --cfg job` prints every key with its value"


def _schema_at(path: list[str]) -> type | None:
    """The dataclass that holds the key at `path` (a list of names from the top), or None."""
    cls: Any = RunConfig
    for name in path:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if name not in hints:
            return None
        cls = hints[name]
    return cast(type, cls) if dataclasses.is_dataclass(cls) else None  # a class: is_dataclass admits instances


def _describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # Optional[X] and X | None
        rest = [a for a in args if a is not type(None)]
        return f"null or {_describe_type(rest[0])}" if len(rest) == 1 else "null or a value"
    if origin is list:
        inner = _describe_type(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s, e.g. [1, 2]" if args else "a list"
    if origin is dict:
        return "a mapping {key: value}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a value")


def _owner(parts: list[str], object_type: Any = None) -> type | None:
    """The dataclass holding the key: the error's own node type (a method's config) when OmegaConf gives one,
    else found by walking the run schema."""
    if dataclasses.is_dataclass(object_type):
        return cast(type, object_type)  # OmegaConf's node type: a class (is_dataclass admits instances)
    return _schema_at(parts[:-1])


def _field_type(full_key: str, object_type: Any = None) -> Any:
    parts = full_key.split("[")[0].split(".")
    owner = _owner(parts, object_type)
    return typing.get_type_hints(owner).get(parts[-1]) if owner is not None else None


def _unknown_key_message(full_key: str, object_type: Any = None) -> str:
    parts = full_key.split(".")
    if parts[0] == "hydra":  # Hydra's or a launcher's own config, which has no such key yet
        return (
            f"{full_key} is not a key of Hydra's config (or of the chosen launcher's); to add one, prefix it with "
            f"+ (+{full_key}=...); a launcher's options: python -m cil hydra/launcher=<name> --cfg hydra"
        )
    owner = _owner(parts, object_type)
    if owner is None:
        return f"{full_key} is not a setting of cil; {HELP}"
    known = [f.name for f in dataclasses.fields(owner)]
    close = difflib.get_close_matches(parts[-1], known, n=1)
    hint = f" (did you mean {'.'.join(parts[:-1] + close)}?)" if close else ""
    where = f"{'.'.join(parts[:-1])} takes" if len(parts) > 1 else "top-level keys are"
    if parts[0] == "method" and len(parts) == 2:  # each method has its own keys: name it
        where = f"the chosen method ({owner.__name__}) takes"
    return f"{full_key} is not a setting of cil{hint}: {where} {', '.join(known)}; {HELP}"


# Hydra plugins that come with one of cil's optional extras (pyproject.toml).
PLUGIN_EXTRAS = {"hydra/sweeper/optuna": "tune"}


def describe(err: BaseException) -> str:
    """One clear line (or a short block) for an error Hydra raised while composing the config."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ValidationError) and key:
        tp = _field_type(key, getattr(cause, "object_type", None))
        allowed = f"{key.split('[')[0]} takes {_describe_type(tp)}" if tp is not None else cause.msg
        return f"{key}={cause.value!r} is not allowed: {allowed}"
    if isinstance(cause, (ConfigKeyError, AttributeError)) and key:
        return _unknown_key_message(key, getattr(cause, "object_type", None))
    text = str(err).split("\nConfig search path:")[0].strip()  # the search path is Hydra's internals
    for option, extra in PLUGIN_EXTRAS.items():
        if f"Could not find '{option}'" in text:
            return f"{option.split('/')[-1]} is a Hydra plugin that is not installed: pip install 'cil[{extra}]'"
    return text


def unknown_keys(cfg: DictConfig, cls: Any = RunConfig, prefix: str = "") -> None:
    """Raise ConfigError for a key the schema does not have (Hydra lets `+key=value` add one). A node's schema is
    its own structured type (each method's config), else the field's type in the run schema."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in cfg:
        full_key = f"{prefix}{key!s}"
        if key not in known:
            raise ConfigError(_unknown_key_message(full_key, cls))
        value = cfg[key]
        if isinstance(value, DictConfig):
            node_type = OmegaConf.get_type(value)
            schema = node_type if dataclasses.is_dataclass(node_type) else hints[key]
            if dataclasses.is_dataclass(schema):
                unknown_keys(value, schema, f"{full_key}.")
