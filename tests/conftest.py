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


@pytest.fixture(autouse=True)
def _torch_global_state_restored():
    """Runs made in the test process (cli_in_process, cil.api, run_experiment) set torch's thread count, its
    deterministic-algorithms flag and its global seed: each test gets them back as they were, so a later
    in-process run computes exactly as a fresh process would (several tests compare the two bit for bit)."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only, rng = torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_rng_state()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.set_num_threads(threads)
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
        deterministic,
        warn_only,
    ):  # only when changed: its first call costs a second or two of imports
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_rng_state(rng)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@pytest.fixture
def cli_in_process(capsys, monkeypatch):
    """`python -m cil <args>` inside the test process (cil.run.cli.run_hydra, as `cil tune` runs its phases):
    for the tests whose subject is not the process itself (a signal, a kill, an exit code), whose cost in a
    subprocess would be the interpreter's and torch's start. Returns what subprocess.run would: returncode,
    stdout, stderr. `env`: environment variables for this call. The real entry point keeps tests of its own."""
    from cil.run.cli import run_hydra

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        capsys.readouterr()
        sigterm = signal.getsignal(signal.SIGTERM)
        with monkeypatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            try:
                code = run_hydra(list(args))
            finally:
                signal.signal(signal.SIGTERM, sigterm)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def pytest_collection_modifyitems(config, items):
    """Slow tests first (each module's in its order): two workers then end on short tests, not one of them idle
    while the other runs a minute-long test collected last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
