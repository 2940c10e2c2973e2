"""Every paper protocol's values are pinned to docs/protocols.md, "The values": each table row's value is what the
protocol composes to, and every key a protocol sets (against its parent protocol, or against the defaults of its
method and add-on) has a row. A changed yaml value, or a new key without its row and source, fails naming the row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cil.run.cli import CONF_DIR  # importing the CLI registers the schemas with Hydra

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "protocols.md"
EXPERIMENTS = Path(CONF_DIR) / "experiment"
PAPER = re.compile(r"^(gsa|derpp|pcr|ocm|onpro)_")  # the paper protocols (the split_* ones are this project's)
NOT_SETTINGS = {"experiment"}  # the protocol's own name


def flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def composed(*overrides: str) -> dict:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return flatten(OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True))
    finally:
        GlobalHydra.instance().clear()


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def pinned_tables() -> dict[str, dict[str, tuple[object, str]]]:
    """{protocol: {key: (value, the row as written)}} from every table whose header starts with `key`."""
    text = DOC.read_text()
    values = text[text.index("## The values") : text.index("## Official code read")]
    out: dict[str, dict[str, tuple[object, str]]] = {}
    protocols: list[str] = []
    for line in values.splitlines():
        if not line.startswith("|"):
            protocols = []
            continue
        row = cells(line)
        if row[0] == "key":
            protocols = [c.strip("`") for c in row[1:-2]]
            continue
        if not protocols or row[0].startswith("---"):
            continue
        key = row[0].strip("`")
        for name, cell in zip(protocols, row[1 : 1 + len(protocols)], strict=True):
            assert cell.startswith("`") and cell.endswith("`"), f"docs/protocols.md: {line}"
            out.setdefault(name, {})[key] = (yaml.safe_load(cell.strip("`")), line.strip())
    return out


PINNED = pinned_tables()
PROTOCOLS = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if PAPER.match(p.stem))


def parent(name: str) -> str | None:
    """The protocol a protocol's yaml builds on (its defaults list names it without `override`), or None."""
    defaults = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text()).get("defaults", [])
    names = [d for d in defaults if isinstance(d, str) and d != "_self_"]
    return names[0] if names else None


def test_every_paper_protocol_has_a_table():
    assert PROTOCOLS and sorted(PINNED) == PROTOCOLS


def problems(name: str, cfg: dict, base: dict, pinned: dict[str, tuple[object, str]]) -> list[str]:
    """What is wrong with protocol `name` composed to `cfg` against its table `pinned` (`base`: what it builds on)."""
    out = [f"{name}: no key {key} (row: {row})" for key, (_, row) in pinned.items() if key not in cfg]
    out += [
        f"{name}: {key} is {cfg[key]!r}, the table says {value!r}: {row}"
        for key, (value, row) in pinned.items()
        if key in cfg and cfg[key] != value
    ]
    unlisted = sorted(k for k in cfg if cfg[k] != base.get(k, "<unset>") and k not in NOT_SETTINGS and k not in pinned)
    out += [f"{name} sets {k} without a row in docs/protocols.md, 'The values'" for k in unlisted]
    return out


def base_of(name: str, cfg: dict) -> dict:
    """What the protocol builds on: its parent protocol, else its method's defaults; with its add-on's defaults."""
    addons = sorted({k.split(".")[1] for k in cfg if k.startswith("addon.")})
    above = parent(name)
    first = f"experiment={above}" if above is not None else f"method={cfg['method.name']}"
    return composed(first, *(f"addon={a}" for a in addons))


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_values_are_the_table_and_every_setting_has_a_row(name):
    cfg = composed(f"experiment={name}")
    assert problems(name, cfg, base_of(name, cfg), PINNED[name]) == []


def test_a_changed_value_or_an_unlisted_key_is_caught_with_its_row():
    name = "gsa_ccl_dc_baseline_cifar100"
    cfg = composed(f"experiment={name}")
    base = base_of(name, cfg)
    value, row = PINNED[name]["optimizer.name"]
    assert value == "adamw" and "AdamW" in row and "GSA,c100,m1000.yaml" in row  # official value and source
    changed = {**cfg, "optimizer.name": "adam"}  # as if the yaml said Adam
    assert problems(name, changed, base, PINNED[name]) == [
        f"{name}: optimizer.name is 'adam', the table says 'adamw': {row}"
    ]
    unlisted = {k: v for k, v in PINNED[name].items() if k != "precision"}  # as if the row were missing
    assert problems(name, cfg, base, unlisted) == [
        f"{name} sets precision without a row in docs/protocols.md, 'The values'"
    ]
