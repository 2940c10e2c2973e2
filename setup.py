"""The packages of the wheel: cil and hydra_plugins (a namespace package, where Hydra finds launchers), and the
top-level conf/ shipped as cil/conf so a regular install finds the configs (cil/run/hydra_conf.py). The rest of
the metadata is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["cil", "cil.*", "hydra_plugins", "hydra_plugins.*"]), "cil.conf"],
    package_dir={"cil.conf": "conf"},
    package_data={"cil.conf": ["**/*.yaml"]},
)
