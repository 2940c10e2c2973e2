"""Where the Hydra configs are: the top-level `conf/` of a checkout (an editable install reads it there), else
the copy a built package ships as `conf` (pyproject maps `conf/` there), so a regular install works from any
folder."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def _config_dir() -> Path:
    checkout = PACKAGE.parent / "conf"
    # pyproject.toml beside the package: a checkout, not site-packages (where a stray conf/ could lie)
    if (PACKAGE.parent / "pyproject.toml").is_file() and (checkout / "config.yaml").is_file():
        return checkout
    return PACKAGE / "conf"


CONF_DIR = str(_config_dir())
