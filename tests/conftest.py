"""Shared fixtures. Tests read real data from the offline copy beside the checkout (../shared/data) or from
$CIL_TEST_DATA_ROOT, and never write into it."""

import os
import signal
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CIL_TEST_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"offline data copy not found at {SHARED_DATA} (set CIL_TEST_DATA_ROOT)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoding caches go to a per-session temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("CIL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cil-cache"))


@pytest.fixture(autouse=True)
def _avalanche_leaves_the_warning_filters_alone(monkeypatch):
    """avalanche 0.6.0's @deprecated calls warnings.simplefilter("once") on every call, putting its own filter
    ahead of pyproject's (which make warnings errors, with named exceptions); here the call does nothing, so
    pyproject's list decides for Avalanche's warnings too. (Avalanche is imported when test modules are collected.)"""
    annotations = sys.modules.get("avalanche._annotations")
    if annotations is not None:
        quiet = types.SimpleNamespace(warn=warnings.warn, simplefilter=lambda *args, **kwargs: None)
        monkeypatch.setattr(annotations, "warnings", quiet)


@pytest.fixture
def cli_in_process(capsys):
    """`python -m cil <args>` inside the test process (cil.run.cli.run_hydra, as `cil tune` runs its phases), for
    runs refused before training, whose cost in a subprocess would be the interpreter's start. Returns what
    subprocess.run would: returncode, stdout, stderr. The real entry point keeps tests of its own."""
    from cil.run.cli import run_hydra

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            code = run_hydra(list(args))
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run
